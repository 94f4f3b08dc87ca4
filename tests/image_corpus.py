"""Encoded test images for comparing the tensor image path with the Pillow path: shapes-dataset
images (the shipped model's domain) and photo-like images of varied size, aspect, format, colour
mode and EXIF orientation. Deterministic for a seed; nothing binary is committed."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from app.eval.shapes import generate
from tests.helpers import photo_like

# Pillow transposes that an EXIF orientation undoes: the stored image is the upright one turned by it.
_STORE_TURNED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@dataclass(frozen=True)
class Sample:
    data: bytes
    kind: str  # e.g. "jpeg-L-exif6", for reports
    label: int = -1  # the shapes class, -1 for photo-like images


def _encode(image: Image.Image, fmt: str, orientation: int = 1, **options: object) -> bytes:
    if orientation != 1:
        image = image.transpose(_STORE_TURNED[orientation])
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def shapes_samples(count: int, seed: int = 20250) -> list[Sample]:
    """Shapes images: a quarter as 64-pixel PNGs (the model's own size), a quarter as 64-pixel JPEGs,
    half enlarged to 72-200 pixels a side (aspect up to 3:2) as JPEG or PNG, some with an EXIF
    orientation."""
    shapes = generate(seed, count)
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(count):
        image = Image.fromarray(shapes.images[index])
        label = int(shapes.labels[index])
        variant = index % 4
        if variant == 0:
            samples.append(Sample(_encode(image, "PNG"), "png-64", label))
            continue
        if variant == 1:
            samples.append(Sample(_encode(image, "JPEG", quality=90), "jpeg-64", label))
            continue
        short = int(rng.integers(72, 201))
        long = int(short * rng.uniform(1.0, 1.5))
        size = (short, long) if rng.random() < 0.5 else (long, short)
        enlarged = image.resize(size, Image.Resampling.BICUBIC)
        orientation = int(rng.choice([1, 1, 1, 3, 6, 8]))
        fmt = "JPEG" if variant == 2 else "PNG"
        options = {"quality": int(rng.integers(75, 96))} if fmt == "JPEG" else {}
        samples.append(
            Sample(
                _encode(enlarged, fmt, orientation, **options), f"{fmt.lower()}-big-exif{orientation}", label
            )
        )
    return samples


def photo_samples(count: int, seed: int = 7) -> list[Sample]:
    """Photo-like images of 24-900 pixels a side (aspect up to 4:1): JPEG (qualities, chroma
    subsampling, grayscale, CMYK, EXIF orientations), PNG (RGB, grayscale, with alpha) and a few
    WebP and GIF (decoded by Pillow in both paths)."""
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(count):
        short = int(rng.integers(24, 600))
        long = min(900, int(short * rng.uniform(1.0, 4.0)))
        width, height = (short, long) if rng.random() < 0.5 else (long, short)
        image = photo_like(
            width, height, seed=seed * 10_000 + index, cell=max(4, short // int(rng.integers(3, 12)))
        )
        pick = rng.random()
        orientation = int(rng.integers(1, 9)) if rng.random() < 0.3 else 1
        if pick < 0.55:
            mode = str(rng.choice(["RGB", "RGB", "RGB", "L", "CMYK"]))
            quality = int(rng.integers(60, 97))
            subsampling = int(rng.integers(0, 3))
            data = _encode(image.convert(mode), "JPEG", orientation, quality=quality, subsampling=subsampling)
            kind = f"jpeg-{mode}-exif{orientation}"
        elif pick < 0.9:
            mode = str(rng.choice(["RGB", "RGB", "L", "RGBA", "LA"]))
            converted = image.convert(mode)
            if mode in ("RGBA", "LA"):
                array = np.asarray(converted).copy()
                array[..., -1] = rng.integers(0, 256, array.shape[:2])
                converted = Image.fromarray(array, mode)
            data = _encode(converted, "PNG", orientation)
            kind = f"png-{mode}-exif{orientation}"
        else:
            fmt = "WEBP" if pick < 0.95 else "GIF"
            data = _encode(image, fmt)
            kind = fmt.lower()
        samples.append(Sample(data, kind))
    return samples
