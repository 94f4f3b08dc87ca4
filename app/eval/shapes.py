"""A deterministic synthetic dataset whose ground truth says where the object is.

Every image holds exactly ONE object of one of :data:`SHAPE_CLASSES` (the shapes differ in form,
not only in colour) at a random position, scale, colour and, where meaningful, orientation (one of four
quarter turns, tilted by up to about 14 degrees), drawn over
a textured background (a colour gradient, sinusoidal stripes and pixel noise) with small clutter
(dots and short strokes that are not class shapes). The object is drawn last, so its ground-truth
mask is exactly the set of pixels it covers.

Image ``i`` of a dataset with seed ``s`` is drawn from its own generator seeded with ``(s, i)``:
the same seed always gives the same images, and the first ``k`` images of a larger set equal the
set of ``k`` images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "arrow")
IMAGE_SIZE = 64
# Normalisation the shipped model is trained with (close to the dataset's own channel statistics).
MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
STD: tuple[float, float, float] = (0.25, 0.25, 0.25)

_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: smooth edges, exact coverage
_MIN_RADIUS, _MAX_RADIUS = 9.0, 16.0  # object half-size in pixels (64-pixel image)
_MAX_TILT = 0.25  # radians: a quarter-turn orientation, tilted by at most about 14 degrees
_MIN_CONTRAST = 90.0  # Euclidean RGB distance between object colour and background base colour

Point = tuple[float, float]


@dataclass(frozen=True)
class ShapeSet:
    """``images`` (N, H, W, 3) uint8, ``labels`` (N,) int64, ``masks`` (N, H, W) bool."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _rotate(points: list[Point], angle: float) -> list[Point]:
    cos, sin = math.cos(angle), math.sin(angle)
    return [(x * cos - y * sin, x * sin + y * cos) for x, y in points]


def _regular_polygon(vertices: int, radius: float, phase: float = -math.pi / 2) -> list[Point]:
    return [
        (
            radius * math.cos(phase + 2 * math.pi * k / vertices),
            radius * math.sin(phase + 2 * math.pi * k / vertices),
        )
        for k in range(vertices)
    ]


def _square(radius: float) -> list[Point]:
    half = radius * 0.8
    return [(-half, -half), (half, -half), (half, half), (-half, half)]


def _triangle(radius: float) -> list[Point]:
    # Centred on its centroid, so the middle of the object is inside it.
    return _regular_polygon(3, radius * 1.1)


def _star(radius: float) -> list[Point]:
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.45
        angle = -math.pi / 2 + math.pi * k / 5
        points.append((r * math.cos(angle), r * math.sin(angle)))
    return points


def _cross(radius: float) -> list[Point]:
    arm, half = radius, radius * 0.33
    return [
        (-half, -arm),
        (half, -arm),
        (half, -half),
        (arm, -half),
        (arm, half),
        (half, half),
        (half, arm),
        (-half, arm),
        (-half, half),
        (-arm, half),
        (-arm, -half),
        (-half, -half),
    ]


def _arrow(radius: float) -> list[Point]:
    shaft, head_base, head_half = radius * 0.28, radius * 0.1, radius * 0.75
    return [
        (-radius, -shaft),
        (head_base, -shaft),
        (head_base, -head_half),
        (radius, 0.0),
        (head_base, head_half),
        (head_base, shaft),
        (-radius, shaft),
    ]


