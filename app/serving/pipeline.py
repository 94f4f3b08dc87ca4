"""The one request pipeline, shared by every protocol and the command line.

A request's life, stage by stage: **admit** (the model is ready, the queue has room), **check** (the
options against the model, the answer's size against the limits), **decode** (posted files, in the
I/O pool, or on the event loop's thread for a small request, or the client's own tensors),
**submit** (the micro-batcher computes predictions and maps in one batch), **render** (maps at the
asked size and their pictures, where the images were decoded). Errors are
:class:`app.serving.errors.ServiceError` subclasses, which each protocol's codec answers in its
own shape.
"""

from __future__ import annotations

import asyncio
import functools

import torch

from app.serving.batch import BatchItem
from app.serving.batcher import DisconnectCheck
from app.serving.device_decode import ImageHeader
from app.serving.device_stage import on_tensor_path, render_on_device
from app.serving.model_card import ServedModel
from app.serving.prepare import PreparedImage, read_headers
from app.serving.request import EncodedImages, InferenceRequest, InferenceResult
from app.serving.service import Service, gather_all
from app.serving.stages import (
    cam_options,
    check_image_count,
    check_map_bounds,
    check_top_k,
    checked_targets,
    explained_classes,
    render_image,
)


async def run(
    service: Service, request: InferenceRequest, *, disconnected: DisconnectCheck | None = None
) -> InferenceResult:
    """Validate, decode, compute and render one request. Raises ``ServiceError``; an image that
    cannot be used raises ``ImageDecodeError`` with its ``index``."""
    limits = service.settings.limits
    # admit
    loaded, batcher = service.registry.require_ready(request.model)
    count = len(request.images)
    check_image_count(count, limits.max_images_per_request)
    batcher.check_room(count)  # turn a burst away before decoding it
    # check
    explain = request.explain
    check_top_k(request.top_k, loaded, limits.max_targets if explain is not None else None)
    options = None
    targets = None
    if explain is not None:
        targets = checked_targets(explain.targets, loaded, limits.max_targets)
        block = service.registry.get(request.model).settings.target_block
        options = cam_options(explain, loaded, block)
    image_device = _image_device(service, request.model, loaded)
    headers = await _posted_headers(service, request, loaded, image_device)
    posted = [header.upright_size if header is not None else (0, 0) for header in headers]
    sizes = _map_sizes(request, loaded, posted)
    check_map_bounds(request, sizes, limits)
    # Small requests on the host path are decoded and rendered right here: handing each step to an
    # I/O thread and back costs more than the step, and the threads contend for the interpreter lock.
    inline = image_device is None and service.inline_io(loaded.device, _io_pixels(request, posted, sizes))
    maps = request.maps
    keep_original = maps is not None and maps.size == "original" and "overlay" in maps.pictures
    # Originals kept for overlays on the posted image stay in memory until the answer is written:
    # their pixels count against a budget shared by all requests in flight.
    held = sum(width * height for width, height in sizes) if keep_original else 0
    with service.hold_original_pixels(held, request.model):
        # decode
        prepared: list[PreparedImage | None]
        if isinstance(request.images, EncodedImages):
            decoded = await service.prepare_images(
                request.images.files,
                loaded.preprocessor,
                keep_original=keep_original,
                device=image_device,
                inline=inline,
                headers=headers or None,
            )
            prepared = list(decoded)
            items = [
                BatchItem(image=image.pixels, options=options, targets=targets, top_k=request.top_k)
                for image in decoded
            ]
        else:
            prepared = [None] * count
            items = [
                BatchItem(
                    image=tensor, options=options, targets=targets, top_k=request.top_k, normalized=True
                )
                for tensor in request.images.tensors
            ]
        # submit
        outcome = await batcher.submit(items, disconnected=disconnected)
        # render: where the images were prepared (the tensor path renders the request's maps on its
        # device in one job; Pillow renders each image on the host, in parallel, or here when small)
        input_size = _input_size(loaded)
        pairs = enumerate(zip(outcome.results, prepared, strict=True))
        if on_tensor_path(prepared):
            rendered = await service.run_io(render_on_device, outcome.results, prepared, request, input_size)
        elif inline:
            await asyncio.sleep(0)  # behind what is already waiting on the loop, as for decoding
            rendered = [
                render_image(index, result, image, request, input_size) for index, (result, image) in pairs
            ]
        else:
            rendered = await gather_all(
                service.run_io(render_image, index, result, image, request, input_size)
                for index, (result, image) in pairs
            )
    kind = "explain" if explain is not None else "predict"
    metrics = service.metrics
    metrics.images.labels(request.model, kind).inc(count)
    metrics.observe_stage(request.model, "queue", outcome.queue_ms / 1000.0 * count, count)
    per_image_compute = outcome.compute_ms / 1000.0 / max(1, outcome.batch_images)
    metrics.observe_stage(request.model, "compute", per_image_compute * count, count)
    for image, rendered_image in zip(prepared, rendered, strict=True):
        if image is not None:
            for stage in ("decode", "preprocess"):
                metrics.observe_stage(request.model, stage, image.cpu_seconds.get(stage, 0.0))
        metrics.observe_stage(request.model, "render", rendered_image.render_seconds)
    return InferenceResult(
        model=request.model,
        images=rendered,
        queue_ms=outcome.queue_ms,
        compute_ms=outcome.compute_ms,
        batch_images=outcome.batch_images,
        labels=list(loaded.labels),
    )


