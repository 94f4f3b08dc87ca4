"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import get_service, require_api_key_for_health, require_api_key_for_metrics
from app.api.v1.schemas import UNAVAILABLE_REASON_EXAMPLE
from app.serving.service import Service


class ModelStatusEntry(BaseModel):
    name: str
    status: str
    reason: str | None = Field(
        None,
        description="why the model is not ready (null when it is); absent when API keys are set and "
        "the probe is open (auth.protect_health false)",
    )


class Readiness(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "ready",
                    "models": [
                        {"name": "shapes", "status": "ready", "reason": None},
                        {"name": "deit_small", "status": "unavailable", "reason": UNAVAILABLE_REASON_EXAMPLE},
                    ],
                }
            ]
        }
    )

    status: Literal["ready", "loading", "unavailable", "draining"]
    models: list[ModelStatusEntry]


class Liveness(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok"}]})

    status: Literal["ok"]


router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    response_model=Liveness,
    dependencies=[Depends(require_api_key_for_health)],
    summary="Liveness: 200 while the process runs",
)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "loading, no model available, or draining"}},
    dependencies=[Depends(require_api_key_for_health)],
    summary="Readiness: 200 when every model has settled, one at least serves, and not draining",
)
async def readyz(service: Service = Depends(get_service)) -> JSONResponse:
    auth = service.settings.auth
    # Why a model is unavailable (file paths, error texts) only for callers who could read it from
    # /v1/models anyway: no keys configured, or keys required here too.
    reasons = not auth.api_keys or auth.protect_health
    return JSONResponse(service.readiness(reasons=reasons), status_code=200 if service.ready else 503)


@router.head("/healthz", dependencies=[Depends(require_api_key_for_health)], include_in_schema=False)
async def healthz_head() -> Response:
    """The liveness probe for clients that check with HEAD."""
    return Response(status_code=200)


@router.head("/readyz", dependencies=[Depends(require_api_key_for_health)], include_in_schema=False)
async def readyz_head(service: Service = Depends(get_service)) -> Response:
    """The readiness probe for clients that check with HEAD: the status alone."""
    return Response(status_code=200 if service.ready else 503)


@router.get(
    "/metrics",
    dependencies=[Depends(require_api_key_for_metrics)],
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    summary="Prometheus metrics",
)
async def metrics(service: Service = Depends(get_service)) -> Response:
    return Response(service.metrics.render(), media_type=service.metrics.content_type)