_POLYGONS: dict[str, Callable[[float], list[Point]]] = {
    "square": _square,
    "triangle": _triangle,
    "star": _star,
    "cross": _cross,
    "arrow": _arrow,
}


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured float RGB background (H, W, 3) in [0, 255] and its base colour."""
    base = rng.uniform(40, 215, size=3)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) / size
    direction = rng.uniform(0, 2 * math.pi)
    ramp = (xs * math.cos(direction) + ys * math.sin(direction))[..., None]
    gradient = ramp * rng.uniform(-50, 50, size=3)
    stripe_angle = rng.uniform(0, math.pi)
    frequency = rng.uniform(2.0, 9.0)
    phase = rng.uniform(0, 2 * math.pi)
    wave = np.sin(
        2 * math.pi * frequency * (xs * math.cos(stripe_angle) + ys * math.sin(stripe_angle)) + phase
    )
    stripes = wave[..., None] * rng.uniform(-25, 25, size=3)
    noise = rng.normal(0.0, rng.uniform(3, 12), size=(size, size, 3))
    return np.clip(base + gradient + stripes + noise, 0, 255), base


def _object_colour(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    while True:
        colour = rng.uniform(0, 255, size=3)
        if float(np.linalg.norm(colour - base)) >= _MIN_CONTRAST:
            return colour


def _draw_clutter(rng: np.random.Generator, canvas: np.ndarray, size: int) -> None:
    """Small dots and short strokes in random colours: present in every class, so uninformative."""
    layer = Image.new("L", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), 0)
    count = int(rng.integers(3, 8))
    for _ in range(count):
        layer.paste(0, (0, 0, *layer.size))
        draw = ImageDraw.Draw(layer)
        cx, cy = rng.uniform(0, size, size=2) * _SUPERSAMPLE
        if rng.random() < 0.5:
            r = rng.uniform(1.0, 2.5) * _SUPERSAMPLE
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        else:
            length = rng.uniform(4.0, 10.0) * _SUPERSAMPLE
            angle = rng.uniform(0, math.pi)
            dx, dy = length / 2 * math.cos(angle), length / 2 * math.sin(angle)
            width = round(rng.uniform(1.0, 2.0) * _SUPERSAMPLE)
            draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=255, width=width)
        alpha = _downsample(layer, size)
        colour = rng.uniform(0, 255, size=3)
        canvas[:] = canvas * (1 - alpha[..., None]) + colour * alpha[..., None]


def _downsample(layer: Image.Image, size: int) -> np.ndarray:
    return np.asarray(layer.resize((size, size), Image.Resampling.BOX), dtype=np.float64) / 255.0


def _object_alpha(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """Coverage (H, W) in [0, 1] of one object of class ``label`` at a random pose."""
    radius = rng.uniform(_MIN_RADIUS, _MAX_RADIUS) * size / IMAGE_SIZE
    margin = radius + 1.0
    cx, cy = rng.uniform(margin, size - margin, size=2)
    layer = Image.new("L", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(layer)
    s = _SUPERSAMPLE
    name = SHAPE_CLASSES[label]
    if name == "circle":
        r = radius * 0.85
        draw.ellipse(((cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s), fill=255)
    else:
        angle = math.pi / 2 * int(rng.integers(0, 4)) + rng.uniform(-_MAX_TILT, _MAX_TILT)
        points = _rotate(_POLYGONS[name](radius), angle)
        draw.polygon([((cx + x) * s, (cy + y) * s) for x, y in points], fill=255)
    return _downsample(layer, size)


def render(seed: int, index: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, int, np.ndarray]:
    """Image ``index`` of the set with ``seed``: (H, W, 3) uint8 image, class id, (H, W) bool mask."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(0, len(SHAPE_CLASSES)))
    canvas, base = _background(rng, size)
    _draw_clutter(rng, canvas, size)
    alpha = _object_alpha(rng, label, size)
    colour = _object_colour(rng, base)
    canvas = canvas * (1 - alpha[..., None]) + colour * alpha[..., None]
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return image, label, alpha >= 0.5


def render_empty(seed: int, index: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """A background with clutter and no object (its own random stream, apart from :func:`render`)."""
    rng = np.random.default_rng([seed, index, 1])
    canvas, _ = _background(rng, size)
    _draw_clutter(rng, canvas, size)
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def generate_empty(seed: int, count: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """(count, H, W, 3) uint8 images without an object."""
    return np.stack([render_empty(seed, index, size) for index in range(count)])


def generate(seed: int, count: int, size: int = IMAGE_SIZE, start: int = 0) -> ShapeSet:
    """``count`` images (indices ``start .. start + count - 1``) of the set with ``seed``."""
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    masks = np.empty((count, size, size), dtype=bool)
    for offset in range(count):
        images[offset], labels[offset], masks[offset] = render(seed, start + offset, size)
    return ShapeSet(images=images, labels=labels, masks=masks)


def normalize(
    images: np.ndarray,
    mean: tuple[float, float, float] = MEAN,
    std: tuple[float, float, float] = STD,
) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 normalised model input."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (tensor - mean_t) / std_t


class ShapesDataset(Dataset):
    """A torch view of a :class:`ShapeSet`: (normalised image, label, mask) triples."""

    def __init__(
        self,
        seed: int,
        count: int,
        *,
        mean: tuple[float, float, float] = MEAN,
        std: tuple[float, float, float] = STD,
        size: int = IMAGE_SIZE,
    ) -> None:
        self.data = generate(seed, count, size)
        self.inputs = normalize(self.data.images, mean, std)
        self.labels = torch.from_numpy(self.data.labels)
        self.masks = torch.from_numpy(self.data.masks)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        return self.inputs[index], int(self.labels[index]), self.masks[index]
