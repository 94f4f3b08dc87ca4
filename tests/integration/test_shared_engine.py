"""HTTP workers of a shared-engine server (``serve --workers N``) against one engine, in one process:
batches across workers, the engine going away and coming back, a client that leaves."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from app.config import Settings
from app.main import create_app
from app.serving.batch import BatchItem
from app.serving.remote import RemoteModels
from tests.integration.conftest import serving, tiny_settings
from tests.shared_engine import EngineThread, engine_thread


def _png(seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (40, 56, 3), dtype=torch.uint8, generator=generator)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.05)


async def _linked(settings: Settings, address: str) -> RemoteModels:
    """A worker's view of the engine at ``address``, once it reports a model ready."""
    models = RemoteModels(settings, address)
    models.start_loading()
    await _until(lambda: models.any_ready)
    return models


async def _explain(client: httpx.AsyncClient, seed: int) -> httpx.Response:
    return await client.post(
        "/v1/models/tiny/explain",
        content=_png(seed),
        params={"encodings": "json", "map_size": "grid", "top_k": "2"},
        headers={"content-type": "image/png"},
    )


async def test_one_batch_holds_the_requests_of_both_workers(
    tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = tiny_settings(tiny_weights, batch={"max_wait_ms": 500})
    with engine_thread(settings, tmp_path, monkeypatch) as engine:
        async with serving(create_app(settings)) as first, serving(create_app(settings)) as second:
            responses = await asyncio.gather(
                *(_explain(client, seed) for seed in range(3) for client in (first, second))
            )
            alone = [await _explain(first, seed) for seed in range(3)]
        registry = engine.server.metrics.registry
        mixed = registry.get_sample_value("reciprocam_batch_workers_count", {"model": "tiny"})
        one_worker = registry.get_sample_value(
            "reciprocam_batch_workers_bucket", {"model": "tiny", "le": "1.0"}
        )
    assert [response.status_code for response in responses] == [200] * 6
    # the first batch held all six images, from both workers; the three alone came after
    assert responses[0].json()["timing"]["batch_images"] == 6
    assert mixed == 4 and one_worker == 3
    for position, response in enumerate(responses):
        expected = alone[position // 2].json()["images"][0]
        got = response.json()["images"][0]
        assert [p["class_id"] for p in got["predictions"]] == [p["class_id"] for p in expected["predictions"]]
        for mine, reference in zip(got["explanations"], expected["explanations"], strict=True):
            assert torch.allclose(torch.tensor(mine["json"]), torch.tensor(reference["json"]), atol=1e-4)


async def test_requests_get_503_while_the_engine_is_away_and_served_when_it_is_back(
    tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = tiny_settings(tiny_weights, batch={"max_wait_ms": 1500})
    with engine_thread(settings, tmp_path, monkeypatch) as engine:
        async with serving(create_app(settings)) as client:
            waiting = asyncio.create_task(_explain(client, 0))
            await asyncio.sleep(0.3)  # queued in the engine, inside its batching window
            await asyncio.to_thread(engine.stop)  # drains: the queued job is answered first
            assert (await waiting).status_code == 200
            away = await _explain(client, 1)
            assert away.status_code == 503
            assert away.json()["error"]["code"] == "model_loading"
            assert away.headers["retry-after"] == str(settings.batch.retry_after_s)
            readiness = await client.get("/readyz")
            assert readiness.status_code == 503 and readiness.json()["status"] == "loading"
            restarted = EngineThread(settings, engine.address)
            restarted.start()
            try:
                for _ in range(200):
                    if (await client.get("/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
                assert (await _explain(client, 1)).status_code == 200
            finally:
                await asyncio.to_thread(restarted.stop)


async def test_a_client_that_leaves_is_dropped_and_its_shared_memory_freed(
    tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = tiny_settings(tiny_weights, batch={"max_wait_ms": 1500})
    with engine_thread(settings, tmp_path, monkeypatch) as engine:
        models = await _linked(settings, engine.address)
        _, queue = models.require_ready("tiny")
        item = BatchItem(image=torch.zeros(3, 32, 32, dtype=torch.uint8), top_k=1)

        async def gone() -> bool:
            return True

        from app.serving.errors import ClientDisconnectedError

        with pytest.raises(ClientDisconnectedError):
            await queue.submit([item], disconnected=gone)
        for _ in range(100):  # freed when the engine answers for the dropped job
            if models.link.arena.pages_in_use == 0:
                break
            await asyncio.sleep(0.05)
        assert models.link.arena.pages_in_use == 0
        rejected = engine.server.metrics.registry.get_sample_value(
            "reciprocam_rejections_total", {"model": "tiny", "reason": "client_disconnected"}
        )
        assert rejected == 1
        await models.close(1.0)


async def test_a_broken_link_answers_its_jobs_and_retires_their_shared_memory(
    tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine is still up, so it may still read the jobs' inputs: their arena is not reused."""
    import os

    from app.serving.errors import ServiceError

    settings = tiny_settings(tiny_weights, batch={"max_wait_ms": 1000})
    with engine_thread(settings, tmp_path, monkeypatch):
        models = await _linked(settings, os.environ["RECIPROCAM_ENGINE_SOCKET"])
        _, queue = models.require_ready("tiny")
        link = models.link
        first_arena = link.arena.name
        item = BatchItem(image=torch.zeros(3, 32, 32, dtype=torch.uint8), top_k=1)
        waiting = asyncio.create_task(queue.submit([item]))
        await asyncio.sleep(0.2)  # queued in the engine's batching window
        assert link.arena.pages_in_use == 1
        assert link._writer is not None
        link._writer.transport.abort()  # the link breaks; the engine is fine
        with pytest.raises(ServiceError) as answer:
            await waiting
        assert answer.value.code == "model_loading" and answer.value.retry_after_s is not None
        assert link.arena.name != first_arena and link.arena.pages_in_use == 0
        assert not os.path.exists(f"/dev/shm/{first_arena}")  # unlinked (the engine may still map it)
        await _until(lambda: models.any_ready)  # reconnected to the same engine
        _, queue = models.require_ready("tiny")
        outcome = await queue.submit([item])
        assert len(outcome.results) == 1
        await models.close(1.0)


async def test_a_worker_stops_waiting_for_an_engine_that_never_answers(
    tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backstop behind the engine's own watchdog: a job not answered in the longest time it may take
    (its deadline to start, one batch's compute, a grace) is answered 503 ``engine_unresponsive``; its
    shared memory is freed only when the engine answers after all."""
    import threading
    import time

    from app.serving import registry, remote
    from app.serving.errors import EngineUnresponsiveError

    release = threading.Event()
    computing = registry.run_engine_batch

    def stuck(*args):  # type: ignore[no-untyped-def]
        release.wait(30)
        return computing(*args)

    monkeypatch.setattr(registry, "run_engine_batch", stuck)
    monkeypatch.setattr(remote, "ANSWER_GRACE_S", 0.2)
    worker = tiny_settings(tiny_weights, batch={"request_timeout_s": 0.2, "compute_timeout_s": 0.2})
    with engine_thread(tiny_settings(tiny_weights), tmp_path, monkeypatch) as engine:
        models = await _linked(worker, engine.address)
        try:
            _, queue = models.require_ready("tiny")
            item = BatchItem(image=torch.zeros(3, 32, 32, dtype=torch.uint8), top_k=1)
            started = time.monotonic()
            with pytest.raises(EngineUnresponsiveError) as refused:
                await queue.submit([item])
            waited = time.monotonic() - started
            assert 0.6 <= waited < 5.0
            assert refused.value.retry_after_s == worker.batch.retry_after_s
            assert models.link.arena.pages_in_use == 1  # the engine may still read the input
            release.set()
            await _until(lambda: models.link.arena.pages_in_use == 0)
            assert models.link.arena.pages_in_use == 0
            assert engine.hangs == []  # the engine's own watchdog (120 s) did not fire
        finally:
            release.set()
            await models.close(1.0)
