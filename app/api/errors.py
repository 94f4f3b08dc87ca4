"""How the HTTP API answers errors: the status of every error code, and the error body's shape.

The service's shape is ``{"error": {"code", "message", "request_id"}}``. A protocol mounted under
its own prefix may register another shape there (:func:`register_error_shape`); errors answered
before routing (by the outer middleware) then take it too.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.serving.errors import ServiceError

# Every error code the service answers with, and its HTTP status.
STATUS_OF_CODE: dict[str, int] = {
    # the request cannot be read
    "bad_request": 400,
    "empty_body": 400,
    "invalid_json": 400,
    "invalid_multipart": 400,
    "invalid_base64": 400,
    "no_images": 400,
    "cors_rejected": 400,
    # an image cannot be used
    "empty_image": 400,
    "invalid_image": 400,
    "unsupported_image": 400,
    "corrupt_image": 400,
    "too_many_pixels": 413,
    "too_many_images": 413,
    "payload_too_large": 413,
    # the options cannot be honoured
    "invalid_request": 422,
    "invalid_options": 422,
    "maps_too_large": 422,
    # who and what
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "model_not_found": 404,
    "method_not_allowed": 405,
    "not_acceptable": 406,
    "request_timeout": 408,
    "unsupported_media_type": 415,
    "too_many_requests": 429,
    "client_disconnected": 499,
    # the service's side
    "internal_error": 500,
    "compute_failed": 500,
    "model_loading": 503,
    "model_unavailable": 503,
    "queue_full": 503,
    "overloaded": 503,
    "out_of_memory": 503,
    "shutting_down": 503,
    "engine_unresponsive": 503,
    "unavailable": 503,
    "deadline_exceeded": 504,
}
# The code of a plain HTTP error (an unknown path, a wrong method) raised by the framework.
_CODE_OF_STATUS: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}

ErrorShape = Callable[[str, str, str], dict[str, Any]]  # (code, message, request id) -> body
_SHAPES: dict[str, ErrorShape] = {}


def status_of(error: ServiceError) -> int:
    return STATUS_OF_CODE.get(error.code, 500)


def error_headers(error: ServiceError) -> dict[str, str]:
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(error.retry_after_s)
    if error.code == "unauthorized":
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def request_id_of(request: Request) -> str:
    return str(getattr(request.state, "request_id", None) or uuid.uuid4().hex)


def error_body(code: str, message: str, request_id: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "request_id": request_id}}


def register_error_shape(prefix: str, shape: ErrorShape) -> None:
    """Errors on paths under ``prefix`` take ``shape`` (called where that protocol is mounted)."""
    _SHAPES[prefix.rstrip("/")] = shape


def error_payload(path: str, code: str, message: str, request_id: str) -> dict[str, Any]:
    """The error body for a request to ``path``, in the shape of the API it belongs to."""
    for prefix, shape in _SHAPES.items():
        if path == prefix or path.startswith(prefix + "/"):
            return shape(code, message, request_id)
    return error_body(code, message, request_id)


def error_response(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    payload = error_payload(request.url.path, code, message, request_id_of(request))
    return JSONResponse(payload, status_code=status, headers=headers)


def service_error_response(request: Request, error: ServiceError, message: str | None = None) -> JSONResponse:
    return error_response(
        request, status_of(error), error.code, message or error.message, error_headers(error)
    )


def describe_validation_errors(errors: list[Any]) -> str:
    parts = []
    for error in errors[:10]:
        location = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body", "query"))
        parts.append(f"{location}: {error.get('msg')}" if location else str(error.get("msg")))
    return "; ".join(parts) or "invalid request"


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return service_error_response(request, exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, (RequestValidationError, ValidationError)) else []
    return error_response(request, 422, "invalid_request", describe_validation_errors(list(errors)))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = _CODE_OF_STATUS.get(status, "error")
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    return error_response(request, status, code, detail, dict(exc.headers or {}))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
