"""One error shape for every 4xx/5xx: ``{"error": {"code", "message", "request_id"}}``."""

from __future__ import annotations

import uuid
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.serving.errors import ServiceError
from app.serving.images import ImageDecodeError

_HTTP_CODES = {
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


def request_id_of(request: Request) -> str:
    return str(getattr(request.state, "request_id", None) or uuid.uuid4().hex)


def error_body(code: str, message: str, request_id: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "request_id": request_id}}


def error_response(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        error_body(code, message, request_id_of(request)), status_code=status, headers=headers
    )


def describe_validation_errors(errors: list[dict[str, Any]]) -> str:
    parts = []
    for error in errors[:10]:
        location = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body", "query"))
        parts.append(f"{location}: {error.get('msg')}" if location else str(error.get("msg")))
    return "; ".join(parts) or "invalid request"


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(request, exc.status, exc.code, exc.message, exc.headers)


async def _decode_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ImageDecodeError)
    return error_response(request, exc.status, exc.code, str(exc))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, (RequestValidationError, ValidationError)) else []
    return error_response(request, 422, "invalid_request", describe_validation_errors(list(errors)))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = _HTTP_CODES.get(status, "error")
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    return path_error_response(request, status, code, detail, dict(exc.headers or {}))


def path_error_response(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An error in the shape of the API the path belongs to: the Open Inference Protocol's
    ``{"error": message}`` under ``/v2``, the service's ``{"error": {code, message, request_id}}``
    everywhere else."""
    if is_protocol_path(request.url.path):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    return error_response(request, status, code, message, headers)


def is_protocol_path(path: str) -> bool:
    """Whether ``path`` belongs to the Open Inference Protocol (``/v2``) API."""
    return path == "/v2" or path.startswith("/v2/")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(ImageDecodeError, _decode_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
