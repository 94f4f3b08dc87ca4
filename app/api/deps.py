"""Dependencies shared by the routers: the running service and API-key checks."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.serving.errors import ServiceError
from app.serving.service import Service

bearer_scheme = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: <API key>")


async def get_service(request: Request) -> Service:
    """The running service. A coroutine, so that FastAPI resolves it on the event loop instead of
    sending every request through a worker thread for it."""
    service: Service = request.app.state.service
    return service


def key_is_valid(candidate: str, accepted: list[bytes]) -> bool:
    """Constant-time comparison against every accepted key (no early exit on a match)."""
    supplied = candidate.encode("utf-8", "surrogateescape")
    matched = False
    for key in accepted:
        matched |= hmac.compare_digest(supplied, key)
    return matched


def _check_key(service: Service, bearer: HTTPAuthorizationCredentials | None, header_key: str | None) -> None:
    accepted = [key.get_secret_value().encode("utf-8") for key in service.settings.auth.api_keys]
    if not accepted:
        return
    # Either header may carry the key; a client that sends both is let in when one of them is valid.
    candidates = [key for key in (header_key, bearer.credentials if bearer else None) if key]
    valid = [key_is_valid(candidate, accepted) for candidate in candidates]  # each one checked
    if not any(valid):
        raise ServiceError(
            "unauthorized", "a valid API key is required (Authorization: Bearer <key> or X-API-Key: <key>)"
        )


async def require_api_key(
    service: Service = Depends(get_service),
    bearer: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
    header_key: str | None = Depends(api_key_scheme),
) -> None:
    _check_key(service, bearer, header_key)


async def require_api_key_for_health(
    service: Service = Depends(get_service),
    bearer: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
    header_key: str | None = Depends(api_key_scheme),
) -> None:
    if service.settings.auth.protect_health:
        _check_key(service, bearer, header_key)


async def require_api_key_for_metrics(
    service: Service = Depends(get_service),
    bearer: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
    header_key: str | None = Depends(api_key_scheme),
) -> None:
    if service.settings.auth.protect_metrics:
        _check_key(service, bearer, header_key)
