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

import json
import logging
import math
import struct
import time
import zlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.deps import get_service, require_api_key, require_api_key_for_health
from app.api.errors import describe_validation_errors
from app.api.parsing import decode_base64
from app.engine.models import LoadedModel
from app.engine.reciprocam import CamOptions, ImageExplanation, normalize_maps, upsample_maps
from app.serving.batcher import BatchItem
from app.serving.errors import ServiceError
from app.serving.images import ImageDecodeError
from app.serving.pipeline import json_bytes
from app.serving.registry import ModelEntry
from app.serving.service import Service

logger = logging.getLogger(__name__)

SERVER_NAME = "vit-reciprocam-service"
EXTENSIONS = ["classification", "binary_tensor_data"]
MODEL_VERSION = "1"
PLATFORM = "pytorch_timm"

INPUT_BYTES = "image"
INPUT_TENSOR = "pixel_values"
OUTPUT_LOGITS = "logits"
OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_MAPS = "maps"
# pixel_values are normalised pixels, within a few units of 0; beyond this, only overflow is gained
MAX_PIXEL_VALUE = 1e4
OUTPUT_TARGETS = "targets"
OUTPUTS = (OUTPUT_LOGITS, OUTPUT_PROBABILITIES, OUTPUT_MAPS, OUTPUT_TARGETS)
HEADER_LENGTH = "Inference-Header-Content-Length"

_NUMPY_TYPES = {"FP32": "<f4", "INT64": "<i8"}


# --------------------------------------------------------------------------- errors
class OipError(Exception):
    """An error answered as the protocol's ``{"error": "message"}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def bad_request(message: str) -> OipError:
    return OipError(400, message)


def oip_error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _as_oip_error(exc: Exception) -> OipError | None:
    if isinstance(exc, OipError):
        return exc
    if isinstance(exc, ServiceError):
        # The protocol answers invalid requests with 400; /v1 distinguishes 422 (invalid options).
        status = 400 if exc.status == 422 else exc.status
        return OipError(status, exc.message, exc.headers)
    if isinstance(exc, ImageDecodeError):
        return OipError(exc.status, str(exc))
    if isinstance(exc, (RequestValidationError, ValidationError)):
        return OipError(400, describe_validation_errors(list(exc.errors())))
    if isinstance(exc, StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        return OipError(exc.status_code, detail, dict(exc.headers or {}))
    return None


class OipRoute(APIRoute):
    """Routes whose errors (auth and validation included) take the protocol's error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                error = _as_oip_error(exc)
                if error is None:
                    logger.exception("unhandled error in %s: %s", request.url.path, type(exc).__name__)
                    return oip_error_response(500, "internal server error")
                return oip_error_response(error.status, error.message, error.headers)

        return handle


class ProtocolError(BaseModel):
    """The protocol's error body."""

    error: str = Field(description="what went wrong", examples=["unknown model 'resnet'"])


_ERROR_DESCRIPTIONS = {
    400: "invalid request, or (readiness endpoints) not ready",
    401: "missing or wrong API key",
    404: "unknown model or version",
    413: "request too large",
    500: "internal error",
    503: "model loading or unavailable, queue full, or out of memory (Retry-After)",
    504: "the request could not start before its deadline (Retry-After)",
}
PROTOCOL_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ProtocolError, "description": text} for status, text in _ERROR_DESCRIPTIONS.items()
}


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
    prefix="/v2", tags=["Open Inference Protocol v2"], route_class=OipRoute, responses=PROTOCOL_ERRORS
)


