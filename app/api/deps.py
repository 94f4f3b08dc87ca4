"""Dependencies shared by the routers: the running service and API-key checks.

Each key check is one plain dependency that reads the two headers itself. FastAPI's security classes
as sub-dependencies would document the schemes by themselves, but FastAPI resolves every dependency
of a request anew, and on the hot routes that resolution cost more than the check: the schemes are
documented by :func:`app.api.openapi.install_openapi` from :data:`SECURITY_SCHEMES` instead.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import Request
from fastapi.security import APIKeyHeader, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.requests import HTTPConnection

from app.serving.errors import ServiceError
from app.serving.service import Service

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: <API key>")
# The OpenAPI security schemes, by name: a client may send either header.
SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    type(scheme).__name__: scheme.model.model_dump(mode="json", by_alias=True, exclude_none=True)
    for scheme in (_bearer, _api_key_header)
}


async def get_service(request: Request) -> Service:
    """The running service. A coroutine, so that FastAPI resolves it on the event loop instead of
    sending every request through a worker thread for it."""
    return service_of(request)


def service_of(connection: HTTPConnection) -> Service:
    """The running service, for a route that reads it without a dependency."""
    service: Service = connection.app.state.service
    return service


def key_is_valid(candidate: str, accepted: list[bytes]) -> bool:
    """Constant-time comparison against every accepted key (no early exit on a match)."""
    supplied = candidate.encode("utf-8", "surrogateescape")
    matched = False
    for key in accepted:
        matched |= hmac.compare_digest(supplied, key)
    return matched


def presented_keys(connection: HTTPConnection) -> list[str]:
    """The keys a request presents: its ``X-API-Key`` header and its ``Authorization: Bearer``
    credentials, each when present and not empty (as FastAPI's ``APIKeyHeader`` and ``HTTPBearer``
    read them)."""
    keys = []
    header_key = connection.headers.get(_api_key_header.model.name)
    if header_key:
        keys.append(header_key)
    authorization = connection.headers.get("authorization")
    scheme, credentials = get_authorization_scheme_param(authorization)
    if scheme.lower() == "bearer" and credentials:
        keys.append(credentials)
    return keys


def _check_key(connection: HTTPConnection) -> None:
    service = service_of(connection)
    accepted = [key.get_secret_value().encode("utf-8") for key in service.settings.auth.api_keys]
    if not accepted:
        return
    # Either header may carry the key; a client that sends both is let in when one of them is valid.
    valid = [key_is_valid(candidate, accepted) for candidate in presented_keys(connection)]  # each checked
    if not any(valid):
        raise ServiceError(
            "unauthorized", "a valid API key is required (Authorization: Bearer <key> or X-API-Key: <key>)"
        )


async def require_api_key(request: Request) -> None:
    _check_key(request)


async def require_api_key_for_health(request: Request) -> None:
    if service_of(request).settings.auth.protect_health:
        _check_key(request)


async def require_api_key_for_metrics(request: Request) -> None:
    if service_of(request).settings.auth.protect_metrics:
        _check_key(request)
