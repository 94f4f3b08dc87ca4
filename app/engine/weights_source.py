"""Where a model's weights come from (``hub``, a local file, ``random:SEED``), parsed without torch,
so that settings can be checked in a process that loads no model."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# the seed of "random:SEED" weights: an integer in ASCII digits
RANDOM_SEED = re.compile(r"-?[0-9]{1,19}")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class WeightsSource:
    kind: str  # "hub" | "file" | "random"
    path: Path | None = None
    seed: int | None = None

    @classmethod
    def parse(cls, source: str | os.PathLike[str] | None) -> WeightsSource:
        text = "hub" if source is None else str(source).strip()
        if text in ("", "hub", "pretrained"):
            return cls("hub")
        if text == "random" or text.startswith("random:"):
            _, colon, seed = text.partition(":")
            if colon and not RANDOM_SEED.fullmatch(seed):
                raise ModelLoadError(f"invalid weights source {text!r}: expected random or random:SEED")
            return cls("random", seed=int(seed) if seed else 0)
        # anything else is a file, also one whose name starts with "random" (random_init.safetensors)
        return cls("file", path=Path(text).expanduser())

    def describe(self) -> str:
        if self.kind == "random":
            return f"random:{self.seed}"
        if self.kind == "file":
            return str(self.path)
        return "hub"
