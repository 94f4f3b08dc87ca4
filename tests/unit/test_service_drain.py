"""Shutdown keeps one drain deadline: the queues get what the server's graceful shutdown left."""

import time

from app.config import Settings
from app.serving.service import Service


async def test_stop_gives_the_queues_only_the_rest_of_the_drain_deadline(monkeypatch):
    service = Service(Settings(models=[], drain_timeout_s=25))
    waits: list[float] = []

    async def close(timeout_s: float) -> None:
        waits.append(timeout_s)

    monkeypatch.setattr(service.registry, "close", close)
    service.begin_drain()
    service._drain_started = time.monotonic() - 20  # SIGTERM came 20 s ago
    await service.stop()
    assert service.draining
    assert len(waits) == 1 and 4.0 <= waits[0] <= 5.01


async def test_stop_without_earlier_drain_uses_the_whole_deadline(monkeypatch):
    service = Service(Settings(models=[], drain_timeout_s=25))
    waits: list[float] = []

    async def close(timeout_s: float) -> None:
        waits.append(timeout_s)

    monkeypatch.setattr(service.registry, "close", close)
    await service.stop()
    assert len(waits) == 1 and 24.0 <= waits[0] <= 25.0
