"""The vocabularies of the method's options: the one source that the engine, the API schemas, the
command line and the docs derive from."""

from __future__ import annotations

from typing import Literal, get_args

Kernel = Literal["gaussian", "dirac"]
Score = Literal["logit", "probability"]

KERNELS: tuple[Kernel, ...] = get_args(Kernel)
SCORES: tuple[Score, ...] = get_args(Score)
