"""A lean HTTP/1.1 client for the load generator: keep-alive connections over asyncio streams,
requests written as ready bytes, answers read by Content-Length (or chunks).

The load test shares the machine with the server it measures, so every CPU millisecond the client
spends is taken from the server: this client does no header normalisation, cookie or redirect
handling, and builds each request's bytes once, before the level.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson


class TransportError(Exception):
    """The connection failed before a whole answer arrived (refused, reset, closed early)."""


class _Stale(Exception):
    """The connection closed before any of the answer arrived."""


@dataclass
class RawResponse:
    status_code: int
    headers: dict[str, str]  # names in lower case
    content: bytes

    def json(self) -> Any:
        return orjson.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


def request_bytes(path: str, headers: dict[str, str], body: bytes, host: str) -> bytes:
    """One POST, ready to write on a keep-alive connection."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class RawClient:
    """Keep-alive connections to one ``http://host:port``, opened as needed and reused."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the load generator speaks plain http://host:port only, not {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.authority = parts.netloc
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def send(self, request: bytes) -> RawResponse:
        """Write ``request`` (from :func:`request_bytes`) and read its answer. A kept-alive connection
        the server closed meanwhile (its idle timeout) is replaced once, as any client does."""
        if self._idle:
            reader, writer = self._idle.pop()
            try:
                return await self._exchange(reader, writer, request)
            except _Stale:
                pass
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        try:
            return await self._exchange(reader, writer, request)
        except _Stale as exc:
            raise TransportError(str(exc.__cause__ or exc)) from exc

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
    ) -> RawResponse:
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
        except (OSError, asyncio.IncompleteReadError) as exc:  # nothing of an answer came
            writer.close()
            raise _Stale(f"{type(exc).__name__}: {exc}") from exc
        except (asyncio.LimitOverrunError, ValueError) as exc:
            writer.close()
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        try:
            status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
            version, status, _ = status_line.split(" ", 2)
            headers = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "content-length" in headers:
                content = await reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                content = await _read_chunked(reader)
            else:  # the body ends with the connection
                content = await reader.read()
                headers["connection"] = "close"
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            writer.close()
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        connection = headers.get("connection", "").lower()
        if connection == "close" or (version == "HTTP/1.0" and connection != "keep-alive"):
            writer.close()
        else:
            self._idle.append((reader, writer))
        return RawResponse(int(status), headers, content)

    async def aclose(self) -> None:
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers are sent by the service
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)
