"""The vocabularies of the serving layer's rendering options: the one source the API schemas, the
command line and the docs derive from (the method's own options live in ``app.engine.options``)."""

from __future__ import annotations

from typing import Literal, get_args

Encoding = Literal["png", "heatmap", "overlay", "json"]
MapSize = Literal["grid", "input", "original"]
Colormap = Literal["jet", "viridis", "inferno", "gray"]

ENCODINGS: tuple[Encoding, ...] = get_args(Encoding)
MAP_SIZES: tuple[MapSize, ...] = get_args(MapSize)
COLORMAPS: tuple[Colormap, ...] = get_args(Colormap)
# The encodings that are pictures (the others are numbers in the answer).
PICTURE_ENCODINGS: tuple[Encoding, ...] = ("png", "heatmap", "overlay")
