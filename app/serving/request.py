"""What every protocol asks of the pipeline, and what it gets back: transport-neutral types.

A protocol's codec turns its wire format into an :class:`InferenceRequest` and an
:class:`InferenceResult` back into its wire format; :func:`app.serving.pipeline.run` does the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from app.engine.options import Kernel, Score
from app.serving.options import DEFAULT_JPEG_QUALITY, Colormap, Encoding, MapSize, PictureFormat
from app.serving.prepare import PreparedImage


@dataclass(frozen=True)
class EncodedImages:
    """Image files as posted (JPEG, PNG, ...), decoded by the pipeline."""

    files: list[bytes]

    def __len__(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class PixelTensors:
    """Images already preprocessed by the client: (3, H, W) float32, normalised for the model."""

    tensors: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.tensors)


@dataclass(frozen=True)
class ExplainOptions:
    """The method's options of a request; ``targets`` None explains the ``top_k`` predicted classes,
    ``target_block`` None the model's configured block."""

    kernel: Kernel = "gaussian"
    keep_prefix: bool = True
    score: Score = "logit"
    target_block: int | None = None
    targets: list[int] | None = None


@dataclass(frozen=True)
class MapOptions:
    """How the maps come back. ``normalize``: min-max into [0, 1] (pictures always are);
    ``size``: the patch grid, the model input or the posted image; ``pictures``: the maps encoded
    as images; ``numbers``: the maps go into the answer as text numbers (bounded by
    ``limits.max_json_map_values``); ``bound_pixels``: the maps' pixels count against
    ``limits.max_map_pixels``; ``picture_format``: the format of the ``heatmap`` and ``overlay``
    pictures (``png`` pictures stay PNGs), ``jpeg_quality`` its quality when JPEG."""

    normalize: bool = True
    size: MapSize = "input"
    pictures: tuple[Encoding, ...] = ()
    numbers: bool = False
    bound_pixels: bool = True
    colormap: Colormap = "jet"
    opacity: float = 0.5
    picture_format: PictureFormat = "png"
    jpeg_quality: int = DEFAULT_JPEG_QUALITY


@dataclass(frozen=True)
class InferenceRequest:
    """One request of any protocol: a model, images, and what to compute and return for them.

    ``explain`` None asks for predictions only; ``maps`` None returns no maps even when explained.
    """

    model: str
    images: EncodedImages | PixelTensors
    top_k: int = 1
    explain: ExplainOptions | None = None
    maps: MapOptions | None = None


@dataclass
class MapResult:
    """One explained class of an image: its raw score map's range, the map as asked for, pictures."""

    class_id: int
    grid: tuple[int, int]
    score_range: tuple[float, float]
    values: torch.Tensor  # (h, w) float32 at the asked size, normalised when asked
    pictures: dict[str, bytes] = field(default_factory=dict)  # encoding -> PNG or JPEG


@dataclass
class ImageResult:
    """One image's answer: the logits of the ordinary forward and, when explained, its maps."""

    index: int
    logits: torch.Tensor  # (C,) float32
    maps: list[MapResult] | None
    prepared: PreparedImage | None  # None for client-preprocessed tensors
    render_seconds: float = 0.0  # CPU seconds of the rendering thread


@dataclass
class InferenceResult:
    """The answer to a request: one entry per image, in order, and how long the batch took."""

    model: str
    images: list[ImageResult]
    queue_ms: float
    compute_ms: float
    batch_images: int
    labels: list[str] = field(default_factory=list)
