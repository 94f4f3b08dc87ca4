"""A deterministic synthetic dataset whose ground truth says where the object is.

Every image holds exactly ONE object of one of :data:`SHAPE_CLASSES` (the shapes differ in form,
not only in colour) at a random position, scale, colour and, where meaningful, orientation (one of
four quarter turns, tilted by up to about 14 degrees), drawn over a textured background (a colour
gradient, sinusoidal stripes and pixel noise) with non-informative clutter: small dots and short
strokes, and one or two *decoys* (shapes of the object's size and contrast that are no class: rings,
bars, crescents and hollow outlines of the class shapes, placed at least 5 px clear of the object). Decoys appear in every class
and in the object-free images alike, so they carry no class evidence; a map that merely finds
salient shapes lands on them, a class-specific map should not. The object is drawn last, so its
ground-truth mask is exactly the set of pixels it covers.

Image ``i`` of a dataset with seed ``s`` is drawn from its own generator seeded with ``(s, i)``:
the same seed always gives the same images, and the first ``k`` images of a larger set equal the
set of ``k`` images.

For evaluation only, :func:`render_pair` draws images with two objects of different classes (no
decoys), which ask a map *which* object a class is.
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
_OBJECT_RADIUS = (8.0, 13.0)  # object half-size in pixels (64-pixel image)
DECOY_SHAPES: tuple[str, ...] = ("ring", "bar", "crescent", *(f"outline-{n}" for n in SHAPE_CLASSES[1:]))
_DECOY_RADIUS = (8.0, 12.0)  # decoy half-size in pixels
_DECOYS = (1, 2)  # decoys wanted per image (fewer when they do not fit)
_DECOY_GAP = 5.0  # pixels between a decoy and the object (beyond the pointing game's 4 px tolerance)
_EXTENT = 1.15  # the farthest a shape reaches from its centre, in radii (square corners, triangle tips)
_PLACEMENT_TRIES = 40
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


def _pose(
    rng: np.random.Generator, size: int, radius_range: tuple[float, float]
) -> tuple[float, float, float]:
    """A random (centre x, centre y, radius) that keeps the shape inside the image."""
    radius = rng.uniform(*radius_range) * size / IMAGE_SIZE
    margin = radius + 1.0
    cx, cy = rng.uniform(margin, size - margin, size=2)
    return float(cx), float(cy), float(radius)


def _quarter_turn(rng: np.random.Generator) -> float:
    """An orientation: one of four quarter turns, tilted by at most ``_MAX_TILT``."""
    return math.pi / 2 * int(rng.integers(0, 4)) + rng.uniform(-_MAX_TILT, _MAX_TILT)


def _placed(points: list[Point], cx: float, cy: float) -> list[Point]:
    """Shape-centred points moved to ``(cx, cy)``, in the supersampled layer's pixels."""
    s = _SUPERSAMPLE
    return [((cx + x) * s, (cy + y) * s) for x, y in points]