# --------------------------------------------------------------------------- schemas
class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a variable dimension")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = Field(None, description="row-major tensor data, flat or nested; absent with binary data")


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    # KServe's client names the model in the body too; it must be the one in the path.
    model_name: str | None = None
    model_version: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class InferenceOptions(BaseModel):
    """Request ``parameters`` this server reads (others, such as ``priority``, are ignored)."""

    model_config = ConfigDict(extra="ignore")

    top_k: int = Field(1, ge=1, description="explain the top_k predicted classes (unless targets)")
    targets: list[int] | None = Field(None, description="class ids to explain: a list or 'a,b'")
    kernel: Literal["gaussian", "dirac"] = "gaussian"
    keep_prefix: bool = True
    score: Literal["logit", "probability"] = "logit"
    target_block: int | None = None
    normalize: bool = Field(False, description="min-max normalise each map into [0, 1]")
    map_size: Literal["grid", "input"] = Field("grid", description="maps on the patch grid or input size")
    binary_data_output: bool = False

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip().strip("[]")
            return [part.strip() for part in text.split(",") if part.strip()]
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
        return value


# --------------------------------------------------------------------------- health and metadata
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


def describe_model(name: str, loaded: LoadedModel) -> dict[str, Any]:
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


# --------------------------------------------------------------------------- inference
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
async def infer(name: str, request: Request, service: Service = Depends(get_service)) -> Response:
    return await _infer(name, request, service)


@router.post(
    "/models/{name}/versions/{version}/infer",
    dependencies=[Depends(require_api_key)],
    openapi_extra=_INFER_BODY,
    summary="Inference on one version (every model has version 1)",
)
async def infer_version(
    name: str, version: str, request: Request, service: Service = Depends(get_service)
) -> Response:
    _check_version(service, name, version)
    return await _infer(name, request, service)


def _check_body_model(inference: InferenceRequest, name: str) -> None:
    if inference.model_name is not None and inference.model_name != name:
        raise bad_request(f"the request body names model {inference.model_name!r}, the path {name!r}")
    if inference.model_version not in (None, "", MODEL_VERSION):
        raise bad_request(
            f"the request body names version {inference.model_version!r}; {name!r} has version {MODEL_VERSION}"
        )


@dataclass
class _Output:
    name: str
    binary: bool
    classification: int


async def _infer(name: str, request: Request, service: Service) -> Response:
    loaded, batcher = service.registry.require_ready(name)
    request.state.model = name
    limits = service.settings.limits
    body = await request.body()
    # Parsing and encoding large tensors run in the I/O pool, off the event loop.
    inference, options, binary = await service.run_io(
        _parse_body,
        body,
        request.headers.get("content-encoding", ""),
        request.headers.get(HEADER_LENGTH.lower()),
        limits.max_body_bytes,
    )
    _check_body_model(inference, name)
    outputs = _requested_outputs(inference, options)
    want_maps = any(output.name in (OUTPUT_MAPS, OUTPUT_TARGETS) for output in outputs)
    cam_options, targets = _explain_options(service, name, loaded, options, want_maps)

    if len(inference.inputs) != 1:
        raise bad_request(
            f"expected exactly one input ({INPUT_BYTES!r} BYTES or {INPUT_TENSOR!r} FP32), "
            f"got {len(inference.inputs)}"
        )
    tensor_input = inference.inputs[0]
    raw = _binary_inputs(inference.inputs, binary)[0]
    declared = tensor_input.shape[0] if tensor_input.shape else None
    if isinstance(declared, int) and 0 < declared <= limits.max_images_per_request:
        # before any decoding, as /v1 does: room in the queue, and an answer of bounded size (a
        # malformed input is refused by its own checks below)
        batcher.check_room(declared)
        _check_json_maps(outputs, options, targets, declared, loaded, limits.max_json_map_values)
    if tensor_input.name == INPUT_BYTES:
        tensors = await _images_from_bytes(tensor_input, raw, service, loaded)
    elif tensor_input.name == INPUT_TENSOR:
        tensors = await service.run_io(
            _images_from_tensor, tensor_input, raw, loaded, limits.max_images_per_request
        )
    else:
        raise bad_request(
            f"unknown input {tensor_input.name!r}; this model takes {INPUT_BYTES!r} (BYTES, encoded "
            f"image files) or {INPUT_TENSOR!r} (FP32 [N, 3, H, W])"
        )
    request.state.images = len(tensors)

    items = [
        BatchItem(image=tensor, options=cam_options, targets=targets, top_k=options.top_k)
        for tensor in tensors
    ]
    outcome = await batcher.submit(items, disconnected=request.is_disconnected)
    service.metrics.images.labels(name, "explain" if want_maps else "predict").inc(len(items))
    header: dict[str, Any] = {"model_name": name, "model_version": MODEL_VERSION}
    if inference.id is not None:
        header["id"] = inference.id
    started = getattr(request.state, "started", None) or time.perf_counter()
    header["parameters"] = {
        "queue_ms": round(outcome.queue_ms, 3),
        "compute_ms": round(outcome.compute_ms, 3),
        "total_ms": round((time.perf_counter() - started) * 1000.0, 3),
        "batch_images": outcome.batch_images,
    }
    return await service.run_io(_encode_response, header, outcome.results, outputs, options, targets, loaded)


