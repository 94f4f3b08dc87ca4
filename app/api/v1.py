"""Version 1 of the API: models, predict, explain."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from app.api.deps import get_service, require_api_key
from app.api.openapi import image_request_body
from app.api.parsing import parse_request
from app.api.schemas import (
    ExplainJsonRequest,
    ExplainOptions,
    ExplainResponse,
    ModelInfo,
    ModelList,
    PredictJsonRequest,
    PredictOptions,
    PredictResponse,
    error_responses,
)
from app.engine.models import LoadedModel
from app.engine.options import CamOptions
from app.serving.batcher import BatchItem
from app.serving.errors import ServiceError
from app.serving.images import ImageDecodeError, check_pixel_count, upright_size
from app.serving.pipeline import RenderOptions, json_bytes, render_result
from app.serving.service import Service, gather_all

router = APIRouter(prefix="/v1", tags=["v1"], dependencies=[Depends(require_api_key)])


@router.get(
    "/models",
    response_model=ModelList,
    response_model_exclude_none=True,
    summary="List the models and their status",
)
async def list_models(service: Service = Depends(get_service)) -> dict[str, Any]:
    return {"models": [entry.describe() for entry in service.registry.entries.values()]}


@router.get(
    "/models/{name}",
    response_model=ModelInfo,
    response_model_exclude_none=True,
    responses=error_responses(401, 404),
    summary="One model: architecture, input size, grid, classes, status, engine path",
)
async def get_model(name: str, service: Service = Depends(get_service)) -> dict[str, Any]:
    return service.registry.get(name).describe(with_labels=True)


@router.post(
    "/models/{name}/predict",
    response_model=PredictResponse,
    responses=error_responses(400, 401, 404, 413, 415, 422, 500, 503, 504),
    openapi_extra=image_request_body(PredictJsonRequest, PredictOptions),
    summary="Top-k class predictions for one or more images",
)
async def predict(name: str, request: Request, service: Service = Depends(get_service)) -> Response:
    return await _serve(request, service, name, explain=False)


@router.post(
    "/models/{name}/explain",
    response_model=ExplainResponse,
    responses=error_responses(400, 401, 404, 413, 415, 422, 500, 503, 504),
    openapi_extra=image_request_body(ExplainJsonRequest, ExplainOptions),
    summary="Predictions and their ViT-ReciproCAM saliency maps, from one shared forward",
)
async def explain(name: str, request: Request, service: Service = Depends(get_service)) -> Response:
    return await _serve(request, service, name, explain=True)


async def _serve(request: Request, service: Service, name: str, *, explain: bool) -> Response:
    loaded, batcher = service.registry.require_ready(name)
    request.state.model = name
    limits = service.settings.limits
    images, options = await parse_request(
        request,
        ExplainOptions if explain else PredictOptions,
        ExplainJsonRequest if explain else PredictJsonRequest,
        max_images=limits.max_images_per_request,
    )
    request.state.images = len(images)
    batcher.check_room(len(images))  # turn a burst away before decoding it
    cam_options: CamOptions | None = None
    render: RenderOptions | None = None
    targets: list[int] | None = None
    _check_top_k(options.top_k, loaded, limits.max_targets if explain else None)
    if isinstance(options, ExplainOptions):
        targets = _checked_targets(options.targets, loaded, limits.max_targets)
        cam_options = _cam_options(options, loaded, service.registry.get(name).settings.target_block)
        render = RenderOptions(
            encodings=tuple(options.encodings),
            map_size=options.map_size,
            colormap=options.colormap,
            opacity=options.opacity,
        )
    sizes: list[tuple[int, int]] = []
    if render is not None and render.map_size != "grid":
        classes = len(targets) if targets is not None else options.top_k
        if render.map_size == "original":  # sizes from the headers, before any pixel is decoded
            try:
                sizes = await service.run_io(
                    _upright_sizes, images, limits.max_pixels, service.allowed_formats
                )
            except ImageDecodeError as exc:
                raise _decode_error(exc, len(images)) from exc
        else:
            height, width = loaded.preprocessor.config.input_size
            sizes = [(width, height)] * len(images)
        _check_map_count(
            sizes,
            render.map_size,
            classes,
            limits.max_map_pixels,
            what="map pixels",
            advice="map_size=input or grid",
        )
        if "json" in render.encodings:
            # as text a JSON number takes about 9 bytes, about 6 times the pixel's 8-bit PNG
            _check_map_count(
                sizes,
                render.map_size,
                classes,
                limits.max_json_map_values,
                what="JSON numbers",
                advice="the png or heatmap encoding, map_size=grid",
            )
    keep_original = render is not None and render.map_size == "original" and "overlay" in render.encodings
    # Originals kept for overlays on the posted image stay in memory until the answer is written:
    # their pixels count against a budget shared by all requests in flight.
    held = sum(width * height for width, height in sizes) if keep_original else 0
    with service.hold_original_pixels(held, name):
        try:
            prepared = await service.prepare_images(images, loaded.preprocessor, keep_original=keep_original)
        except ImageDecodeError as exc:
            raise _decode_error(exc, len(images)) from exc
        items = [
            BatchItem(image=image.pixels, options=cam_options, targets=targets, top_k=options.top_k)
            for image in prepared
        ]
        outcome = await batcher.submit(items, disconnected=request.is_disconnected)
        rendered = await gather_all(
            (
                service.run_io(
                    render_result,
                    result,
                    image,
                    index=index,
                    labels=loaded.labels,
                    top_k=options.top_k,
                    explain_count=None if targets is not None else options.top_k,
                    render=render,
                )
                for index, (result, image) in enumerate(zip(outcome.results, prepared, strict=True))
            )
        )
        service.metrics.images.labels(name, "explain" if explain else "predict").inc(len(items))
        started = getattr(request.state, "started", None) or time.perf_counter()
        body = {
            "model": name,
            "request_id": request.state.request_id,
            "images": rendered,
            "timing": {
                "queue_ms": round(outcome.queue_ms, 3),
                "compute_ms": round(outcome.compute_ms, 3),
                "total_ms": round((time.perf_counter() - started) * 1000.0, 3),
                "batch_images": outcome.batch_images,
            },
        }
        if render is not None and "json" in render.encodings:
            # Maps as numbers can be large (50,000 floats per 224x224 map): encode them off the event loop.
            content = await service.run_io(json_bytes, body)
        else:
            content = json_bytes(body)
        return Response(content, media_type="application/json")


def _upright_sizes(
    images: list[bytes], max_pixels: int, allowed_formats: frozenset[str]
) -> list[tuple[int, int]]:
    """Each image's upright (width, height) from its header, checked against the per-image pixel
    limit (413 whatever the maps); an unreadable header counts as (0, 0), its decoding reports why."""
    sizes = []
    for index, data in enumerate(images):
        size = upright_size(data, allowed_formats) or (0, 0)
        try:
            check_pixel_count(size, max_pixels)
        except ImageDecodeError as exc:
            exc.index = index
            raise
        sizes.append(size)
    return sizes


def _decode_error(exc: ImageDecodeError, count: int) -> ServiceError:
    """The API error of an image that cannot be used, naming it when the request holds several."""
    prefix = f"image {exc.index}: " if count > 1 else ""
    return ServiceError(exc.status, exc.code, f"{prefix}{exc}")


def _check_map_count(
    sizes: list[tuple[int, int]], map_size: str, classes: int, limit: int, *, what: str, advice: str
) -> None:
    """Refuse, before decoding and compute, a request whose maps would hold more than ``limit``
    values (``sizes``: each image's map (width, height); unreadable headers count as 0, and their
    decoding then reports the error). ``what``: the values counted, ``advice``: what to ask for
    instead."""
    total = classes * sum(width * height for width, height in sizes)
    if total > limit:
        raise ServiceError(
            422,
            "maps_too_large",
            f"{len(sizes)} image(s) x {classes} class(es) at map_size={map_size} would be {total} "
            f"{what}, more than the limit of {limit}; ask for {advice}, fewer classes or fewer images "
            "per request",
        )


def _check_top_k(top_k: int, loaded: LoadedModel, max_targets: int | None) -> None:
    if top_k > loaded.num_classes:
        raise ServiceError(
            422, "invalid_options", f"top_k {top_k} is more than the model's {loaded.num_classes} classes"
        )
    if max_targets is not None and top_k > max_targets:
        raise ServiceError(
            422, "invalid_options", f"top_k {top_k} explains more than the limit of {max_targets} classes"
        )


def _checked_targets(targets: list[int] | None, loaded: LoadedModel, max_targets: int) -> list[int] | None:
    if targets is None:
        return None
    if not targets:
        raise ServiceError(422, "invalid_options", "targets is empty; omit it to explain the top_k classes")
    if len(targets) > max_targets:
        raise ServiceError(
            422, "invalid_options", f"{len(targets)} targets; at most {max_targets} classes per image"
        )
    outside = [target for target in targets if not 0 <= target < loaded.num_classes]
    if outside:
        raise ServiceError(
            422,
            "invalid_options",
            f"targets {outside} are outside the model's classes 0..{loaded.num_classes - 1}",
        )
    return list(targets)


def _cam_options(options: ExplainOptions, loaded: LoadedModel, default_block: int) -> CamOptions:
    block = default_block if options.target_block is None else options.target_block
    try:
        loaded.engine.resolve_block(block)
    except ValueError as exc:
        raise ServiceError(422, "invalid_options", str(exc)) from exc
    return CamOptions(
        kernel=options.kernel, keep_prefix=options.keep_prefix, score=options.score, target_block=block
    )
