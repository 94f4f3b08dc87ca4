"""The engine's option vocabularies, each spelled once, and the per-image explanation options.

Each vocabulary is a ``Literal`` type for the type checker and a tuple of its values (derived from
the type) for checks at run time and for messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Kernel = Literal["gaussian", "dirac"]
Score = Literal["logit", "probability"]
# The evaluation an engine runs; "auto" picks one per model.
Evaluation = Literal["reduced", "reference"]
EnginePath = Literal["auto", Evaluation]
HostWait = Literal["block", "spin"]
DType = Literal["fp32", "fp16", "bf16"]

KERNELS: tuple[Kernel, ...] = get_args(Kernel)
SCORES: tuple[Score, ...] = get_args(Score)
ENGINE_PATHS: tuple[EnginePath, ...] = get_args(EnginePath)
HOST_WAITS: tuple[HostWait, ...] = get_args(HostWait)
DTYPE_NAMES: tuple[DType, ...] = get_args(DType)


def one_of(choices: tuple[str, ...]) -> str:
    """``choices`` for a message: "a, b or c"."""
    return " or ".join(filter(None, (", ".join(choices[:-1]), choices[-1])))


@dataclass(frozen=True)
class CamOptions:
    """Per-image explanation options; the defaults are the published method."""

    kernel: Kernel = "gaussian"
    keep_prefix: bool = True
    score: Score = "logit"
    target_block: int = -1

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown kernel {self.kernel!r}; expected one of {', '.join(KERNELS)}")
        if self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}; expected one of {', '.join(SCORES)}")