def _encode_response(
    header: dict[str, Any],
    results: list[ImageExplanation],
    outputs: list[_Output],
    options: InferenceOptions,
    targets: list[int] | None,
    loaded: LoadedModel,
) -> Response:
    """The response: JSON, or JSON header + binary data when an output asks for binary data."""
    arrays = _output_arrays(results, outputs, options, targets, loaded)
    tensors_out: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for output in outputs:
        array, datatype = arrays[output.name]
        if output.classification:
            array, datatype = _classification(array, output.classification, loaded.labels), "BYTES"
        entry: dict[str, Any] = {"name": output.name, "datatype": datatype, "shape": list(array.shape)}
        if output.binary:
            data = _serialize(array, datatype)
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = _json_data(array, datatype)
        tensors_out.append(entry)
    header["outputs"] = tensors_out
    head = json_bytes(header)
    if not chunks:
        return Response(head, media_type="application/json")
    return Response(
        b"".join([head, *chunks]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
    )


def _parse_body(
    body: bytes, content_encoding: str, declared: str | None, max_bytes: int
) -> tuple[InferenceRequest, InferenceOptions, bytes]:
    """The validated request, its options, and the binary data after the JSON header (empty without
    the binary extension)."""
    encoding = content_encoding.strip().lower()
    if encoding in ("gzip", "deflate"):
        body = _decompress(body, encoding, max_bytes)
    elif encoding not in ("", "identity"):
        raise OipError(415, f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    if not body:
        raise bad_request("the request body is empty; send an inference request JSON object")
    if declared is None:
        header, binary = body, b""
    else:
        digits = declared.strip()
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 20) or not 0 < int(digits) <= len(
            body
        ):
            raise bad_request(
                f"{HEADER_LENGTH} {declared!r} must be a positive byte count no larger than the body "
                f"({len(body)} bytes)"
            )
        length = int(digits)
        header, binary = body[:length], body[length:]
    try:
        document = json.loads(header)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise bad_request(f"the inference request header is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise bad_request("the inference request header is nested too deeply") from exc
    if not isinstance(document, dict):
        raise bad_request("the inference request must be a JSON object with an 'inputs' list")
    try:
        inference = InferenceRequest.model_validate(document)
        options = InferenceOptions.model_validate(inference.parameters or {})
    except ValidationError as exc:
        raise bad_request(describe_validation_errors(list(exc.errors()))) from exc
    return inference, options, binary


def _decompress(body: bytes, encoding: str, max_bytes: int) -> bytes:
    decoder = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = decoder.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise bad_request(f"the body is not valid {encoding} data: {exc}") from exc
    if len(data) > max_bytes or decoder.unconsumed_tail:
        raise OipError(413, f"the decompressed body is larger than the limit of {max_bytes} bytes")
    return data


def _binary_inputs(inputs: list[RequestInput], binary: bytes) -> list[bytes | None]:
    """Each input's slice of the binary data, in input order (None for inputs with JSON data)."""
    slices: list[bytes | None] = []
    offset = 0
    for tensor in inputs:
        parameters = tensor.parameters or {}
        if "shared_memory_region" in parameters:
            raise bad_request("shared memory inputs are not supported by this server")
        size = parameters.get("binary_data_size")
        if size is None:
            if tensor.data is None:
                raise bad_request(f"input {tensor.name!r} has neither 'data' nor binary data")
            slices.append(None)
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise bad_request(f"input {tensor.name!r}: binary_data_size must be a byte count")
        if offset + size > len(binary):
            raise bad_request(
                f"input {tensor.name!r} declares {size} bytes of binary data, but only "
                f"{len(binary) - offset} follow the JSON header"
            )
        slices.append(binary[offset : offset + size])
        offset += size
    if offset != len(binary):
        raise bad_request(
            f"{len(binary) - offset} bytes after the JSON header belong to no input "
            f"(check {HEADER_LENGTH} and binary_data_size)"
        )
    return slices


def _shape_size(shape: list[int], name: str) -> int:
    if any(dim < 0 for dim in shape):
        raise bad_request(f"input {name!r}: shape {shape} has a negative dimension")
    return math.prod(shape)


async def _images_from_bytes(
    tensor: RequestInput, raw: bytes | None, service: Service, loaded: LoadedModel
) -> list[torch.Tensor]:
    limits = service.settings.limits
    if tensor.datatype != "BYTES":
        raise bad_request(f"input {INPUT_BYTES!r} must have datatype BYTES, not {tensor.datatype!r}")
    shape = tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise bad_request(f"input {INPUT_BYTES!r} must have shape [N] (or [N, 1]), not {shape}")
    count = _shape_size(shape, INPUT_BYTES)
    if count < 1:
        raise bad_request(f"input {INPUT_BYTES!r} holds no image")
    if count > limits.max_images_per_request:
        raise OipError(413, f"{count} images in one request; the limit is {limits.max_images_per_request}")
    files = _split_bytes(raw, count) if raw is not None else _bytes_from_json(tensor.data, count)
    try:
        prepared = await service.prepare_images(files, loaded.preprocessor)
    except ImageDecodeError as exc:
        raise OipError(exc.status, f"image {exc.index}: {exc}") from exc
    return [image.pixels for image in prepared]  # uint8: normalised with the batch


def _split_bytes(raw: bytes, count: int) -> list[bytes]:
    """BYTES elements of the binary extension: each a 4-byte little-endian length, then the bytes."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise bad_request("BYTES data ends inside an element's 4-byte length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise bad_request(
                f"BYTES element {len(elements)} declares {length} bytes, but only {len(raw) - offset} remain"
            )
        elements.append(raw[offset : offset + length])
        offset += length
    if len(elements) != count:
        raise bad_request(f"the shape says {count} BYTES elements, but the binary data holds {len(elements)}")
    return elements


def _bytes_from_json(data: Any, count: int) -> list[bytes]:
    flat = _flatten(data)
    if len(flat) != count:
        raise bad_request(f"the shape says {count} BYTES elements, but 'data' holds {len(flat)}")
    files = []
    for index, element in enumerate(flat):
        if isinstance(element, dict) and isinstance(element.get("b64"), str):
            element = element["b64"]
        if not isinstance(element, str):
            raise bad_request(
                f"BYTES element {index} must be the image file in base64 (a string or {{'b64': ...}})"
            )
        try:
            files.append(decode_base64(element, index))
        except ServiceError as exc:
            raise bad_request(exc.message) from exc
    return files


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for element in stack[-1]:
            if isinstance(element, list):
                stack.append(iter(element))
                break
            flat.append(element)
        else:
            stack.pop()
    return flat


def _images_from_tensor(
    tensor: RequestInput, raw: bytes | None, loaded: LoadedModel, max_images: int
) -> list[torch.Tensor]:
    if tensor.datatype != "FP32":
        raise bad_request(f"input {INPUT_TENSOR!r} must have datatype FP32, not {tensor.datatype!r}")
    height, width = (int(v) for v in loaded.data_config.input_size[-2:])
    shape = tensor.shape
    if len(shape) != 4 or shape[1] != 3 or shape[2] != height or shape[3] != width:
        raise bad_request(
            f"input {INPUT_TENSOR!r} must have shape [N, 3, {height}, {width}] for this model, not {shape}"
        )
    count = shape[0]
    if count < 1:
        raise bad_request(f"input {INPUT_TENSOR!r} holds no image")
    if count > max_images:
        raise OipError(413, f"{count} images in one request; the limit is {max_images}")
    expected = math.prod(shape)
    if raw is not None:
        if len(raw) != 4 * expected:
            raise bad_request(
                f"input {INPUT_TENSOR!r}: shape {shape} needs {4 * expected} bytes of FP32 data, got {len(raw)}"
            )
        array = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    else:
        try:
            array = np.asarray(tensor.data, dtype=np.float32)
        except (ValueError, TypeError, OverflowError) as exc:
            raise bad_request(f"input {INPUT_TENSOR!r}: 'data' is not a list of numbers ({exc})") from exc
        if array.size != expected:
            raise bad_request(
                f"input {INPUT_TENSOR!r}: shape {shape} needs {expected} values, 'data' holds {array.size}"
            )
    if not np.isfinite(array).all():
        raise bad_request(f"input {INPUT_TENSOR!r} holds NaN or infinite values")
    if array.size and float(np.abs(array).max()) > MAX_PIXEL_VALUE:
        raise bad_request(
            f"input {INPUT_TENSOR!r} holds values beyond +-{MAX_PIXEL_VALUE:g}: it takes normalised pixels "
            "(a few units at most), and values this large only make the model's outputs overflow"
        )
    images = torch.from_numpy(array.reshape(shape).copy())
    return list(images.unbind(0))


def _check_json_maps(
    outputs: list[_Output],
    options: InferenceOptions,
    targets: list[int] | None,
    images: int,
    loaded: LoadedModel,
    limit: int,
) -> None:
    """400 for maps at input size asked for as JSON numbers beyond ``limit`` values (binary_data
    sends them as 4 bytes each instead of about 19 bytes of text: /v2 writes float32 values at full
    precision)."""
    maps = next((output for output in outputs if output.name == OUTPUT_MAPS), None)
    if maps is None or maps.binary or options.map_size != "input":
        return
    classes = len(targets) if targets is not None else options.top_k
    height, width = (int(v) for v in loaded.data_config.input_size[-2:])
    total = images * classes * height * width
    if total > limit:
        raise bad_request(
            f"output {OUTPUT_MAPS!r}: {images} image(s) x {classes} class(es) x {height}x{width} is "
            f"{total} JSON numbers, more than the limit of {limit}; ask for it with binary_data, at "
            "map_size grid, or for fewer classes or images"
        )


def _requested_outputs(inference: InferenceRequest, options: InferenceOptions) -> list[_Output]:
    if inference.outputs is None:
        return [_Output(name, options.binary_data_output, 0) for name in OUTPUTS]
    if not inference.outputs:
        raise bad_request("'outputs' is empty; leave it out to receive every output")
    outputs: list[_Output] = []
    for requested in inference.outputs:
        if requested.name not in OUTPUTS:
            raise bad_request(f"unknown output {requested.name!r}; outputs: {', '.join(OUTPUTS)}")
        if any(output.name == requested.name for output in outputs):
            raise bad_request(f"output {requested.name!r} is requested twice")
        parameters = requested.parameters or {}
        if "shared_memory_region" in parameters:
            raise bad_request("shared memory outputs are not supported by this server")
        binary = parameters.get("binary_data", options.binary_data_output)
        if not isinstance(binary, bool):
            raise bad_request(f"output {requested.name!r}: binary_data must be true or false")
        classification = parameters.get("classification", 0)
        if isinstance(classification, bool) or not isinstance(classification, int) or classification < 0:
            raise bad_request(f"output {requested.name!r}: classification must be a class count")
        if classification and requested.name not in (OUTPUT_LOGITS, OUTPUT_PROBABILITIES):
            raise bad_request(
                f"classification applies to {OUTPUT_LOGITS!r} and {OUTPUT_PROBABILITIES!r}, "
                f"not {requested.name!r}"
            )
        outputs.append(_Output(requested.name, binary, classification))
    return outputs


def _explain_options(
    service: Service, name: str, loaded: LoadedModel, options: InferenceOptions, want_maps: bool
) -> tuple[CamOptions | None, list[int] | None]:
    if not want_maps:
        return None, None
    max_targets = service.settings.limits.max_targets
    classes = loaded.num_classes
    targets = options.targets
    if targets is not None:
        if not targets:
            raise bad_request("targets is empty; leave it out to explain the top_k classes")
        if len(targets) > max_targets:
            raise bad_request(f"{len(targets)} targets; at most {max_targets} classes per image")
        outside = [target for target in targets if not 0 <= target < classes]
        if outside:
            raise bad_request(f"targets {outside} are outside the model's classes 0..{classes - 1}")
    elif options.top_k > min(classes, max_targets):
        raise bad_request(
            f"top_k {options.top_k} is more than the model's {classes} classes or the limit of "
            f"{max_targets} explained classes"
        )
    block = options.target_block
    if block is None:
        block = service.registry.get(name).settings.target_block
    try:
        loaded.engine.resolve_block(block)
        cam = CamOptions(
            kernel=options.kernel, keep_prefix=options.keep_prefix, score=options.score, target_block=block
        )
    except ValueError as exc:
        raise bad_request(str(exc)) from exc
    return cam, list(targets) if targets is not None else None


def _output_arrays(
    results: list[ImageExplanation],
    outputs: list[_Output],
    options: InferenceOptions,
    targets: list[int] | None,
    loaded: LoadedModel,
) -> dict[str, tuple[np.ndarray, str]]:
    logits = torch.stack([result.logits.float() for result in results])
    arrays: dict[str, tuple[np.ndarray, str]] = {
        OUTPUT_LOGITS: (logits.numpy(), "FP32"),
        OUTPUT_PROBABILITIES: (logits.softmax(-1).numpy(), "FP32"),
    }
    if any(output.name in (OUTPUT_MAPS, OUTPUT_TARGETS) for output in outputs):
        count = len(targets) if targets is not None else options.top_k
        maps, classes = [], []
        for result in results:
            if result.score_maps is None or result.targets is None:
                raise RuntimeError("the engine returned no maps for an explained image")
            maps.append(result.score_maps[:count].float())
            classes.append(result.targets[:count].long())
        stacked = torch.stack(maps)
        if options.normalize:
            stacked = normalize_maps(stacked)
        if options.map_size == "input":
            size = tuple(int(v) for v in loaded.data_config.input_size[-2:])
            stacked = upsample_maps(stacked, size)  # type: ignore[arg-type]
            if options.normalize:
                stacked = stacked.clamp_(0.0, 1.0)
        arrays[OUTPUT_MAPS] = (stacked.numpy(), "FP32")
        arrays[OUTPUT_TARGETS] = (torch.stack(classes).numpy(), "INT64")
    return arrays


def _classification(array: np.ndarray, count: int, labels: list[str]) -> np.ndarray:
    """The classification extension: the ``count`` highest values of each row as "score:index:label"."""
    count = min(count, array.shape[-1])
    rows = []
    for row in array.reshape(-1, array.shape[-1]):
        order = np.argsort(-row, kind="stable")[:count]
        rows.append(
            [
                f"{float(row[index]):f}:{int(index)}" + (f":{labels[index]}" if index < len(labels) else "")
                for index in order
            ]
        )
    return np.array(rows, dtype=object).reshape(*array.shape[:-1], count)


def _serialize(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for element in array.ravel():
            encoded = element if isinstance(element, bytes) else str(element).encode("utf-8")
            parts.append(struct.pack("<I", len(encoded)))
            parts.append(encoded)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=_NUMPY_TYPES[datatype]).tobytes()


def _json_data(array: np.ndarray, datatype: str) -> list[Any]:
    if datatype == "BYTES":
        return [str(element) for element in array.ravel()]
    values = array.ravel().tolist()
    if datatype == "FP32" and not np.isfinite(array).all():
        return [value if math.isfinite(value) else None for value in values]
    return values
