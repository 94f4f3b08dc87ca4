"""Open Inference Protocol v2 (the KServe / Triton REST protocol) on top of the same models and batchers.

Endpoints: ``GET /v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready``,
``GET /v2/models/{name}[/versions/1]`` (model metadata), ``.../ready`` and ``POST .../infer``.

One request holds exactly one input:

* ``image``: BYTES, shape ``[N]`` (or ``[N, 1]``), each element an encoded image file (JPEG, PNG, ...).
  In the JSON body each element is the file in base64 (or ``{"b64": "..."}``); with the binary
  tensor data extension the raw files follow the JSON header, each with a 4-byte little-endian length.
* ``pixel_values``: FP32, shape ``[N, 3, H, W]``, already preprocessed (resized, cropped and
  normalised the way the model expects); ``H, W`` must be the model's input size.

Outputs: ``logits`` and ``probabilities`` (FP32 ``[N, C]``), ``maps`` (FP32 ``[N, K, h, w]``, the
ViT-ReciproCAM score maps of K classes) and ``targets`` (INT64 ``[N, K]``, the class of each map).
Request parameters choose the explained classes (``targets`` or ``top_k``) and the method options.
The classification extension (``outputs[i].parameters.classification = k``) turns ``logits`` or
``probabilities`` into ``[N, k]`` BYTES strings ``"score:index:label"``. Errors are
``{"error": "message"}``. Requests go through the model's micro-batcher, like ``/v1``.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from app.api.deps import get_service, require_api_key, require_api_key_for_health, service_of
from app.api.errors import register_error_shape
from app.api.oip.errors import (
    PROTOCOL_ERRORS,
    OipError,
    OipRoute,
    bad_request,
    oip_error_response,
    oip_error_shape,
)
from app.api.oip.framing import binary_inputs, parse_body
from app.api.oip.inputs import read_images
from app.api.oip.outputs import encode_response, requested_outputs, wants_maps
from app.api.oip.schemas import (
    EXTENSIONS,
    HEADER_LENGTH,
    INPUT_BYTES,
    INPUT_TENSOR,
    MODEL_VERSION,
    OUTPUT_LOGITS,
    OUTPUT_MAPS,
    OUTPUT_PROBABILITIES,
    OUTPUT_TARGETS,
    PLATFORM,
    SERVER_NAME,
    InferenceOptions,
    InferenceRequest,
    ModelMetadata,
    ServerMetadata,
)
from app.serving import pipeline
from app.serving import request as domain
from app.serving.metrics import timed
from app.serving.model_card import ServedModel
from app.serving.registry import ModelEntry
from app.serving.service import Service

PREFIX = "/v2"


def _health_body(description: str, **fields: str) -> dict[int | str, dict[str, Any]]:
    """A health answer's 200: a JSON object such as ``{"ready": true}``, which KServe's client reads
    (tritonclient reads only the status)."""
    properties = {name: {"type": kind} for name, kind in fields.items()}
    schema = {"type": "object", "properties": properties, "required": list(fields)}
    return {200: {"description": description, "content": {"application/json": {"schema": schema}}}}


_LIVE = _health_body('live: {"live": true}', live="boolean")
_READY = _health_body('ready: {"ready": true}', ready="boolean")
_MODEL_READY = _health_body('ready: {"name": ..., "ready": true}', name="string", ready="boolean")

router = APIRouter(
    prefix=PREFIX, tags=["Open Inference Protocol v2"], route_class=OipRoute, responses=PROTOCOL_ERRORS
)
register_error_shape(PREFIX, oip_error_shape)  # errors answered before routing take the shape too


@router.get(
    "", response_model=ServerMetadata, dependencies=[Depends(require_api_key)], summary="Server metadata"
)
@router.get(
    "/", response_model=ServerMetadata, dependencies=[Depends(require_api_key)], include_in_schema=False
)
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": request.app.version, "extensions": EXTENSIONS}


@router.get(
    "/health/live",
    response_class=Response,
    responses=_LIVE,
    dependencies=[Depends(require_api_key_for_health)],
    summary="Liveness: 200 while the process serves requests",
)
async def server_live() -> Response:
    return JSONResponse({"live": True})


@router.get(
    "/health/ready",
    response_class=Response,
    responses=_READY,
    dependencies=[Depends(require_api_key_for_health)],
    summary="Readiness: 200 when every model has settled, one at least serves, and not draining; else 400",
)
async def server_ready(service: Service = Depends(get_service)) -> Response:
    if not service.ready:
        return oip_error_response(400, "the server is not ready")
    return JSONResponse({"ready": True})


@router.get(
    "/models/{name}",
    response_model=ModelMetadata,
    dependencies=[Depends(require_api_key)],
    summary="Model metadata: inputs and outputs with names, datatypes and shapes",
)
async def model_metadata(name: str, service: Service = Depends(get_service)) -> dict[str, Any]:
    loaded, _ = service.registry.require_ready(name)
    return describe_model(name, loaded)


@router.get(
    "/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    dependencies=[Depends(require_api_key)],
    summary="Model metadata of one version (every model has version 1)",
)
async def model_version_metadata(
    name: str, version: str, service: Service = Depends(get_service)
) -> dict[str, Any]:
    _check_version(service, name, version)
    return await model_metadata(name, service)


@router.get(
    "/models/{name}/ready",
    response_class=Response,
    responses=_MODEL_READY,
    dependencies=[Depends(require_api_key_for_health)],
    summary="Model readiness: 200 ready, 400 not ready, 404 unknown",
)
async def model_ready(name: str, service: Service = Depends(get_service)) -> Response:
    entry = _probed_entry(service, name)
    if entry.status != "ready" or service.draining:
        return oip_error_response(400, f"model {name!r} is not ready ({entry.status})")
    return JSONResponse({"name": name, "ready": True})


@router.get(
    "/models/{name}/versions/{version}/ready",
    response_class=Response,
    responses=_MODEL_READY,
    dependencies=[Depends(require_api_key_for_health)],
    summary="Model readiness of one version",
)
async def model_version_ready(name: str, version: str, service: Service = Depends(get_service)) -> Response:
    _probed_entry(service, name)
    _require_version(name, version)
    return await model_ready(name, service)


def _probed_entry(service: Service, name: str) -> ModelEntry:
    """The model a readiness probe asks about. Probes may need no key, so an unknown name is a 404
    that does not list the models (the key-protected routes do)."""
    entry = service.registry.entries.get(name)
    if entry is None:
        raise OipError(404, f"no model named {name!r}")
    return entry


def describe_model(name: str, loaded: ServedModel) -> dict[str, Any]:
    height, width = (int(v) for v in loaded.data_config.input_size[-2:])
    grid_h, grid_w = (int(v) for v in loaded.anatomy.grid_size)
    classes = int(loaded.num_classes)
    return {
        "name": name,
        "versions": [MODEL_VERSION],
        "platform": PLATFORM,
        "inputs": [
            {"name": INPUT_BYTES, "datatype": "BYTES", "shape": [-1]},
            {"name": INPUT_TENSOR, "datatype": "FP32", "shape": [-1, 3, height, width]},
        ],
        "outputs": [
            {"name": OUTPUT_LOGITS, "datatype": "FP32", "shape": [-1, classes]},
            {"name": OUTPUT_PROBABILITIES, "datatype": "FP32", "shape": [-1, classes]},
            {"name": OUTPUT_MAPS, "datatype": "FP32", "shape": [-1, -1, grid_h, grid_w]},
            {"name": OUTPUT_TARGETS, "datatype": "INT64", "shape": [-1, -1]},
        ],
    }


def _check_version(service: Service, name: str, version: str) -> None:
    service.registry.get(name)
    _require_version(name, version)


def _require_version(name: str, version: str) -> None:
    if version != MODEL_VERSION:
        raise OipError(404, f"model {name!r} has no version {version!r} (versions: {MODEL_VERSION})")


_INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "Inference request JSON; with the binary tensor data extension, the JSON header "
        f"({HEADER_LENGTH} bytes) followed by the inputs' binary data.",
        "content": {
            "application/json": {"schema": InferenceRequest.model_json_schema()},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post(
    "/models/{name}/infer",
    dependencies=[Depends(require_api_key)],
    openapi_extra=_INFER_BODY,
    summary="Inference: logits, probabilities and ViT-ReciproCAM maps from one batched forward",
)
async def infer(name: str, request: Request) -> Response:
    return await _infer(name, request, service_of(request))


@router.post(
    "/models/{name}/versions/{version}/infer",
    dependencies=[Depends(require_api_key)],
    openapi_extra=_INFER_BODY,
    summary="Inference on one version (every model has version 1)",
)
async def infer_version(name: str, version: str, request: Request) -> Response:
    service = service_of(request)
    _check_version(service, name, version)
    return await _infer(name, request, service)


def _check_body_model(inference: InferenceRequest, name: str) -> None:
    """KServe's client names the model in the body too: it must be the one of the path."""
    if inference.model_name is not None and inference.model_name != name:
        raise bad_request(f"the request body names model {inference.model_name!r}, the path {name!r}")
    if inference.model_version not in (None, "", MODEL_VERSION):
        raise bad_request(
            f"the request body names version {inference.model_version!r}; {name!r} has version {MODEL_VERSION}"
        )


