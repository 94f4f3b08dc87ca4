"""``serve --workers 2`` with the shared engine: one process holds the model and batches for both HTTP
workers; killed, it is restarted while the workers answer 503 with Retry-After."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import numpy as np
import psutil

from tests.e2e.test_overload_and_drain import IMAGES, TOP_K, _wait_for, expected_predictions
from tests.e2e.test_workers import _workers

SHARED = ("--workers", "2")
BIG_MODEL = [
    {
        "name": "big",
        "arch": "deit_base_patch16_224",
        "weights": "random:0",
        "model_kwargs": {"img_size": 112},
    }
]
BIG_MODEL_BYTES = 85_800_000 * 4  # deit_base's parameters in float32


def _both_workers_linked(server, engine: psutil.Process) -> None:  # type: ignore[no-untyped-def]
    """Readiness passes when one worker serves; wait until both have connected to the engine (which
    they do before they start to accept)."""

    def linked() -> bool:
        # the listening socket and one accepted connection per worker
        sockets = [c for c in engine.connections(kind="unix") if str(c.laddr).endswith("engine.sock")]
        return len(sockets) >= 3

    _wait_for(linked, "both workers connected to the engine", server, timeout_s=60)
    time.sleep(0.5)


def _engine(pid: int) -> psutil.Process:
    children = psutil.Process(pid).children(recursive=True)
    engines = [child for child in children if "engine" in " ".join(child.cmdline())]
    assert len(engines) == 1, [child.cmdline() for child in children]
    return engines[0]


async def _explain_all(url: str, count: int) -> list[httpx.Response]:
    """``count`` explanations of IMAGES, each on its own connection, opened 10 ms apart: both workers
    wait for connections, and whichever the kernel wakes takes the next one (a burst would all be
    accepted by the first worker awake)."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def one(index: int) -> httpx.Response:
            await asyncio.sleep(0.01 * index)
            return await client.post(
                "/v1/models/tiny/explain",
                files={"file": ("image.png", IMAGES[index % len(IMAGES)], "image/png")},
                data={"top_k": str(TOP_K), "encodings": "json", "map_size": "grid"},
                headers={"connection": "close"},
            )

        return await asyncio.gather(*(one(index) for index in range(count)))


def test_batches_mix_both_workers_and_every_answer_is_its_own(start_server, e2e_weights):
    server = start_server({"batch": json.dumps({"max_wait_ms": 400})}, serve_args=SHARED)
    assert len(_workers(server.pid)) == 2
    engine = _engine(server.pid)
    _both_workers_linked(server, engine)
    count = 24
    responses = asyncio.run(_explain_all(server.url, count))
    assert all(response.status_code == 200 for response in responses), [r.text for r in responses]
    expected = expected_predictions(e2e_weights)
    first_maps: dict[int, np.ndarray] = {}
    for index, response in enumerate(responses):
        (image,) = response.json()["images"]
        ids, logits = expected[index % len(IMAGES)]
        assert [p["class_id"] for p in image["predictions"]] == ids
        np.testing.assert_allclose([p["logit"] for p in image["predictions"]], logits, atol=1e-4)
        maps = np.array([entry["json"] for entry in image["explanations"]])
        # the same image gets the same maps whichever batch and worker it went through
        np.testing.assert_allclose(maps, first_maps.setdefault(index % len(IMAGES), maps), atol=1e-4)
    batches = server.metric("reciprocam_batch_workers_count", model="tiny")
    single_worker = server.metric("reciprocam_batch_workers_bucket", model="tiny", le="1.0")
    assert batches >= 1
    assert single_worker < batches, "no batch held requests from both workers"
    assert server.metric("reciprocam_images_total", model="tiny", kind="explain") == count
    assert engine.is_running()
    # a graceful stop ends the workers, then the engine
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(60) == 0, server.log()
    assert not engine.is_running()


def test_a_killed_engine_is_answered_with_503_and_restarted(start_server):
    server = start_server({}, delay_s=3.0, serve_args=SHARED)
    engine = _engine(server.pid)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            tasks = [
                asyncio.create_task(
                    client.post(
                        "/v1/models/tiny/predict",
                        content=IMAGES[index],
                        headers={"content-type": "image/png"},
                    )
                )
                for index in range(4)
            ]
            await asyncio.sleep(1.5)  # the batch is computing (it sleeps 3 s first)
            engine.kill()
            # answered when the engine dies, not after the client's own timeout
            return await asyncio.wait_for(asyncio.gather(*tasks), timeout=50)

    responses = asyncio.run(burst())
    for response in responses:
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "model_loading"
        assert int(response.headers["retry-after"]) >= 1
    server.set_delay(0.0)
    _wait_for(
        lambda: httpx.get(f"{server.url}/readyz").status_code == 200, "readiness after restart", server, 120
    )
    replacement = _engine(server.pid)
    assert replacement.pid != engine.pid
    response = httpx.post(
        f"{server.url}/v1/models/tiny/predict", content=IMAGES[0], headers={"content-type": "image/png"}
    )
    assert response.status_code == 200, response.text
    assert server.metric("reciprocam_engine_starts_total") == 2
    assert server.process.poll() is None  # the server itself was never restarted


def test_a_hung_engine_is_restarted_by_its_watchdog(start_server):
    """A batch that computes past ``batch.compute_timeout_s`` ends the engine process; its clients get
    503 + Retry-After within seconds, not after their own timeouts, and a new engine serves."""
    server = start_server({"batch__compute_timeout_s": 1.0}, serve_args=SHARED)
    engine = _engine(server.pid)
    server.set_delay(600.0)  # every batch hangs
    started = time.monotonic()
    response = httpx.post(
        f"{server.url}/v1/models/tiny/predict",
        content=IMAGES[0],
        headers={"content-type": "image/png"},
        timeout=60,
    )
    assert time.monotonic() - started < 20
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "model_loading"
    assert int(response.headers["retry-after"]) >= 1
    engine.wait(10)
    assert not engine.is_running()
    server.set_delay(0.0)
    _wait_for(
        lambda: httpx.get(f"{server.url}/readyz").status_code == 200, "readiness after restart", server, 120
    )
    response = httpx.post(
        f"{server.url}/v1/models/tiny/predict", content=IMAGES[0], headers={"content-type": "image/png"}
    )
    assert response.status_code == 200, response.text
    assert server.metric("reciprocam_engine_starts_total") == 2, server.log()
    log = server.log()
    assert "the engine process hangs" in log and "exited with status 70" in log  # the watchdog's status
    assert server.process.poll() is None


def test_the_model_is_held_once(start_server):
    """Memory measured per process: the workers hold no copy of the model's weights."""
    server = start_server({"models": json.dumps(BIG_MODEL)}, serve_args=SHARED)
    engine = _engine(server.pid)
    workers = _workers(server.pid)
    assert len(workers) == 2
    engine_uss = engine.memory_full_info().uss
    worker_uss = [worker.memory_full_info().uss for worker in workers]
    assert engine_uss > BIG_MODEL_BYTES
    for uss in worker_uss:
        assert uss < engine_uss - BIG_MODEL_BYTES * 0.8, (engine_uss, worker_uss)
