"""Preprocessing from a model's own timm data config, keeping the crop geometry.

The eval transform mirrors timm's ``transforms_imagenet_eval`` (resize by ``crop_pct``, then centre
crop; or squash; or border/pad), so a tensor made here equals timm's, and :class:`Geometry` records
where the model input sits in the original image so a map can be placed back on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

_INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class Geometry:
    """Where the model input came from.

    ``original_size`` and ``resized_size`` are (width, height); the image was resized to
    ``resized_size`` (``scale`` = resized / original per axis) and the model input is the window
    of ``input_size`` = (height, width) whose top-left corner is ``offset`` = (left, top) in the
    resized image (negative offsets mean padding).
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    offset: tuple[int, int]
    input_size: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        return (
            self.resized_size[0] / self.original_size[0],
            self.resized_size[1] / self.original_size[1],
        )

    def crop_box_original(self) -> tuple[float, float, float, float]:
        """The model input's window in original-image pixels: (left, top, right, bottom)."""
        sx, sy = self.scale
        left, top = self.offset
        return (left / sx, top / sy, (left + self.input_size[1]) / sx, (top + self.input_size[0]) / sy)


def _three(values: Any) -> tuple[float, float, float]:
    """One value per colour channel."""
    first, second, third = (float(v) for v in values)
    return first, second, third


@dataclass(frozen=True)
class DataConfig:
    input_size: tuple[int, int]  # (H, W)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def from_timm(cls, config: dict[str, Any]) -> DataConfig:
        size = config.get("input_size", (3, 224, 224))
        return cls(
            input_size=(int(size[-2]), int(size[-1])),
            interpolation=str(config.get("interpolation") or "bicubic"),
            crop_pct=float(config.get("crop_pct") or 0.875),
            crop_mode=str(config.get("crop_mode") or "center"),
            mean=_three(config.get("mean", cls.mean)),
            std=_three(config.get("std", cls.std)),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "input_size": [3, *self.input_size],
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
            "mean": list(self.mean),
            "std": list(self.std),
        }


