"""The real server process under overload, disconnects and SIGTERM.

Each test starts ``python -m tests.e2e.server`` (the ``serve`` command, whose model can be slowed down)
on 127.0.0.1 and talks to it over TCP, so uvicorn's connection handling and signal handling take part.
"""

from __future__ import annotations

import asyncio
import collections
import io
import resource
import signal
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from app.engine.models import load_model
from app.serving.prepare import prepare_image

BURST = 1000
TOP_K = 3


def png(seed: int, size: tuple[int, int] = (40, 36)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


IMAGES = [png(500 + index) for index in range(8)]


def expected_predictions(weights: Path) -> list[tuple[list[int], np.ndarray]]:
    """Top-k class ids and logits of every test image, from the model alone in this process."""
    loaded = load_model(None, str(weights), device="cpu", warmup=False)
    expected = []
    for data in IMAGES:
        prepared = prepare_image(
            data,
            loaded.preprocessor,
            max_pixels=10**6,
            allowed_formats=frozenset({"PNG"}),
            keep_original=False,
            tensor_resize=True,  # as the server resizes by default
        )
        (result,) = loaded.engine.explain(prepared.tensor[None], None, top_k=TOP_K)
        ids = result.logits.topk(TOP_K).indices.tolist()
        expected.append((ids, result.logits[ids].numpy()))
    return expected


async def burst(url: str, count: int) -> list[tuple[int, httpx.Response]]:
    """``count`` predictions sent at once, each on its own connection."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def one(index: int) -> tuple[int, httpx.Response]:
            response = await client.post(
                "/v1/models/tiny/predict",
                content=IMAGES[index % len(IMAGES)],
                params={"top_k": str(TOP_K)},
                headers={"content-type": "image/png", "X-Request-ID": f"burst-{index}"},
            )
            return index, response

        return await asyncio.gather(*(one(index) for index in range(count)))


def check_burst(results: list[tuple[int, httpx.Response]], expected: list) -> collections.Counter:  # type: ignore[type-arg]
    """Checks every response; counts them by status and, for 503s, by error code."""
    statuses: collections.Counter[int | str] = collections.Counter()
    for index, response in results:
        statuses[response.status_code] += 1
        assert response.headers["x-request-id"] == f"burst-{index}"
        if response.status_code == 200:
            (image,) = response.json()["images"]
            ids, logits = expected[index % len(IMAGES)]
            assert [p["class_id"] for p in image["predictions"]] == ids, index
            np.testing.assert_allclose(
                [p["logit"] for p in image["predictions"]], logits, rtol=1e-4, atol=1e-4
            )
        else:
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            error = response.json()["error"]
            # queue_full from the model's queue, or overloaded past limits.max_concurrent_requests
            assert error["code"] in {"queue_full", "overloaded"}, error
            assert error["request_id"] == f"burst-{index}"
            statuses[error["code"]] += 1
    return statuses


def _enough_file_descriptors(needed: int) -> None:
    """Both ends of every connection are open at once (the server inherits this process's limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} open files; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def test_burst_of_1000_requests_against_a_small_queue(start_server, e2e_weights):
    """1,000 requests at once against a queue of 8 images and a slowed model: the accepted ones all get
    their correct result, every other one a 503 with Retry-After, nothing else; and the server's
    resident memory after a burst is within 10% of what it was after the warm-up burst."""
    _enough_file_descriptors(2 * BURST + 200)
    server = start_server(
        {
            "batch__max_queue_images": 8,
            "batch__max_batch_images": 4,
            "batch__max_wait_ms": 2,
            "batch__request_timeout_s": 120,
        },
        delay_s=0.02,
    )
    expected = expected_predictions(e2e_weights)
    process = psutil.Process(server.pid)
    # the warm-up burst lets the allocator and the thread pools reach their working size
    warm = check_burst(asyncio.run(burst(server.url, BURST)), expected)
    rss_before = process.memory_info().rss
    statuses = check_burst(asyncio.run(burst(server.url, BURST)), expected)
    rss_after = process.memory_info().rss
    assert statuses[200] + statuses[503] == BURST
    assert set(statuses) <= {200, 503, "queue_full", "overloaded"}
    assert statuses[200] >= 8 and statuses[503] > 0, statuses
    assert warm[200] > 0 and warm[503] > 0, warm
    growth = (rss_after - rss_before) / rss_before
    print(
        f"burst of {BURST}: {dict(statuses)}; warm-up {dict(warm)}; RSS {rss_before / 2**20:.0f} MiB -> "
        f"{rss_after / 2**20:.0f} MiB ({growth:+.1%})"
    )
    assert abs(growth) <= 0.10, f"RSS {rss_before} -> {rss_after} ({growth:+.1%})"
    assert server.metric("reciprocam_queue_depth_images", model="tiny") == 0
    rejected = server.metric("reciprocam_rejections_total", model="tiny", reason="queue_full")
    assert rejected == warm["queue_full"] + statuses["queue_full"]
    assert server.metric("reciprocam_overloaded_total") == warm["overloaded"] + statuses["overloaded"]
    # still serving normally
    ok = httpx.post(
        f"{server.url}/v1/models/tiny/predict", content=IMAGES[0], headers={"content-type": "image/png"}
    )
    assert ok.status_code == 200
    assert server.process.poll() is None


def _wait_for(condition, what: str, server, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    pytest.fail(f"{what} did not happen in {timeout_s} s:\n{server.log()}")


def test_work_of_a_disconnected_client_is_skipped(start_server):
    """A request whose client hangs up while it waits in the queue never reaches the model."""
    # One stream, and one image is under half a batch: the second request stays in the queue while the
    # first computes (half a batch would be handed to the compute thread to wait there)
    server = start_server(
        {"batch__max_batch_images": 4, "batch__max_wait_ms": 0, "batch__compute_streams": 1}
    )
    computed = lambda: server.metric("reciprocam_batch_size_images_sum", model="tiny")  # noqa: E731
    batches = lambda: server.metric("reciprocam_batch_size_images_count", model="tiny")  # noqa: E731
    images_before, batches_before = computed(), batches()
    server.set_delay(1.5)

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            holder = asyncio.ensure_future(
                client.post(
                    "/v1/models/tiny/predict", content=IMAGES[0], headers={"content-type": "image/png"}
                )
            )
            # the first request occupies the model ...
            await asyncio.to_thread(_wait_for, lambda: batches() == batches_before + 1, "compute", server)
            # ... while a second one is sent in full, queued, and abandoned
            body = IMAGES[1]
            raw = socket.create_connection(("127.0.0.1", server.port))
            raw.sendall(
                b"POST /v1/models/tiny/predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await asyncio.to_thread(
                _wait_for,
                lambda: server.metric("reciprocam_queue_depth_images", model="tiny") == 1,
                "queueing",
                server,
            )
            raw.close()
            return await holder

    first = asyncio.run(scenario())
    server.set_delay(0)
    assert first.status_code == 200
    _wait_for(
        lambda: server.metric("reciprocam_rejections_total", model="tiny", reason="client_disconnected") == 1,
        "the skip",
        server,
    )
    assert computed() == images_before + 1  # only the first request's image reached the model
    assert batches() == batches_before + 1
    assert server.metric("reciprocam_queue_depth_images", model="tiny") == 0


def test_sigterm_during_load_loses_no_accepted_request(start_server, e2e_weights):
    """SIGTERM while requests are computing and queued: each of them completes with its correct
    result, new connections are refused, and the process exits 0 by itself."""
    server = start_server(
        {
            "batch__max_batch_images": 2,
            "batch__max_wait_ms": 0,
            "batch__max_queue_images": 64,
            "drain_timeout_s": 30,
        },
        delay_s=0.4,
    )
    expected = expected_predictions(e2e_weights)
    count = 10

    async def scenario() -> tuple[list[httpx.Response], list[str]]:
        limits = httpx.Limits(max_connections=count + 5, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as client:
            pending = [
                asyncio.ensure_future(
                    client.post(
                        "/v1/models/tiny/predict",
                        content=IMAGES[index % len(IMAGES)],
                        params={"top_k": str(TOP_K)},
                        headers={"content-type": "image/png"},
                    )
                )
                for index in range(count)
            ]
            # SIGTERM once work is both computing and queued
            await asyncio.to_thread(
                _wait_for,
                lambda: server.metric("reciprocam_queue_depth_images", model="tiny") >= 4,
                "queueing",
                server,
            )
            server.process.send_signal(signal.SIGTERM)
            after: list[str] = []
            for _ in range(200):  # fresh connections until the server stops taking them
                try:
                    async with httpx.AsyncClient(base_url=server.url, timeout=60) as fresh:
                        late = await fresh.post(
                            "/v1/models/tiny/predict",
                            content=IMAGES[0],
                            headers={"content-type": "image/png"},
                        )
                    after.append(str(late.status_code))
                    if late.status_code != 200:
                        break
                except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                    # Refused, or a connection that raced the closing listener and was closed before
                    # its request was read: either way the request was not accepted.
                    after.append("refused")
                    break
                await asyncio.sleep(0.02)
            return list(await asyncio.gather(*pending)), after

    responses, after = asyncio.run(scenario())
    for index, response in enumerate(responses):
        assert response.status_code == 200, (index, response.text)
        ids, logits = expected[index % len(IMAGES)]
        predictions = response.json()["images"][0]["predictions"]
        assert [p["class_id"] for p in predictions] == ids
        np.testing.assert_allclose([p["logit"] for p in predictions], logits, rtol=1e-4, atol=1e-4)
    # requests that slipped in before the listener closed were served; then the door closed
    assert after[-1] in ("refused", "503"), after
    assert set(after[:-1]) <= {"200"}, after
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/healthz", timeout=5)
    try:
        code = server.process.wait(timeout=60)
    except Exception:
        pytest.fail(f"the server did not exit after draining:\n{server.log()}")
    assert code == 0, server.log()
    print(f"drain: {count} in flight or queued at SIGTERM, all 200; new requests after it: {after}")
