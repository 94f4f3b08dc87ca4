"""Turning normalised maps into pictures: colour maps, heatmap PNGs and overlays, PNG or JPEG."""

from __future__ import annotations

import io
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
from PIL import Image

from app.serving.options import COLORMAPS, DEFAULT_JPEG_QUALITY, PICTURE_FORMATS
from app.serving.png import encode_png

# Anchor colours sampled from the usual perceptual colour maps, interpolated linearly to 256 entries.
_ANCHORS: dict[str, list[tuple[int, int, int]]] = {
    "viridis": [
        (68, 1, 84),
        (71, 44, 122),
        (59, 81, 139),
        (44, 113, 142),
        (33, 144, 141),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ],
    "inferno": [
        (0, 0, 4),
        (31, 12, 72),
        (85, 15, 109),
        (136, 34, 106),
        (186, 54, 85),
        (227, 89, 51),
        (249, 140, 10),
        (249, 201, 50),
        (252, 255, 164),
    ],
    "gray": [(0, 0, 0), (255, 255, 255)],
}


@lru_cache(maxsize=8)
def colormap_lut(name: str) -> np.ndarray:
    """(256, 3) uint8 lookup table for a colour map."""
    positions = np.linspace(0.0, 1.0, 256)
    if name == "jet":
        red = np.clip(1.5 - np.abs(4 * positions - 3), 0, 1)
        green = np.clip(1.5 - np.abs(4 * positions - 2), 0, 1)
        blue = np.clip(1.5 - np.abs(4 * positions - 1), 0, 1)
        lut = np.stack([red, green, blue], axis=1) * 255
    elif name in _ANCHORS:
        anchors = np.asarray(_ANCHORS[name], dtype=np.float64)
        stops = np.linspace(0.0, 1.0, len(anchors))
        lut = np.stack([np.interp(positions, stops, anchors[:, c]) for c in range(3)], axis=1)
    else:
        raise ValueError(f"unknown colormap {name!r}; expected one of {', '.join(COLORMAPS)}")
    lut = np.round(lut).astype(np.uint8)
    lut.setflags(write=False)
    return lut


# Large maps (original-size maps of big photos) are converted in blocks of rows of about this many
# pixels, so that the float temporaries stay a few MB whatever the image size.
_BLOCK_PIXELS = 1 << 20


def _row_blocks(height: int, width: int) -> Iterator[slice]:
    """Slices of consecutive rows, each of about ``_BLOCK_PIXELS`` pixels, covering ``height`` rows."""
    step = max(1, _BLOCK_PIXELS // max(1, width))
    return (slice(top, top + step) for top in range(0, height, step))


def to_uint8(normalized: np.ndarray) -> np.ndarray:
    """floor(255 * x) for x in [0, 1]."""
    if normalized.ndim != 2 or normalized.size <= _BLOCK_PIXELS:
        levels: np.ndarray = np.floor(np.clip(normalized, 0.0, 1.0) * 255).astype(np.uint8)
        return levels
    out = np.empty(normalized.shape, dtype=np.uint8)
    for rows in _row_blocks(*normalized.shape):
        out[rows] = np.floor(np.clip(normalized[rows], 0.0, 1.0) * 255)
    return out


def heatmap_rgb(normalized: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """(H, W) map in [0, 1] -> (H, W, 3) uint8 colours."""
    colours: np.ndarray = colormap_lut(colormap)[to_uint8(normalized)]
    return colours


def overlay_rgb(
    image_rgb: np.ndarray, normalized: np.ndarray, *, colormap: str = "jet", opacity: float = 0.5
) -> np.ndarray:
    """Blend the colour-mapped map over an RGB image of the same height and width."""
    if image_rgb.shape[:2] != normalized.shape:
        raise ValueError(f"image {image_rgb.shape[:2]} and map {normalized.shape} differ in size")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError("opacity must be in [0, 1]")
    out = np.empty((*normalized.shape, 3), dtype=np.uint8)
    for rows in _row_blocks(*normalized.shape):  # in blocks of rows: float temporaries stay small
        colours = heatmap_rgb(normalized[rows], colormap).astype(np.float32)
        blended = (1.0 - opacity) * image_rgb[rows].astype(np.float32) + opacity * colours
        out[rows] = np.clip(np.round(blended), 0, 255)
    return out


@lru_cache(maxsize=8)
def _palette(name: str) -> bytes:
    return colormap_lut(name).tobytes()


def heatmap_png(normalized: np.ndarray, colormap: str = "jet", *, compress_level: int = 1) -> bytes:
    """The colour heatmap of an (H, W) map in [0, 1] as a palette PNG.

    Decoded, its pixels equal :func:`heatmap_rgb`'s exactly: each pixel stores its 8-bit map value
    and the PNG's palette is the colour map's lookup table. One byte per pixel instead of three makes
    it several times faster to encode than the RGB image, and smaller. A uint8 map is taken as the
    8-bit levels :func:`to_uint8` would give.
    """
    indices = normalized if normalized.dtype == np.uint8 else to_uint8(normalized)
    if indices.ndim != 2:
        raise ValueError(f"a heatmap needs an (H, W) map, got shape {indices.shape}")
    return encode_png(indices, palette=_palette(colormap), compress_level=compress_level)


def png_bytes(array: np.ndarray, *, compress_level: int = 1) -> bytes:
    """Encode an (H, W) uint8 grayscale or (H, W, 3) uint8 RGB array as PNG."""
    return encode_png(array, compress_level=compress_level)


def jpeg_bytes(array: np.ndarray, *, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """Encode an (H, W, 3) uint8 RGB array as JPEG (Pillow's libjpeg, its default 4:2:0 chroma)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def heatmap_picture(
    levels: np.ndarray, colormap: str, picture_format: str, *, quality: int = DEFAULT_JPEG_QUALITY
) -> bytes:
    """The heatmap of (H, W) uint8 levels: the palette PNG, or the colours as a JPEG."""
    if picture_format == "png":
        return heatmap_png(levels, colormap)
    return rgb_picture(colormap_lut(colormap)[levels], picture_format, quality=quality)


def rgb_picture(array: np.ndarray, picture_format: str, *, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """An (H, W, 3) uint8 RGB picture as PNG or JPEG."""
    if picture_format == "png":
        return png_bytes(array)
    if picture_format == "jpeg":
        return jpeg_bytes(array, quality=quality)
    raise ValueError(
        f"unknown picture format {picture_format!r}; expected one of {', '.join(PICTURE_FORMATS)}"
    )