class Preprocessor:
    """PIL image -> normalised (3, H, W) tensor and its :class:`Geometry`."""

    def __init__(self, config: DataConfig) -> None:
        if config.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"unsupported interpolation {config.interpolation!r}")
        self.config = config
        self._mean = torch.tensor(config.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(config.std, dtype=torch.float32).view(3, 1, 1)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # mean, std per device

    def geometry(self, original_size: tuple[int, int]) -> Geometry:
        """The resize and crop timm's eval transform applies to an image of (width, height)."""
        width, height = original_size
        target_h, target_w = self.config.input_size
        crop_pct = self.config.crop_pct
        scale_h, scale_w = math.floor(target_h / crop_pct), math.floor(target_w / crop_pct)
        mode = self.config.crop_mode
        if mode == "squash":
            resized = (scale_w, scale_h)
        elif mode == "border":
            ratio = max(height / scale_h, width / scale_w)
            resized = (round(width / ratio), round(height / ratio))
        elif mode == "center":
            if scale_h == scale_w:
                short, long = (width, height) if width <= height else (height, width)
                new_long = int(scale_h * long / short)
                resized = (scale_h, new_long) if width <= height else (new_long, scale_h)
            else:
                ratio = min(height / scale_h, width / scale_w)
                resized = (round(width / ratio), round(height / ratio))
        else:
            raise ValueError(f"unsupported crop_mode {mode!r}")
        left, top = _centre_offset(resized[0], target_w), _centre_offset(resized[1], target_h)
        return Geometry(
            original_size=(width, height),
            resized_size=resized,
            offset=(left, top),
            input_size=(target_h, target_w),
        )

    def min_decode_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """The smallest (width, height) an image of ``original_size`` may be decoded at so that the
        resize still shrinks it at least twofold: twice the size the image is resized to."""
        width, height = self.geometry(original_size).resized_size
        return 2 * width, 2 * height

    def to_pixels(
        self,
        image: Image.Image,
        original_size: tuple[int, int] | None = None,
        *,
        reducing_gap: float | None = None,
        window_only: bool = False,
    ) -> tuple[np.ndarray, Geometry]:
        """Resized and cropped uint8 RGB pixels (H, W, 3), before normalisation.

        ``original_size``: the full image's (width, height) when ``image`` was decoded at a reduced
        scale; the geometry (resize and crop, and where the map goes back) follows the full image.
        ``reducing_gap``: Pillow's two-step resize; an image at least ``2 * reducing_gap`` times the
        resize target is first shrunk by an integer factor (box filter) to no less than
        ``reducing_gap`` times the target, then resized with the model's filter. None: one step,
        exactly timm's PIL transform.
        ``window_only``: when the crop window lies inside the resized image, resize only the part of
        the image it keeps (Pillow's ``box``): the same filter at the same sample positions, less
        work (a 4:3 photo cropped to a square: about half). Not bit-exact: Pillow takes the box in
        float32, and it may run its horizontal and vertical passes in the other order for the
        window than for the whole image (its choice depends on the sizes), which moves the
        clipping of its 8-bit intermediate: a level or two on photos, tens of levels at some sharp
        edges. False: resize the whole image, then crop, exactly timm's PIL transform.
        """
        if image.mode != "RGB":
            image = image.convert("RGB")
        geometry = self.geometry(original_size or image.size)
        interpolation = _INTERPOLATIONS[self.config.interpolation]
        target_h, target_w = geometry.input_size
        left, top = geometry.offset
        resized_w, resized_h = geometry.resized_size
        inside = left >= 0 and top >= 0 and left + target_w <= resized_w and top + target_h <= resized_h
        # NEAREST is cheap whole, and its sample picks would move with the float32 box
        window_path = window_only and interpolation != Image.Resampling.NEAREST
        if inside and window_path and (target_w, target_h) != (resized_w, resized_h):
            scale_x, scale_y = image.width / resized_w, image.height / resized_h
            box = (left * scale_x, top * scale_y, (left + target_w) * scale_x, (top + target_h) * scale_y)
            if reducing_gap is not None:
                # Pillow's own two-step rule, applied to the whole image so that the reduction
                # groups the same pixels as the whole-image path (a reduction of the window alone
                # would start its pixel blocks at the window's edge)
                factor = (int(scale_x / reducing_gap) or 1, int(scale_y / reducing_gap) or 1)
                if factor != (1, 1):
                    image = image.reduce(factor)
                    box = (box[0] / factor[0], box[1] / factor[1], box[2] / factor[0], box[3] / factor[1])
            window = image.resize((target_w, target_h), interpolation, box=box)
            return np.array(window, dtype=np.uint8), geometry
        resized = image.resize(geometry.resized_size, interpolation, reducing_gap=reducing_gap)
        if inside:
            cropped = resized.crop((left, top, left + target_w, top + target_h))
            return np.array(cropped, dtype=np.uint8), geometry
        fill = (
            tuple(round(255 * v) for v in self.config.mean)
            if self.config.crop_mode == "border"
            else (0, 0, 0)
        )
        canvas = Image.new("RGB", (target_w, target_h), fill)
        canvas.paste(resized, (-left, -top))
        return np.array(canvas, dtype=np.uint8), geometry

    def normalize(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (..., H, W, 3) pixels -> normalised float32 (..., 3, H, W), on the pixels' device.

        A batch gives exactly the values of its images normalised one by one (the arithmetic is
        per element)."""
        tensor = torch.as_tensor(pixels).float().div_(255.0)
        tensor = tensor.movedim(-1, -3)
        mean, std = self._mean, self._std
        if tensor.device != mean.device:
            cached = self._on_device.get(tensor.device)
            if cached is None:
                cached = self._on_device[tensor.device] = (mean.to(tensor.device), std.to(tensor.device))
            mean, std = cached
        return (tensor - mean) / std

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, Geometry]:
        pixels, geometry = self.to_pixels(image)
        return self.normalize(pixels), geometry

    def batch(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, list[Geometry]]:
        tensors, geometries = zip(*(self(image) for image in images), strict=True)
        return torch.stack(list(tensors)), list(geometries)


def _centre_offset(size: int, target: int) -> int:
    """Offset of a centred window, as torchvision's centre crop (which pads smaller images) places it."""
    if size >= target:
        return round((size - target) / 2.0)
    return -((target - size) // 2)


def project_to_original(input_map: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Place an (..., H_in, W_in) map given on the model input back onto the original image.

    Returns (..., H0, W0) on the map's device; pixels of the original image outside the crop window
    are zero. Each
    original pixel centre is mapped through the resize into the input window and sampled bilinearly.
    """
    width0, height0 = geometry.original_size
    in_h, in_w = geometry.input_size
    sx, sy = geometry.scale
    left, top = geometry.offset
    shape = input_map.shape
    maps = input_map.float().reshape(-1, 1, in_h, in_w)
    device = input_map.device  # float64 positions on the map's own device (CUDA has float64 too)
    xs = (torch.arange(width0, dtype=torch.float64, device=device) + 0.5) * sx - left  # in input pixels
    ys = (torch.arange(height0, dtype=torch.float64, device=device) + 0.5) * sy - top
    gx = (xs / in_w * 2 - 1).float()
    gy = (ys / in_h * 2 - 1).float()
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)  # (H0, W0, 2) as (x, y)
    grid = grid.unsqueeze(0).expand(maps.shape[0], -1, -1, -1)
    sampled = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside_x = (xs >= 0) & (xs < in_w)
    inside_y = (ys >= 0) & (ys < in_h)
    inside = (inside_y[:, None] & inside_x[None, :]).to(sampled.dtype)
    return (sampled * inside).reshape(*shape[:-2], height0, width0)
