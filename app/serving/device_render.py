"""Maps into pictures on the maps' device: sizing, 8-bit levels, colour maps, overlays, PNG/JPEG.

The tensor form of :mod:`app.serving.render` and :func:`app.serving.maps.shape_maps`: the same
bilinear upsampling to the model input, the same projection onto the original image through the
crop :class:`Geometry`, the same ``floor(255 * x)`` levels, the same 256-entry colour lookup tables
(built from :func:`app.serving.render.colormap_lut`) and the same float32 blend, so on the CPU the
pictures equal the Pillow path's exactly. Encoding: ``torchvision.io.encode_jpeg`` takes CUDA tensors
(nvJPEG) and CPU tensors alike; PNGs are written on the CPU by the Pillow path's writer
(:mod:`app.serving.png`), a PNG heatmap as its palette PNG of the 8-bit levels (an RGB one would be
three times the bytes to move and deflate for the same decoded colours).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.io import encode_jpeg

import app.serving.device_decode  # noqa: F401  (silences torchvision's codec deprecation warning)
from app.engine.maps import upsample_maps
from app.engine.preprocess import Geometry, project_to_original
from app.serving.options import picture_format_of
from app.serving.png import encode_png
from app.serving.render import colormap_lut, heatmap_png

MAP_SIZES: tuple[str, ...] = ("grid", "input", "original")
IMAGE_FORMATS: tuple[str, ...] = ("png", "jpeg")

_LUTS: dict[tuple[str, torch.device], torch.Tensor] = {}
# Overlays of large maps (originals of big photos) are blended in blocks of rows of about this many
# pixels, as the host rendering does, so that the float temporaries stay a few tens of MB.
_BLOCK_PIXELS = 1 << 20


def lut_tensor(colormap: str, device: str | torch.device = "cpu") -> torch.Tensor:
    """(256, 3) uint8 lookup table of a colour map on ``device`` (kept per device)."""
    key = (colormap, torch.device(device))
    table = _LUTS.get(key)
    if table is None:
        table = _LUTS[key] = torch.from_numpy(colormap_lut(colormap).copy()).to(key[1])
    return table


def size_maps(normalized: torch.Tensor, geometry: Geometry, map_size: str) -> torch.Tensor:
    """(K, h, w) maps in [0, 1] at ``map_size``: the grid as is, the model input, or the original."""
    if map_size == "grid":
        return normalized
    on_input = upsample_maps(normalized, geometry.input_size).clamp_(0.0, 1.0)
    if map_size == "input":
        return on_input
    if map_size == "original":
        return project_to_original(on_input, geometry).clamp_(0.0, 1.0)
    raise ValueError(f"unknown map size {map_size!r}; expected one of {', '.join(MAP_SIZES)}")


def to_levels(maps: torch.Tensor) -> torch.Tensor:
    """floor(255 * x) as uint8 for maps in [0, 1]."""
    return torch.floor(maps.float().clamp(0.0, 1.0) * 255).to(torch.uint8)


def heatmaps(maps: torch.Tensor, colormap: str = "jet") -> torch.Tensor:
    """(..., H, W) maps in [0, 1] (or their uint8 levels) -> (..., 3, H, W) uint8 colours."""
    levels = maps if maps.dtype == torch.uint8 else to_levels(maps)
    # int32 indices: a quarter of int64's temporary for large maps
    colours = lut_tensor(colormap, levels.device).index_select(0, levels.flatten().int())
    return colours.reshape(*levels.shape, 3).movedim(-1, -3)


def overlays(
    base: torch.Tensor, maps: torch.Tensor, *, colormap: str = "jet", opacity: float = 0.5
) -> torch.Tensor:
    """Colour-mapped (K, H, W) maps blended over a uint8 (3, H, W) image, or over one image per map
    ((K, 3, H, W)): (K, 3, H, W) uint8, with ``render.overlay_rgb``'s float32 arithmetic."""
    if tuple(base.shape[-2:]) != tuple(maps.shape[-2:]):
        raise ValueError(f"image {tuple(base.shape[-2:])} and maps {tuple(maps.shape[-2:])} differ in size")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError("opacity must be in [0, 1]")
    base = base.to(maps.device)
    count, height, width = maps.shape[0], maps.shape[-2], maps.shape[-1]
    out = torch.empty((count, 3, height, width), dtype=torch.uint8, device=maps.device)
    step = max(1, _BLOCK_PIXELS // max(1, count * width))
    for top in range(0, height, step):
        rows = slice(top, top + step)
        colours = heatmaps(maps[..., rows, :], colormap).float()
        blended = (1.0 - opacity) * base[..., rows, :].float() + opacity * colours
        out[..., rows, :] = blended.round_().clamp_(0, 255)
    return out


def encode_images(
    images: torch.Tensor | Sequence[torch.Tensor],
    image_format: str = "png",
    *,
    quality: int = 90,
    compression_level: int = 1,
) -> list[bytes]:
    """Encode uint8 (C, H, W) images (C = 1 or 3; a (N, C, H, W) batch or a list) as PNG or JPEG.

    JPEG: one ``encode_jpeg`` call for the list, on the images' device (nvJPEG on CUDA). PNG: on
    the CPU, with the Pillow path's writer (:mod:`app.serving.png`)."""
    items = list(images.unbind(0)) if isinstance(images, torch.Tensor) else list(images)
    if not items:
        return []
    if image_format == "jpeg":
        encoded = encode_jpeg([item.contiguous() for item in items], quality=quality)
        return [bytes(data.cpu().numpy().tobytes()) for data in encoded]
    if image_format == "png":
        return [encode_png(_host_pixels(item), compress_level=compression_level) for item in items]
    raise ValueError(f"unknown image format {image_format!r}; expected one of {', '.join(IMAGE_FORMATS)}")


def _host_pixels(image: torch.Tensor) -> np.ndarray:
    """uint8 (C, H, W) on any device -> (H, W) or (H, W, C) on the host."""
    pixels: np.ndarray = image.cpu().permute(1, 2, 0).numpy()
    return pixels[:, :, 0] if pixels.shape[2] == 1 else pixels


@dataclass
class RenderedMaps:
    """``maps``: the (K, H, W) float maps at the requested size (for a JSON rendering);
    ``images``: per map, encoding name (``png``, ``heatmap``, ``overlay``) -> encoded bytes."""

    maps: torch.Tensor
    images: list[dict[str, bytes]] = field(default_factory=list)


def render_maps(
    normalized: torch.Tensor,
    geometry: Geometry,
    *,
    encodings: Sequence[str] = ("heatmap",),
    map_size: str = "input",
    colormap: str = "jet",
    opacity: float = 0.5,
    input_pixels: torch.Tensor | None = None,
    original: torch.Tensor | None = None,
    image_format: str = "png",
    quality: int = 90,
) -> RenderedMaps:
    """One image's (K, h, w) normalised maps rendered as :func:`app.serving.stages.render_one`
    renders them on the host.

    ``png``: the grey 8-bit levels (always a PNG); ``heatmap``: the colour map; ``overlay``: the
    colour map blended over ``original`` (uint8 (3, H0, W0), for ``map_size="original"``) or over
    ``input_pixels`` (uint8 (3, H, W) or one per map (K, 3, H, W): the model input before
    normalisation; a grid-size overlay is drawn at input size). Heatmaps and overlays are written
    as ``image_format``. ``json`` needs no picture: the caller writes ``maps``. Everything runs on
    the maps' device; only the PNG encoder moves the pictures to the CPU. Maps of several images
    that share the model input size can be rendered in one call for ``grid`` and ``input``."""
    sized = size_maps(normalized, geometry, map_size)
    count = sized.shape[0]
    per_map: list[dict[str, bytes]] = [{} for _ in range(count)]
    pictures: dict[str, torch.Tensor] = {}
    if "png" in encodings or "heatmap" in encodings:
        levels = to_levels(sized)
        if "png" in encodings:
            pictures["png"] = levels.unsqueeze(1)
        if "heatmap" in encodings and image_format == "png":
            # a palette PNG of the levels (the Pillow path's bytes): a third of the pixels to move to
            # the host and to deflate, and the same decoded colours as the RGB heatmap
            host_levels = levels.cpu().numpy()
            for position in range(count):
                per_map[position]["heatmap"] = heatmap_png(host_levels[position], colormap)
        elif "heatmap" in encodings:
            pictures["heatmap"] = heatmaps(levels, colormap)
    if "overlay" in encodings:
        if map_size == "original":
            if original is None:
                raise ValueError("an overlay on the original needs the original image")
            base, overlay_maps = original, sized
        else:
            if input_pixels is None:
                raise ValueError("an overlay on the model input needs its pixels")
            overlay_maps = sized if map_size == "input" else size_maps(normalized, geometry, "input")
            base = input_pixels
        pictures["overlay"] = overlays(base, overlay_maps, colormap=colormap, opacity=opacity)
    for name, batch in pictures.items():
        encoded = encode_images(batch, picture_format_of(name, image_format), quality=quality)
        for position, data in enumerate(encoded):
            per_map[position][name] = data
    return RenderedMaps(sized, per_map)
