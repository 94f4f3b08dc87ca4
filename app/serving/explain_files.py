"""The command line's ``explain``: image files through the request pipeline, in this process, with
one overlay picture (PNG or JPEG) written per image and explained class."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import ModelSettings
from app.serving import pipeline
from app.serving.errors import InvalidOptionsError, ServiceError
from app.serving.local import local_service
from app.serving.maps import label_of
from app.serving.options import DEFAULT_JPEG_QUALITY, Colormap, PictureFormat
from app.serving.request import EncodedImages, ExplainOptions, InferenceRequest, MapOptions


class FileError(Exception):
    """An image file that cannot be read or explained; the message names it."""


@dataclass(frozen=True)
class ExplainedFiles:
    model: dict[str, Any]  # the model's description
    results: list[dict[str, Any]]  # per file: its path and ranked predictions with overlay paths


async def explain_files(
    model: ModelSettings,
    paths: list[Path],
    *,
    top_k: int,
    explain: ExplainOptions,
    colormap: Colormap,
    opacity: float,
    out: Path,
    picture_format: PictureFormat = "png",
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
) -> ExplainedFiles:
    """Explain every file (concurrently, so that they share batches) and write the overlays on the
    posted images to ``out``. Raises ``ModelLoadError`` when the model cannot load and
    :class:`FileError` for the first file that cannot be read or explained."""
    files = []
    for path in paths:
        try:
            files.append(path.read_bytes())
        except OSError as exc:
            raise FileError(f"{path}: {exc}") from exc
    maps = MapOptions(
        size="original",
        pictures=("overlay",),
        colormap=colormap,
        opacity=opacity,
        bound_pixels=False,
        picture_format=picture_format,
        jpeg_quality=jpeg_quality,
    )
    suffix = ".jpg" if picture_format == "jpeg" else ".png"
    async with local_service(model) as service:
        loaded, _ = service.registry.require_ready(model.name)
        requests = [
            InferenceRequest(
                model=model.name, images=EncodedImages([data]), top_k=top_k, explain=explain, maps=maps
            )
            for data in files
        ]
        answers = await asyncio.gather(
            *(pipeline.run(service, request) for request in requests), return_exceptions=True
        )
        description = loaded.describe()
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for path, answer in zip(paths, answers, strict=True):
        if isinstance(answer, InvalidOptionsError):  # the same for every file: say it once
            raise FileError(answer.message) from answer
        if isinstance(answer, ServiceError):
            raise FileError(f"{path}: {answer.message}") from answer
        if isinstance(answer, BaseException):
            raise answer
        (image,) = answer.images
        probabilities = image.logits.float().softmax(-1)
        entries = []
        for rank, explained in enumerate(image.maps or []):
            overlay = out / f"{path.stem}_top{rank + 1}_{explained.class_id}{suffix}"
            overlay.write_bytes(explained.pictures["overlay"])
            entries.append(
                {
                    "rank": rank + 1,
                    "class_id": explained.class_id,
                    "label": label_of(answer.labels, explained.class_id),
                    "probability": float(probabilities[explained.class_id]),
                    "logit": float(image.logits[explained.class_id]),
                    "overlay": str(overlay),
                }
            )
        results.append({"image": str(path), "predictions": entries})
    return ExplainedFiles(model=description, results=results)
