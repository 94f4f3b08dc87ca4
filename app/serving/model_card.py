"""What the request pipeline needs to know of a model, with or without its weights.

In a single process the pipeline works with the :class:`~app.engine.models.LoadedModel` itself. The
HTTP workers of a shared-engine server hold no weights: the engine process sends each of them a
:class:`ModelCard` (labels, data config, anatomy, description), which answers the same questions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import torch

from app.engine.anatomy import ModelAnatomy, resolve_block
from app.engine.models import LoadedModel
from app.engine.preprocess import DataConfig, Preprocessor


class ServedModel(Protocol):
    """The model facts the pipeline and the protocols read."""

    @property
    def name(self) -> str: ...
    @property
    def labels(self) -> list[str]: ...
    @property
    def data_config(self) -> DataConfig: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def preprocessor(self) -> Preprocessor: ...
    @property
    def anatomy(self) -> ModelAnatomy: ...
    @property
    def num_classes(self) -> int: ...
    def resolve_block(self, target_block: int) -> int: ...
    def describe(self) -> dict[str, Any]: ...


@dataclass
class ModelCard:
    name: str
    labels: list[str]
    data_config: DataConfig
    device: torch.device
    anatomy: ModelAnatomy
    description: dict[str, Any]

    @classmethod
    def of(cls, loaded: LoadedModel) -> ModelCard:
        return cls(
            name=loaded.name,
            labels=list(loaded.labels),
            data_config=loaded.data_config,
            device=loaded.device,
            anatomy=loaded.anatomy,
            description=loaded.describe(),
        )

    @cached_property
    def preprocessor(self) -> Preprocessor:
        return Preprocessor(self.data_config)

    @property
    def num_classes(self) -> int:
        return self.anatomy.num_classes

    def resolve_block(self, target_block: int) -> int:
        return resolve_block(target_block, self.anatomy.num_blocks)

    def describe(self) -> dict[str, Any]:
        return dict(self.description)
