"""The service without a server: one model and the request pipeline in this process, for the
command line (the same checks, decoding, batching and rendering as over HTTP)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from app.config import ModelSettings, Settings
from app.engine.models import ModelLoadError
from app.serving.service import Service


@asynccontextmanager
async def local_service(model: ModelSettings, **settings: Any) -> AsyncIterator[Service]:
    """A started service holding ``model`` once it has loaded; ``ModelLoadError`` with the reason when
    it cannot. ``settings``: other service settings (limits, batching)."""
    service = Service(Settings(models=[model], **settings))
    await service.start()
    try:
        while not service.registry.settled:
            await asyncio.sleep(0.01)
        entry = service.registry.get(model.name)
        if entry.status != "ready":
            raise ModelLoadError(entry.reason or f"model {model.name!r} is {entry.status}")
        yield service
    finally:
        await service.stop()
