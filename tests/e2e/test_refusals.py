"""Every refused client gets its answer over a real socket: a burst of uploads far past the limits,
and the early answers of the outermost middleware (413, 408, 503) to clients that send their whole
body before they read.

A refusal answered before the body is read used to close the connection with the body still unread,
and the kernel then resets the connection, which destroys the answer on its way: the client saw a
connection error instead of its 503.
"""

from __future__ import annotations

import asyncio
import collections
import io
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.e2e.conftest import ServerProcess
from tests.e2e.test_overload_and_drain import _enough_file_descriptors

BURST = 1000
QUEUE = 16
CONCURRENT = 64


def noisy_jpeg(kilobytes: int = 55, seed: int = 0) -> bytes:
    """A JPEG of at least ``kilobytes`` KB (noise keeps it from compressing away)."""
    rng = np.random.default_rng(seed)
    side = 64
    while True:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
            buffer, "JPEG", quality=85
        )
        if buffer.tell() >= kilobytes * 1000:
            return buffer.getvalue()
        side += 8


async def upload_burst(url: str, count: int, body: bytes) -> list[tuple[int, httpx.Response | str]]:
    """``count`` multipart uploads at once, each on its own connection; a connection error is given
    by its name. httpx writes a multipart body in several pieces, after its headers, so the server
    sees a request before the whole body is there, as with a client on a slower network."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def one(index: int) -> tuple[int, httpx.Response | str]:
            try:
                response = await client.post(
                    "/v1/models/tiny/predict",
                    files={"file": (f"photo-{index}.jpg", body, "image/jpeg")},
                    headers={"x-request-id": f"burst-{index}"},
                )
                await response.aread()
                return index, response
            except httpx.TransportError as exc:
                return index, type(exc).__name__

        return await asyncio.gather(*(one(index) for index in range(count)))


def check_answers(
    results: list[tuple[int, httpx.Response | str]], *, request_ids: bool = True
) -> collections.Counter[str]:
    """Every client got an HTTP answer: 200, or 503/429 with Retry-After in the service's JSON error
    shape. Returns the answers counted by status and error code."""
    answers: collections.Counter[str] = collections.Counter()
    failures = []
    for index, response in results:
        if isinstance(response, str):
            failures.append(f"#{index}: {response}")
            continue
        if response.status_code == 200:
            answers["200"] += 1
            assert response.json()["images"][0]["predictions"], index
            continue
        if response.status_code not in (429, 503) or not response.headers.get("retry-after"):
            failures.append(f"#{index}: {response.status_code} {response.headers} {response.text[:200]}")
            continue
        error = response.json()["error"]
        if request_ids:
            assert error["request_id"] == f"burst-{index}", error
        answers[f"{response.status_code} {error['code']}"] += 1
    assert not failures, f"{len(failures)} of {len(results)} clients got no proper answer: {failures[:10]}"
    return answers


def test_every_client_of_a_burst_past_the_limits_gets_its_answer(start_server):
    """1,000 uploads of a 55 KB JPEG at once against a queue of 16 images and 64 requests in progress:
    each client gets 200 or a JSON 503 with Retry-After (none a reset), and the server then serves."""
    _enough_file_descriptors(2 * BURST + 200)
    server = start_server(
        {
            "batch__max_queue_images": QUEUE,
            "batch__max_wait_ms": 2,
            "limits__max_concurrent_requests": CONCURRENT,
        }
    )
    body = noisy_jpeg()
    answers = check_answers(asyncio.run(upload_burst(server.url, BURST, body)))
    print(f"burst of {BURST} x {len(body)} B: {dict(answers)}")
    assert sum(answers.values()) == BURST
    assert answers["200"] > 0 and answers["503 overloaded"] > 0, answers
    assert server.metric("reciprocam_overloaded_total") == answers["503 overloaded"]
    # healthy, and serving again
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    again = httpx.post(
        f"{server.url}/v1/models/tiny/predict", files={"file": ("again.jpg", body, "image/jpeg")}, timeout=60
    )
    assert again.status_code == 200, again.text
    assert server.metric("reciprocam_queue_depth_images", model="tiny") == 0
    assert server.process.poll() is None


# --- early answers to a client that sends everything before it reads ---------------------------------


def post_in_pieces(url: str, body: bytes, *, declare_length: bool = True) -> httpx.Response | str:
    """An upload written in pieces a little apart, as over a slower network, by an asyncio client
    that reads the answer once its body is sent: the server answers before it has all of it. The
    answer, or the name of the connection error the client got instead."""

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 16384):
            await asyncio.sleep(0.01)
            yield body[start : start + 16384]

    async def post() -> httpx.Response | str:
        headers = {"content-type": "image/jpeg"}
        if declare_length:
            headers["content-length"] = str(len(body))
        async with httpx.AsyncClient(timeout=30) as client:
            try:
                response = await client.post(
                    f"{url}/v1/models/tiny/predict", content=pieces(), headers=headers
                )
                await response.aread()
                return response
            except httpx.TransportError as exc:
                return type(exc).__name__

    return asyncio.run(post())


def read_to_end(port: int, request: bytes) -> tuple[int, dict[str, str], dict]:  # type: ignore[type-arg]
    """Sends ``request`` on a raw connection and reads until the server closes it: status, headers
    and JSON body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(request)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def _head(length: int, extra: str = "") -> bytes:
    return (
        "POST /v1/models/tiny/predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


@pytest.fixture(scope="module")
def limited(e2e_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the early answers: bodies up to 100 KB, one request at a time, 5 s for a body."""
    server = ServerProcess(
        e2e_weights,
        tmp_path_factory.mktemp("limited"),
        {
            "limits__max_body_bytes": 100_000,
            "limits__max_concurrent_requests": 1,
            "limits__body_timeout_s": 5,
        },
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _slot_free(server: ServerProcess) -> None:
    """Until an ordinary request is admitted again (the previous test's connections are gone)."""
    for _ in range(500):
        if httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 200:
            return
        time.sleep(0.02)
    pytest.fail(f"the concurrency slot stayed taken:\n{server.log()}")


def test_a_body_over_the_limit_gets_its_413(limited):
    """A body over limits.max_body_bytes, announced by Content-Length or streamed chunked, that the
    client sends in full before it reads: the 413 arrives (the server reads the rest of the body and
    drops it, up to twice the limit, and keeps the connection). A body announced far larger is
    refused unread, at once, and the connection closed."""
    _slot_free(limited)
    body = bytes(160_000)
    for declare_length in (True, False):
        response = post_in_pieces(limited.url, body, declare_length=declare_length)
        assert not isinstance(response, str), f"no answer ({declare_length=}): {response}"
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "payload_too_large"
        assert response.headers.get("connection") != "close"
    status, headers, payload = read_to_end(limited.port, _head(10**10))
    assert status == 413 and payload["error"]["code"] == "payload_too_large"
    assert headers["connection"] == "close"


def test_a_refusal_past_the_concurrency_limit_arrives(limited):
    """With the one slot taken, a client that sends its upload before it reads gets its 503
    overloaded with Retry-After, not a reset; one that asked for ``Expect: 100-continue`` gets it
    without sending its body at all."""
    _slot_free(limited)
    body = noisy_jpeg(55)
    with socket.create_connection(("127.0.0.1", limited.port), timeout=30) as holder:
        holder.sendall(_head(len(body)))  # takes the slot and keeps it: its body never comes
        for _ in range(500):
            if httpx.get(f"{limited.url}/v1/models", timeout=10).status_code == 503:
                break
            time.sleep(0.01)
        response = post_in_pieces(limited.url, body)
        assert not isinstance(response, str), f"no answer: {response}"
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "overloaded"
        # the 503 comes instead of 100 Continue, and the connection is closed
        status, headers, payload = read_to_end(limited.port, _head(len(body), "Expect: 100-continue\r\n"))
        assert status == 503 and headers["connection"] == "close"
        assert payload["error"]["code"] == "overloaded"


def test_a_stalled_upload_gets_its_408(limited):
    """A client that sends part of its body and then nothing gets the 408 when it reads, and the
    server then serves."""
    _slot_free(limited)
    status, headers, payload = read_to_end(limited.port, _head(50_000) + bytes(20_000))
    assert status == 408 and payload["error"]["code"] == "request_timeout"
    assert headers["connection"] == "close"
    _slot_free(limited)
