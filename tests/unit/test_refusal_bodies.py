"""What the outermost middleware reads of a body it refuses: the rest of it, dropped, so that the
answer is not lost to a reset when the connection closes, but never more than ``discard_bytes`` in
all, never past the body deadline, and nothing for a client that waits for ``100 Continue``."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from app.api.middleware import RequestContextMiddleware
from app.serving.metrics import ServiceMetrics


class _Held:
    """An inner app that holds every request it gets until ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.started.set()
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


class _Body:
    """``receive`` for a body of ``chunks`` chunks of ``size`` bytes (endless when None); after them
    the body ``"end"``s, or the client sends nothing for ever (``"stall"``), or goes (``"gone"``).
    Counts the chunks read."""

    def __init__(self, size: int = 100, chunks: int | None = None, after: str = "end") -> None:
        self.size, self.chunks, self.after = size, chunks, after
        self.reads = 0

    async def __call__(self) -> dict[str, Any]:
        if self.chunks is not None and self.reads >= self.chunks:
            if self.after == "stall":
                await asyncio.Event().wait()
            return {"type": "http.disconnect"}
        self.reads += 1
        last = self.reads == self.chunks and self.after == "end"
        return {"type": "http.request", "body": b"x" * self.size, "more_body": not last}


def _scope(headers: list[tuple[bytes, bytes]], method: str = "POST") -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": "/v1/models/m/predict",
        "headers": headers,
        "query_string": b"",
    }


async def _call(app: Any, headers: list[tuple[bytes, bytes]], body: _Body) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app(_scope(headers), body, send), timeout=10)
    return sent


def _middleware(**kwargs: Any) -> tuple[RequestContextMiddleware, _Held]:
    inner = _Held()
    options: dict[str, Any] = {"max_body_bytes": 1000, "max_concurrent": 1, **kwargs}
    return RequestContextMiddleware(inner, metrics=ServiceMetrics(), **options), inner


async def _overloaded(**kwargs: Any) -> tuple[RequestContextMiddleware, _Held, asyncio.Task[Any]]:
    """The middleware with its one slot taken by a held request."""
    app, inner = _middleware(**kwargs)
    holder = asyncio.create_task(_call(app, [(b"content-length", b"0")], _Body(size=0, chunks=1)))
    await asyncio.wait_for(inner.started.wait(), 5)
    return app, inner, holder


def _status_code_close(sent: list[dict[str, Any]]) -> tuple[int, str, bool]:
    headers = dict(sent[0]["headers"])
    code = json.loads(sent[1]["body"])["error"]["code"]
    return sent[0]["status"], code, headers.get(b"connection") == b"close"


async def _release(inner: _Held, holder: asyncio.Task[Any]) -> None:
    inner.release.set()
    await holder


async def test_a_refused_body_is_read_to_its_end_and_the_connection_kept():
    app, inner, holder = await _overloaded()
    body = _Body(chunks=5)  # 500 bytes in 5 chunks
    assert _status_code_close(await _call(app, [(b"content-length", b"500")], body)) == (
        503,
        "overloaded",
        False,
    )
    assert body.reads == 5
    await _release(inner, holder)


@pytest.mark.parametrize(
    ("headers", "reads"),
    [
        # announced larger than the discard bound: nothing is read
        ([(b"content-length", b"2001")], 0),
        # a client waiting for 100 Continue has not sent its body: none is asked for
        ([(b"content-length", b"500"), (b"expect", b"100-continue")], 0),
        # streamed past the bound (2 x 1,000 bytes): reading stops at the first chunk past it
        ([(b"transfer-encoding", b"chunked")], 21),
    ],
)
async def test_a_refused_body_past_the_bounds_is_left_unread_and_the_connection_closed(headers, reads):
    app, inner, holder = await _overloaded()
    body = _Body()
    assert _status_code_close(await _call(app, headers, body)) == (503, "overloaded", True)
    assert body.reads == reads
    await _release(inner, holder)


async def test_a_refused_body_that_stalls_is_answered_at_the_body_deadline():
    app, inner, holder = await _overloaded(body_timeout_s=0.2)
    body = _Body(chunks=2, after="stall")
    assert _status_code_close(await _call(app, [(b"content-length", b"1000")], body)) == (
        503,
        "overloaded",
        True,
    )
    await _release(inner, holder)


async def test_a_client_gone_while_its_refused_body_is_read_ends_the_request():
    app, inner, holder = await _overloaded()
    body = _Body(chunks=2, after="gone")
    assert _status_code_close(await _call(app, [(b"content-length", b"900")], body)) == (
        503,
        "overloaded",
        True,
    )
    assert body.reads == 2
    await _release(inner, holder)


async def test_a_body_over_the_limit_is_read_on_to_its_end_within_twice_the_limit():
    """413: a streamed body that ends before twice the limit is read to its end (the connection
    stays); a Content-Length up to twice the limit likewise; one above it is not read at all."""
    app, _ = _middleware(max_concurrent=0)
    for headers, chunks, reads, close in (
        ([(b"transfer-encoding", b"chunked")], 15, 15, False),
        ([(b"content-length", b"1500")], 15, 15, False),
        ([(b"content-length", b"2500")], 25, 0, True),
    ):
        body = _Body(chunks=chunks)
        sent = await _call(app, headers, body)
        assert _status_code_close(sent) == (413, "payload_too_large", close), headers
        assert body.reads == reads, headers
