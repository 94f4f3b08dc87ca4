"""Version 1 of the API: models, predict, explain."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from app.api.deps import get_service, require_api_key, service_of
from app.api.encoding import json_bytes
from app.api.errors import service_error_response
from app.api.openapi import image_request_body
from app.api.v1.codec import decode_error_message, response_body, to_request
from app.api.v1.parsing import parse_request
from app.api.v1.schemas import (
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
from app.serving import pipeline
from app.serving.images import ImageDecodeError
from app.serving.metrics import timed
from app.serving.service import Service

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
async def predict(name: str, request: Request) -> Response:
    return await _serve(request, service_of(request), name, explain=False)


@router.post(
    "/models/{name}/explain",
    response_model=ExplainResponse,
    responses=error_responses(400, 401, 404, 413, 415, 422, 500, 503, 504),
    openapi_extra=image_request_body(ExplainJsonRequest, ExplainOptions),
    summary="Predictions and their ViT-ReciproCAM saliency maps, from one shared forward",
)
async def explain(name: str, request: Request) -> Response:
    return await _serve(request, service_of(request), name, explain=True)


async def _serve(request: Request, service: Service, name: str, *, explain: bool) -> Response:
    service.registry.require_ready(name)  # before reading the body
    request.state.model = name
    parse_started = time.thread_time()  # the body is already read: parsing does not wait
    images, options = await parse_request(
        request,
        ExplainOptions if explain else PredictOptions,
        ExplainJsonRequest if explain else PredictJsonRequest,
        max_images=service.settings.limits.max_images_per_request,
    )
    request.state.images = len(images)
    service.metrics.observe_stage(name, "parse", time.thread_time() - parse_started, len(images))
    try:
        result = await pipeline.run(
            service, to_request(name, images, options), disconnected=request.is_disconnected
        )
    except ImageDecodeError as exc:
        return service_error_response(request, exc, decode_error_message(exc, len(images)))
    started = getattr(request.state, "started", None) or time.perf_counter()
    body = response_body(result, options, request_id=request.state.request_id, started=started)
    if isinstance(options, ExplainOptions) and "json" in options.encodings:
        # Maps as numbers can be large (50,000 floats per 224x224 map): encode them off the event loop.
        content, seconds = await service.run_io(timed, json_bytes, body)
    else:
        content, seconds = timed(json_bytes, body)
    service.metrics.observe_stage(name, "encode", seconds, len(images))
    return Response(content, media_type="application/json")
