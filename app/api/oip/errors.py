"""The Open Inference Protocol's errors: ``{"error": "message"}`` with the status the protocol uses."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.errors import describe_validation_errors, error_headers, status_of
from app.serving.errors import ServiceError
from app.serving.images import ImageDecodeError

logger = logging.getLogger(__name__)


class OipError(Exception):
    """An error answered as the protocol's ``{"error": "message"}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def bad_request(message: str) -> OipError:
    return OipError(400, message)


def oip_error_shape(code: str, message: str, request_id: str) -> dict[str, Any]:
    """The protocol's error body (it has no code or request id; the X-Request-ID header has the id)."""
    return {"error": message}


def oip_error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(oip_error_shape("", message, ""), status_code=status, headers=headers)


def as_oip_error(exc: Exception) -> OipError | None:
    if isinstance(exc, OipError):
        return exc
    if isinstance(exc, ImageDecodeError):
        return OipError(status_of(exc), f"image {exc.index}: {exc.message}")
    if isinstance(exc, ServiceError):
        # The protocol answers invalid requests with 400; /v1 distinguishes 422 (invalid options).
        status = status_of(exc)
        return OipError(400 if status == 422 else status, exc.message, error_headers(exc))
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
                error = as_oip_error(exc)
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
