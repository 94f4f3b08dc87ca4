"""The model's eval transform on uint8 (3, H, W) tensors, on whatever device they are on.

The same resize, centre crop (or squash, or border) and normalisation as
:class:`app.engine.preprocess.Preprocessor`, from the same timm data config and the same
:class:`Geometry` (so maps are placed back on the original image exactly as for the Pillow path),
written with torch/torchvision tensor operations so that one code runs on the CPU and on CUDA.
Images of the same size are resized together in one call.

The resize is torchvision's antialiased one (``transforms.v2.functional.resize``, ``antialias=True``),
which uses Pillow's filter kernels (bicubic with a = -0.5, support scaled with the reduction), run as
Pillow runs them: one pass per axis, in Pillow's order, each rounded to 8 bits. Pillow's fixed-point
weights still make a pixel differ by a level now and then. ``nearest`` picks Pillow's source pixels
exactly. ``box`` and ``hamming`` have no tensor kernel: those images go through the Pillow
preprocessor and back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import PIL
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from app.engine.preprocess import Geometry, Preprocessor
from app.serving.device_decode import DeviceImage

_PILLOW_MAJOR = int(PIL.__version__.split(".")[0])
_MODES: dict[str, InterpolationMode] = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
    "nearest": InterpolationMode.NEAREST_EXACT,
}


class DeviceBatch(NamedTuple):
    """``inputs``: normalised float32 (N, 3, H, W), the model's input; ``pixels``: the same before
    normalisation, uint8 (N, 3, H, W) (the base of input-size overlays); ``geometries``: one per
    image, as the Pillow path's."""

    inputs: torch.Tensor
    pixels: torch.Tensor
    geometries: list[Geometry]


def preprocess_batch(
    images: Sequence[DeviceImage | torch.Tensor],
    preprocessor: Preprocessor,
    device: str | torch.device | None = None,
) -> DeviceBatch:
    """Resize, crop and normalise decoded images for the model, batched where sizes agree.

    ``images``: :class:`DeviceImage` entries (their ``original_size`` sets the geometry) or bare
    uint8 (3, H, W) tensors (their own size does). ``device``: where the work runs and the batch
    lives; None keeps each image's own device (they must agree).
    """
    if not images:
        raise ValueError("preprocess_batch needs at least one image")
    tensors: list[torch.Tensor] = []
    sizes: list[tuple[int, int]] = []
    for image in images:
        pixels = image.pixels if isinstance(image, DeviceImage) else image
        if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[0] != 3:
            raise ValueError(f"expected uint8 (3, H, W) pixels, got {pixels.dtype} {tuple(pixels.shape)}")
        target = torch.device(device) if device is not None else pixels.device
        tensors.append(pixels.to(target))
        height, width = pixels.shape[-2:]
        sizes.append(image.original_size if isinstance(image, DeviceImage) else (int(width), int(height)))
    out_device = tensors[0].device
    height, width = preprocessor.config.input_size
    batch = torch.empty((len(tensors), 3, height, width), dtype=torch.uint8, device=out_device)
    geometries = [preprocessor.geometry(size) for size in sizes]
    # group the images whose pixels and geometry agree: one resize call per group
    groups: dict[tuple[tuple[int, ...], Geometry], list[int]] = {}
    for row, (pixels, geometry) in enumerate(zip(tensors, geometries, strict=True)):
        groups.setdefault((tuple(pixels.shape), geometry), []).append(row)
    for (_, geometry), rows in groups.items():
        stacked = tensors[rows[0]].unsqueeze(0) if len(rows) == 1 else torch.stack([tensors[r] for r in rows])
        batch[rows] = _transform(stacked, geometry, preprocessor)
    inputs = preprocessor.normalize(batch.permute(0, 2, 3, 1))
    return DeviceBatch(inputs, batch, geometries)


def to_model_pixels(pixels: torch.Tensor, geometry: Geometry, preprocessor: Preprocessor) -> torch.Tensor:
    """Resized and cropped uint8 pixels (..., 3, H, W) for a geometry (one image or a stack of
    images of one size); the tensor form of ``Preprocessor.to_pixels``."""
    return _transform(pixels, geometry, preprocessor)


