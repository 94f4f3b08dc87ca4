"""The load generator's HTTP client against a scripted asyncio server: keep-alive, chunked answers,
a connection closed by the server while idle, refused connections."""

from __future__ import annotations

import asyncio
import sys

import pytest


@pytest.fixture(scope="module")
def rawhttp(load_test):
    return sys.modules["benchmarks.rawhttp"]


async def _serve(answers: list[bytes], close_after: set[int]) -> tuple[asyncio.Server, list[int]]:
    """Answers requests in order with ``answers``; closes the connection after the answers numbered in
    ``close_after``. Returns the server and the connection number of every request."""
    connections: list[int] = []
    opened = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal opened
        opened += 1
        number = opened
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                await reader.readexactly(length)
                index = len(connections)
                connections.append(number)
                writer.write(answers[index])
                await writer.drain()
                if index in close_after:
                    break
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0), connections


def _ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body


def test_keep_alive_chunked_and_a_stale_connection(rawhttp):
    chunked = b'HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{"a"\r\n3\r\n: 1\r\n1\r\n}\r\n0\r\n\r\n'
    answers = [_ok(b'{"n": 0}'), chunked, _ok(b'{"n": 2}'), _ok(b'{"n": 3}')]

    async def scenario():
        server, connections = await _serve(answers, close_after={1})
        port = server.sockets[0].getsockname()[1]
        client = rawhttp.RawClient(f"http://127.0.0.1:{port}")
        request = rawhttp.request_bytes("/x", {"Content-Type": "image/jpeg"}, b"body", client.authority)
        got = [await client.send(request) for _ in range(4)]
        await client.aclose()
        server.close()
        return got, connections

    got, connections = asyncio.run(scenario())
    assert [r.status_code for r in got] == [200, 503, 200, 200]
    assert got[0].json() == {"n": 0} and got[1].json() == {"a": 1} and got[3].json() == {"n": 3}
    # one connection kept alive for two requests; the server closed it, and a new one carried the rest
    assert connections == [1, 1, 2, 2]


def test_a_refused_connection_is_a_transport_error(rawhttp):
    async def scenario():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        client = rawhttp.RawClient(f"http://127.0.0.1:{port}")
        await client.send(rawhttp.request_bytes("/x", {}, b"", client.authority))

    with pytest.raises(sys.modules["benchmarks.rawhttp"].TransportError):
        asyncio.run(scenario())


def test_only_plain_http_urls(rawhttp):
    with pytest.raises(ValueError, match="plain http"):
        rawhttp.RawClient("https://example.org")
