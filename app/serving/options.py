"""The vocabularies of the serving layer's rendering options: the one source the API schemas, the
command line and the docs derive from (the method's own options live in ``app.engine.options``)."""

from __future__ import annotations

from typing import Literal, get_args

Encoding = Literal["png", "heatmap", "overlay", "json"]
MapSize = Literal["grid", "input", "original"]
Colormap = Literal["jet", "viridis", "inferno", "gray"]
PictureFormat = Literal["png", "jpeg"]

ENCODINGS: tuple[Encoding, ...] = get_args(Encoding)
MAP_SIZES: tuple[MapSize, ...] = get_args(MapSize)
COLORMAPS: tuple[Colormap, ...] = get_args(Colormap)
PICTURE_FORMATS: tuple[PictureFormat, ...] = get_args(PictureFormat)
# The encodings that are pictures (the others are numbers in the answer).
PICTURE_ENCODINGS: tuple[Encoding, ...] = ("png", "heatmap", "overlay")
# The colour pictures, which ``picture_format`` applies to; ``png`` (the grayscale levels, exact
# values) is always a PNG, as its name says.
COLOUR_PICTURES: tuple[Encoding, ...] = ("heatmap", "overlay")
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg"}
# JPEG quality (libjpeg's scale): 90 keeps a smooth colour map free of visible blocks
DEFAULT_JPEG_QUALITY = 90
MIN_JPEG_QUALITY = 1
MAX_JPEG_QUALITY = 100


def picture_format_of(encoding: str, picture_format: str) -> str:
    """The format an encoding's pictures are written in."""
    return picture_format if encoding in COLOUR_PICTURES else "png"
