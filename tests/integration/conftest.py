"""An in-process service on a tiny self-describing model, reached through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager
from PIL import Image

from app.config import ModelSettings, Settings
from app.main import create_app
from tests.helpers import save_self_describing

LABELS = [f"class_{i}" for i in range(7)]


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    return save_self_describing(path, "deit_tiny", seed=3, labels=LABELS)


def tiny_settings(weights: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "models": [ModelSettings(name="tiny", weights=str(weights))],
        "batch": {"max_wait_ms": 2},
        "io_workers": 2,
        "log_format": "text",
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def running_service(settings: Settings, *, wait_ready: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(create_app(settings), wait_ready=wait_ready) as client:
        yield client


@asynccontextmanager
async def serving(app: Any, *, wait_ready: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """One lifespan of ``app``, with a client that reaches it through httpx's ASGI transport."""
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service", timeout=60) as client:
            client.app = app  # type: ignore[attr-defined]
            if wait_ready:
                await wait_until_settled(client)
            yield client


async def wait_until_settled(client: httpx.AsyncClient, timeout_s: float = 60) -> httpx.Response:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        response = await client.get("/readyz")
        if response.json()["status"] != "loading" or loop.time() > deadline:
            return response
        await asyncio.sleep(0.02)


@pytest.fixture
async def client(tiny_weights: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with running_service(tiny_settings(tiny_weights)) as service_client:
        yield service_client


def image_bytes(seed: int, size: tuple[int, int] = (48, 40), fmt: str = "PNG") -> bytes:
    """A distinct noisy RGB image (width, height)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"code", "message", "request_id"}
    assert error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    if code is not None:
        assert error["code"] == code, error
    return error
