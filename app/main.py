"""The FastAPI application: ``create_app(settings)``; models are loaded in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from app.api import health, oip, v1
from app.api.errors import install_error_handlers
from app.api.middleware import EXPOSED_HEADERS, CORSMiddleware, RequestContextMiddleware
from app.api.openapi import install_openapi
from app.config import Settings
from app.serving.service import Service

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"

DESCRIPTION = """\
Predictions from timm Vision Transformers together with their ViT-ReciproCAM saliency maps,
computed in the same forward batch. Post images as multipart files, as JSON with base64 data, or
as a raw image body. Every error has the shape `{"error": {"code", "message", "request_id"}}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the application. Models start loading in the background when the lifespan starts;
    ``/readyz`` answers 503 until every model has loaded (or failed to) and one at least serves."""
    settings = settings or Settings()
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            try:
                await service.stop()
            finally:
                service.metrics.process_exited()

    app = FastAPI(
        title="ViT-ReciproCAM service",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.service = service
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(v1.router)
    app.include_router(oip.router)
    install_openapi(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def demo_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    cors_options: dict[str, Any] = {
        "allow_origins": settings.cors.allow_origins,
        "allow_credentials": settings.cors.allow_credentials,
        "allow_methods": settings.cors.allow_methods,
        "allow_headers": settings.cors.allow_headers,
        "expose_headers": list(EXPOSED_HEADERS),
        "max_age": settings.cors.max_age,
    }
    if settings.cors.allow_origins:
        app.add_middleware(CORSMiddleware, **cors_options)
    app.add_middleware(
        RequestContextMiddleware,
        metrics=service.metrics,
        max_body_bytes=settings.limits.max_body_bytes,
        max_concurrent=settings.limits.max_concurrent_requests,
        retry_after_s=settings.batch.retry_after_s,
        body_timeout_s=settings.limits.body_timeout_s,
        # the same CORS headers on the errors the outer layer answers itself (413, 503, 500)
        cors=CORSMiddleware(_unused_app, **cors_options) if settings.cors.allow_origins else None,
    )
    return app


async def _unused_app(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("only the CORS headers of this middleware instance are used")