async def _infer(name: str, request: Request, service: Service) -> Response:
    service.registry.require_ready(name)  # before reading the body
    request.state.model = name
    limits = service.settings.limits
    body = await request.body()
    # Parsing and encoding large tensors run in the I/O pool, off the event loop.
    (inference, options, binary), parse_seconds = await service.run_io(
        timed,
        parse_body,
        body,
        request.headers.get("content-encoding", ""),
        request.headers.get(HEADER_LENGTH.lower()),
        limits.max_body_bytes,
    )
    _check_body_model(inference, name)
    outputs = requested_outputs(inference, options)
    if len(inference.inputs) != 1:
        raise bad_request(
            f"expected exactly one input ({INPUT_BYTES!r} BYTES or {INPUT_TENSOR!r} FP32), "
            f"got {len(inference.inputs)}"
        )
    tensor_input = inference.inputs[0]
    raw = binary_inputs(inference.inputs, binary)[0]
    loaded, _ = service.registry.require_ready(name)
    images, read_seconds = await service.run_io(
        timed, read_images, tensor_input, raw, loaded, limits.max_images_per_request
    )
    request.state.images = len(images)
    service.metrics.observe_stage(name, "parse", parse_seconds + read_seconds, len(images))
    result = await pipeline.run(
        service,
        _to_request(name, images, options, wants_maps(outputs), outputs),
        disconnected=request.is_disconnected,
    )
    header: dict[str, Any] = {"model_name": name, "model_version": MODEL_VERSION}
    if inference.id is not None:
        header["id"] = inference.id
    started = getattr(request.state, "started", None) or time.perf_counter()
    header["parameters"] = {
        "queue_ms": round(result.queue_ms, 3),
        "compute_ms": round(result.compute_ms, 3),
        "total_ms": round((time.perf_counter() - started) * 1000.0, 3),
        "batch_images": result.batch_images,
    }
    response: Response
    response, seconds = await service.run_io(timed, encode_response, header, result, outputs)
    service.metrics.observe_stage(name, "encode", seconds, len(images))
    return response


def _to_request(
    name: str,
    images: domain.EncodedImages | domain.PixelTensors,
    options: InferenceOptions,
    explain: bool,
    outputs: list[Any],
) -> domain.InferenceRequest:
    if not explain:
        return domain.InferenceRequest(model=name, images=images)
    maps_output = next((output for output in outputs if output.name == OUTPUT_MAPS), None)
    return domain.InferenceRequest(
        model=name,
        images=images,
        # the top k matter only for the classes explained: every logit is returned
        top_k=options.top_k if options.targets is None else 1,
        explain=domain.ExplainOptions(
            kernel=options.kernel,
            keep_prefix=options.keep_prefix,
            score=options.score,
            target_block=options.target_block,
            targets=options.targets,
        ),
        maps=domain.MapOptions(
            normalize=options.normalize,
            size=options.map_size,
            numbers=maps_output is not None and not maps_output.binary,
            bound_pixels=False,
        ),
    )