async def _posted_headers(
    service: Service, request: InferenceRequest, loaded: ServedModel, image_device: torch.device | None
) -> list[ImageHeader | None]:
    """Each posted image's header (None where it cannot be read: decoding says why), read before any
    pixel is decoded: on the host path always (it sizes the request's I/O, and the decode stage does
    not read it again), on the tensor path for maps at the original size; empty otherwise. Headers
    are read on the event loop's thread when the files are no more bytes in all than
    ``inline_io_max_pixels`` (a header costs far less per byte than decoding per pixel)."""
    if not isinstance(request.images, EncodedImages):
        return []
    maps = request.maps
    original_maps = maps is not None and request.explain is not None and maps.size == "original"
    if image_device is not None and not original_maps:
        return []
    files = request.images.files
    read = functools.partial(read_headers, files, service.settings.limits.max_pixels, service.allowed_formats)
    if image_device is None and service.inline_io(loaded.device, sum(len(data) for data in files)):
        return read()
    return await service.run_io(read)


def _map_sizes(
    request: InferenceRequest, loaded: ServedModel, posted: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Each image's map (width, height): the posted image's for ``original``, else the model
    input's; empty for grid maps or none."""
    maps = request.maps
    if maps is None or request.explain is None or maps.size == "grid":
        return []
    if maps.size == "original" and isinstance(request.images, EncodedImages):
        return posted
    height, width = _input_size(loaded)
    return [(width, height)] * len(request.images)


def _io_pixels(request: InferenceRequest, posted: list[tuple[int, int]], maps: list[tuple[int, int]]) -> int:
    """The pixels a request's I/O steps handle: its posted images, and each explained class's map."""
    images = sum(width * height for width, height in posted)
    return images + explained_classes(request) * sum(width * height for width, height in maps)


def _image_device(service: Service, model: str, loaded: ServedModel) -> torch.device | None:
    """Where the model's posted images are decoded and preprocessed as tensors (its ``image_path``
    setting); None: with Pillow on the host."""
    choice = service.registry.get(model).settings.image_path
    if choice == "device" or (choice == "auto" and loaded.device.type == "cuda"):
        return loaded.device
    return None


def _input_size(loaded: ServedModel) -> tuple[int, int]:
    height, width = (int(v) for v in loaded.data_config.input_size[-2:])
    return height, width
