"""The evaluation's inputs: batches of model inputs with their labels, object masks and pixels, from
freshly generated shapes images or from an image folder (with class folders or a labels file)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.engine.models import LoadedModel

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class Batch:
    """Model inputs (B, 3, H, W), labels (B,) or None, masks (B, H, W) or None, pixels (B, H, W, 3)."""

    inputs: torch.Tensor
    labels: torch.Tensor | None
    masks: torch.Tensor | None
    pixels: np.ndarray
    names: list[str]


def mask_to_input(mask: np.ndarray, loaded: LoadedModel) -> np.ndarray:
    """An (h, w) bool mask through the same resize and crop as its image."""
    image = Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB")
    pixels, _ = loaded.preprocessor.to_pixels(image)
    return pixels[..., 0] >= 128


def to_inputs(pixels: np.ndarray, loaded: LoadedModel) -> torch.Tensor:
    config = loaded.data_config
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    return (tensor - mean) / std


def model_pixels(images: np.ndarray, loaded: LoadedModel) -> np.ndarray:
    """(N, H0, W0, 3) uint8 generated images -> (N, H, W, 3) uint8 model input pixels."""
    return np.stack([loaded.preprocessor.to_pixels(Image.fromarray(image))[0] for image in images])


def synthetic_batches(loaded: LoadedModel, seed: int, limit: int, batch_size: int) -> Iterator[Batch]:
    """Freshly generated shapes images (with labels and object masks), preprocessed for the model."""
    from app.eval.shapes import generate

    for start in range(0, limit, batch_size):
        count = min(batch_size, limit - start)
        data = generate(seed, count, start=start)
        stacked = model_pixels(data.images, loaded)
        masks = np.stack([mask_to_input(mask, loaded) for mask in data.masks])
        yield Batch(
            inputs=to_inputs(stacked, loaded),
            labels=torch.from_numpy(data.labels),
            masks=torch.from_numpy(masks),
            pixels=stacked,
            names=[f"shapes-{seed}-{start + i}" for i in range(count)],
        )


def read_labels_file(path: Path) -> dict[str, int]:
    """``NAME CLASS_ID`` per line (whitespace or comma separated; NAME relative to the image dir)."""
    mapping: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.replace(",", " ").split()
        if len(parts) < 2:
            raise ValueError(f"{path}:{number}: expected 'NAME CLASS_ID', got {text!r}")
        try:
            mapping[parts[0]] = int(parts[1])
        except ValueError as exc:
            if number == 1:  # a header line
                continue
            raise ValueError(f"{path}:{number}: class id {parts[1]!r} is not an integer") from exc
    return mapping


def list_image_dir(root: Path, labels_file: Path | None = None) -> list[tuple[Path, int | None]]:
    """Images under ``root`` with their class ids.

    With a labels file, ids come from it (files it does not name are skipped). Otherwise, when
    ``root`` holds class folders, the id is the folder's index in sorted order (the ImageNet
    convention: sorted synset folders are class 0..999); a flat folder has no labels.
    """
    if labels_file is not None:
        mapping = read_labels_file(labels_file)
        items: list[tuple[Path, int | None]] = []
        for name, class_id in sorted(mapping.items()):
            path = root / name
            if path.is_file():
                items.append((path, class_id))
            else:
                matches = sorted(root.rglob(Path(name).name))
                if matches:
                    items.append((matches[0], class_id))
        if not items:
            raise ValueError(f"none of the images named in {labels_file} exist under {root}")
        return items
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if folders:
        return [
            (path, index)
            for index, folder in enumerate(folders)
            for path in sorted(folder.rglob("*"))
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
    return [(path, None) for path in sorted(root.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]


def folder_batches(
    loaded: LoadedModel,
    items: Sequence[tuple[Path, int | None]],
    limit: int,
    batch_size: int,
    seed: int,
) -> Iterator[Batch]:
    """Preprocessed images of an image folder; ``limit`` picks a seeded random subset."""
    chosen = list(items)
    if 0 < limit < len(chosen):
        chosen = sorted(random.Random(seed).sample(chosen, limit), key=lambda item: str(item[0]))
    for start in range(0, len(chosen), batch_size):
        part = chosen[start : start + batch_size]
        pixels = []
        for path, _ in part:
            with Image.open(path) as image:
                pixel_array, _ = loaded.preprocessor.to_pixels(image.convert("RGB"))
            pixels.append(pixel_array)
        stacked = np.stack(pixels)
        labels = [label for _, label in part]
        yield Batch(
            inputs=to_inputs(stacked, loaded),
            labels=None if any(label is None for label in labels) else torch.tensor(labels),
            masks=None,
            pixels=stacked,
            names=[path.name for path, _ in part],
        )