def _disc(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: int) -> None:
    s = _SUPERSAMPLE
    draw.ellipse(((cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s), fill=fill)


def _object_alpha(
    rng: np.random.Generator, label: int, pose: tuple[float, float, float], size: int
) -> np.ndarray:
    """Coverage (H, W) in [0, 1] of one object of class ``label`` at ``pose``, random orientation."""
    cx, cy, radius = pose
    layer = Image.new("L", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(layer)
    name = SHAPE_CLASSES[label]
    if name == "circle":
        _disc(draw, cx, cy, radius * 0.85, 255)
    else:
        points = _rotate(_POLYGONS[name](radius), _quarter_turn(rng))
        draw.polygon(_placed(points, cx, cy), fill=255)
    return _downsample(layer, size)


def _decoy_alpha(
    rng: np.random.Generator, kind: str, pose: tuple[float, float, float], size: int
) -> np.ndarray:
    """Coverage (H, W) of one decoy (a ring, a bar, a crescent or a class shape's outline) at
    ``pose``, random orientation."""
    cx, cy, radius = pose
    layer = Image.new("L", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(layer)
    angle = rng.uniform(0, 2 * math.pi)
    if kind == "ring":
        _disc(draw, cx, cy, radius * 0.9, 255)
        _disc(draw, cx, cy, radius * 0.5, 0)
    elif kind == "crescent":
        _disc(draw, cx, cy, radius * 0.9, 255)
        offset = radius * 0.45
        _disc(draw, cx + offset * math.cos(angle), cy + offset * math.sin(angle), radius * 0.75, 0)
    elif kind.startswith("outline-"):
        # The outline of a class shape: the same form, but hollow (the background shows through).
        points = _rotate(_POLYGONS[kind.removeprefix("outline-")](radius), _quarter_turn(rng))
        width = max(1, round(radius * 0.22 * _SUPERSAMPLE))
        draw.polygon(_placed(points, cx, cy), outline=255, width=width)
    else:  # bar
        along, across = radius, radius * 0.22  # half-length, half-width
        corners = [(-along, -across), (along, -across), (along, across), (-along, across)]
        draw.polygon(_placed(_rotate(corners, angle), cx, cy), fill=255)
    return _downsample(layer, size)


def _decoy_poses(
    rng: np.random.Generator, avoid: tuple[float, float, float] | None, size: int
) -> list[tuple[float, float, float]]:
    """Up to two decoy poses, each at least ``_DECOY_GAP`` pixels clear of the object (``avoid``)
    and of each other, so that a map peaking on a decoy misses the object in the pointing game."""
    wanted = int(rng.integers(_DECOYS[0], _DECOYS[1] + 1))
    poses: list[tuple[float, float, float]] = []
    gap = _DECOY_GAP * size / IMAGE_SIZE
    for _ in range(_PLACEMENT_TRIES):
        if len(poses) == wanted:
            break
        candidate = _pose(rng, size, _DECOY_RADIUS)
        others = poses + ([avoid] if avoid is not None else [])
        if all(
            math.hypot(candidate[0] - x, candidate[1] - y) >= _EXTENT * (candidate[2] + r) + gap
            for x, y, r in others
        ):
            poses.append(candidate)
    return poses


def _paint(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
    painted: np.ndarray = canvas * (1 - alpha[..., None]) + colour * alpha[..., None]
    return painted


def render(seed: int, index: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, int, np.ndarray]:
    """Image ``index`` of the set with ``seed``: (H, W, 3) uint8 image, class id, (H, W) bool mask."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(0, len(SHAPE_CLASSES)))
    canvas, base = _background(rng, size)
    _draw_clutter(rng, canvas, size)
    pose = _pose(rng, size, _OBJECT_RADIUS)
    colour = _object_colour(rng, base)
    canvas = _draw_decoys(rng, canvas, base, colour, pose, size)
    alpha = _object_alpha(rng, label, pose, size)
    canvas = _paint(canvas, alpha, colour)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return image, label, alpha >= 0.5


def _draw_decoys(
    rng: np.random.Generator,
    canvas: np.ndarray,
    base: np.ndarray,
    object_colour: np.ndarray | None,
    pose: tuple[float, float, float] | None,
    size: int,
) -> np.ndarray:
    """Decoys: shapes of object size and contrast that are no class (rings, bars, crescents, hollow
    outlines of the class shapes), in every class and in empty images alike, so they carry no class
    evidence; their colours stay far from the object's, so the object's colour marks only the object."""
    for decoy_pose in _decoy_poses(rng, pose, size):
        kind = DECOY_SHAPES[int(rng.integers(0, len(DECOY_SHAPES)))]
        while True:
            colour = _object_colour(rng, base)
            if object_colour is None or float(np.linalg.norm(colour - object_colour)) >= _MIN_CONTRAST / 2:
                break
        canvas = _paint(canvas, _decoy_alpha(rng, kind, decoy_pose, size), colour)
    return canvas


def render_empty(seed: int, index: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """A background with clutter and decoys and no object (its own random stream, apart from
    :func:`render`)."""
    rng = np.random.default_rng([seed, index, 1])
    canvas, base = _background(rng, size)
    _draw_clutter(rng, canvas, size)
    canvas = _draw_decoys(rng, canvas, base, None, None, size)
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


# Two-object images ----------------------------------------------------------------------------

# Pixels between the two objects of a pair image: twice the pointing game's 4 px tolerance plus one,
# so that no map maximum can count as a hit on both.
PAIR_GAP = 9.0


@dataclass(frozen=True)
class PairSet:
    """``images`` (N, H, W, 3) uint8, ``labels`` (N, 2) int64 (two different classes per image),
    ``masks`` (N, 2, H, W) bool (one per object, in the order of ``labels``)."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def render_pair(seed: int, index: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image ``index`` of the two-object set with ``seed`` (its own random stream, apart from
    :func:`render`): two objects of two different classes, each drawn as in :func:`render` (random
    scale, colour and orientation) and at least :data:`PAIR_GAP` pixels apart, over the same textured
    background and clutter, without decoys. Returns the (H, W, 3) uint8 image, the two class ids and
    their (2, H, W) bool masks.

    Not training data: it asks a map *which* object a class is, a question an image with one object
    cannot ask and a class-independent map cannot answer.
    """
    rng = np.random.default_rng([seed, index, 2])
    labels = rng.choice(len(SHAPE_CLASSES), size=2, replace=False).astype(np.int64)
    canvas, base = _background(rng, size)
    _draw_clutter(rng, canvas, size)
    gap = PAIR_GAP * size / IMAGE_SIZE
    while True:
        first, second = _pose(rng, size, _OBJECT_RADIUS), _pose(rng, size, _OBJECT_RADIUS)
        distance = math.hypot(first[0] - second[0], first[1] - second[1])
        if distance >= _EXTENT * (first[2] + second[2]) + gap:
            break
    masks = []
    for label, pose in zip(labels, (first, second), strict=True):
        colour = _object_colour(rng, base)
        alpha = _object_alpha(rng, int(label), pose, size)
        canvas = _paint(canvas, alpha, colour)
        masks.append(alpha >= 0.5)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return image, labels, np.stack(masks)


def generate_pairs(seed: int, count: int, size: int = IMAGE_SIZE, start: int = 0) -> PairSet:
    """``count`` two-object images (indices ``start .. start + count - 1``) of the set with ``seed``."""
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    labels = np.empty((count, 2), dtype=np.int64)
    masks = np.empty((count, 2, size, size), dtype=bool)
    for offset in range(count):
        images[offset], labels[offset], masks[offset] = render_pair(seed, start + offset, size)
    return PairSet(images=images, labels=labels, masks=masks)


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