def _transform(pixels: torch.Tensor, geometry: Geometry, preprocessor: Preprocessor) -> torch.Tensor:
    mode = _MODES.get(preprocessor.config.interpolation)
    if mode is None:
        return _through_pillow(pixels, geometry, preprocessor)
    resized_w, resized_h = geometry.resized_size
    height, width = pixels.shape[-2:]
    if mode == InterpolationMode.NEAREST_EXACT:
        # Pillow's own picks (torch's nearest-exact computes the same rule in float32 and lands
        # on the other neighbour at some pixel boundaries)
        rows = _nearest_indices(height, resized_h, pixels.device)
        columns = _nearest_indices(width, resized_w, pixels.device)
        resized = pixels.index_select(-2, rows).index_select(-1, columns)
    else:
        # Pillow's two passes in Pillow's order, each rounded and clipped to 8 bits (each call on
        # uint8 rounds and clips its result): a cubic or Lanczos filter overshoots at sharp edges,
        # and which pass's overshoot is clipped moves such pixels by tens of levels.
        if _vertical_first(width, height, resized_w, resized_h):
            first = TF.resize(pixels, [resized_h, width], interpolation=mode, antialias=True)
        else:
            first = TF.resize(pixels, [height, resized_w], interpolation=mode, antialias=True)
        resized = TF.resize(first, [resized_h, resized_w], interpolation=mode, antialias=True)
    return _crop_or_pad(resized, geometry, preprocessor)


def _nearest_indices(size: int, new_size: int, device: torch.device) -> torch.Tensor:
    """The source index of each output pixel as Pillow's nearest resize finds it: a float64
    position started at half a step and advanced by one step per pixel (the rounding of the sum is
    part of the result), truncated."""
    step = size / new_size
    position = step * 0.5
    picks = []
    for _ in range(new_size):
        picks.append(min(int(position), size - 1))
        position += step
    return torch.tensor(picks, dtype=torch.long, device=device)


def _vertical_first(width: int, height: int, new_width: int, new_height: int) -> bool:
    """Whether Pillow runs the vertical pass first: from Pillow 13 on, when the height shrinks by
    more than twice as many pixels as the width (before, always the horizontal pass first)."""
    if _PILLOW_MAJOR < 13:
        return False
    return height - new_height > 0 and height - new_height > 2 * (width - new_width)


def _crop_or_pad(resized: torch.Tensor, geometry: Geometry, preprocessor: Preprocessor) -> torch.Tensor:
    """The ``input_size`` window at ``offset`` of the resized images; where it reaches outside them,
    the fill of the Pillow path (the mean colour for ``border``, black otherwise)."""
    target_h, target_w = geometry.input_size
    left, top = geometry.offset
    resized_h, resized_w = resized.shape[-2:]
    if left >= 0 and top >= 0 and left + target_w <= resized_w and top + target_h <= resized_h:
        return resized[..., top : top + target_h, left : left + target_w]
    config = preprocessor.config
    fill = [round(255 * v) for v in config.mean] if config.crop_mode == "border" else [0, 0, 0]
    canvas = torch.tensor(fill, dtype=torch.uint8, device=resized.device).view(3, 1, 1)
    canvas = canvas.expand(*resized.shape[:-2], target_h, target_w).clone()
    src_x0, src_y0 = max(left, 0), max(top, 0)
    src_x1, src_y1 = min(left + target_w, resized_w), min(top + target_h, resized_h)
    if src_x1 > src_x0 and src_y1 > src_y0:
        canvas[..., src_y0 - top : src_y1 - top, src_x0 - left : src_x1 - left] = resized[
            ..., src_y0:src_y1, src_x0:src_x1
        ]
    return canvas


def _through_pillow(pixels: torch.Tensor, geometry: Geometry, preprocessor: Preprocessor) -> torch.Tensor:
    """The Pillow preprocessor for filters torch has no kernel for (box, hamming)."""
    flat = pixels.reshape(-1, *pixels.shape[-3:]).cpu()
    out = []
    for image in flat:
        pil = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))
        array, _ = preprocessor.to_pixels(pil, geometry.original_size)
        out.append(torch.from_numpy(array).permute(2, 0, 1))
    return torch.stack(out).reshape(*pixels.shape[:-2], *geometry.input_size).to(pixels.device)
