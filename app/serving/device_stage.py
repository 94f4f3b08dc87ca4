"""The render stage of the tensor path: a request's maps sized, coloured, blended and encoded with
:func:`app.serving.device_render.render_maps` on the device its images were prepared on (see
docs/image-path.md), giving the answer :func:`app.serving.stages.render_one` gives on the host."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from app.engine.maps import normalize_maps
from app.engine.results import ImageExplanation
from app.serving.device_render import RenderedMaps, render_maps
from app.serving.maps import shape_maps
from app.serving.prepare import PreparedImage
from app.serving.request import ImageResult, InferenceRequest, MapOptions, MapResult
from app.serving.stages import explained_classes


def on_tensor_path(prepared: Sequence[PreparedImage | None]) -> bool:
    """Whether a request's images were all prepared by the tensor path (so render there too)."""
    return bool(prepared) and all(image is not None and image.device is not None for image in prepared)


def render_on_device(
    results: Sequence[ImageExplanation],
    prepared: Sequence[PreparedImage | None],
    request: InferenceRequest,
    input_size: tuple[int, int],
) -> list[ImageResult]:
    """Every image's result of a request (see :func:`render_one`'s answer), each image credited with
    an even share of the CPU time the request's rendering took."""
    started = time.thread_time()
    images = [image for image in prepared if image is not None]
    if len(images) != len(results):
        raise ValueError("the tensor path renders posted images only")
    rendered = _render(results, images, request, input_size)
    share = (time.thread_time() - started) / max(1, len(rendered))
    for image in rendered:
        image.render_seconds = share
    return rendered


def _render(
    results: Sequence[ImageExplanation],
    images: list[PreparedImage],
    request: InferenceRequest,
    input_size: tuple[int, int],
) -> list[ImageResult]:
    maps = request.maps
    if maps is None or request.explain is None:
        return [
            ImageResult(index=index, logits=result.logits, maps=None, prepared=image)
            for index, (result, image) in enumerate(zip(results, images, strict=True))
        ]
    count = explained_classes(request)
    raws = []
    for result in results:
        if result.score_maps is None or result.targets is None:
            raise RuntimeError("the engine returned no maps for an explained image")
        raws.append(result.score_maps[:count].float())
    device = images[0].device
    raw = torch.stack(raws).to(device)  # (N, K, h, w): the engine hands its results to the host
    normalized = normalize_maps(raw)
    low, high = (part.cpu() for part in raw.flatten(2).aminmax(dim=-1))
    if maps.size == "original":  # each image its own size
        per_image = [
            _render_maps(normalized[row], image, maps, original=image.original_pixels)
            for row, image in enumerate(images)
        ]
    else:
        per_image = _render_together(normalized, images, maps, count)
    grid = (int(raw.shape[-2]), int(raw.shape[-1]))
    answers = []
    for row, (result, image, drawn) in enumerate(zip(results, images, per_image, strict=True)):
        if maps.normalize:
            values = drawn.maps
        else:
            values = shape_maps(
                raw[row], maps.size, input_size=input_size, geometry=image.geometry, normalize=False
            )
        values = values.cpu()
        assert result.targets is not None
        entries = [
            MapResult(
                class_id=int(class_id),
                grid=grid,
                score_range=(float(low[row, position]), float(high[row, position])),
                values=values[position],
                pictures=drawn.images[position],
            )
            for position, class_id in enumerate(result.targets[:count].tolist())
        ]
        answers.append(ImageResult(index=row, logits=result.logits, maps=entries, prepared=image))
    return answers


def _render_together(
    normalized: torch.Tensor, images: list[PreparedImage], maps: MapOptions, count: int
) -> list[RenderedMaps]:
    """Grid and input-size maps of all the request's images in one call (they share the model
    input's size; a JPEG batch is one encoder call), split back per image."""
    pixels = None
    if "overlay" in maps.pictures:
        pixels = torch.stack([image.pixels for image in images]).repeat_interleave(count, dim=0)
    together = _render_maps(normalized.flatten(0, 1), images[0], maps, input_pixels=pixels)
    return [
        RenderedMaps(
            together.maps[row * count : (row + 1) * count],
            together.images[row * count : (row + 1) * count],
        )
        for row in range(len(images))
    ]


def _render_maps(
    normalized: torch.Tensor,
    image: PreparedImage,
    maps: MapOptions,
    *,
    input_pixels: torch.Tensor | None = None,
    original: torch.Tensor | None = None,
) -> RenderedMaps:
    return render_maps(
        normalized,
        image.geometry,
        encodings=maps.pictures,
        map_size=maps.size,
        colormap=maps.colormap,
        opacity=maps.opacity,
        input_pixels=image.pixels if input_pixels is None else input_pixels,
        original=original,
        image_format=maps.picture_format,
        quality=maps.jpeg_quality,
    )
