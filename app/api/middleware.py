"""Outermost ASGI layer: request id, concurrency and body size limits, access log, HTTP metrics,
last-resort 500."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import time
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware as StarletteCORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_payload, error_response
from app.serving.logs import request_id_var
from app.serving.metrics import ServiceMetrics

logger = logging.getLogger("app.access")
error_logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Response headers a page on another origin may read (CORS expose-headers).
EXPOSED_HEADERS = ("X-Request-ID", "Retry-After")
# Probes and scrapes are never refused for load: an overloaded replica is alive, and says so.
# The per-model readiness probes of the Open Inference Protocol carry the model's name, so they are
# matched by pattern. tests/unit/test_overload.py checks both against the app's probe routes.
UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
UNLIMITED_PATTERN = re.compile(r"/v2/models/[^/]+(?:/versions/[^/]+)?/ready")


# Every response: no content sniffing. The demo page (``/`` and ``/static/``): a Content-Security-Policy
# that allows only its own script, styles and API calls (images also from data: and blob: URLs, which
# the page makes itself), no framing by other sites, and no Referer. /docs (Swagger UI from a CDN, with
# an inline script) keeps FastAPI's own page and no policy.
NOSNIFF = (b"x-content-type-options", b"nosniff")
PAGE_HEADERS = (
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        b"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
        b"frame-ancestors 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)


def _page_path(path: str) -> bool:
    return path == "/" or path.startswith("/static/")


class _BodyTooLarge(Exception):
    def __init__(self, read: int, ended: bool = False) -> None:
        super().__init__(read)
        self.read = read  # body bytes read before the limit was passed (0: refused from Content-Length)
        self.ended = ended  # whether that was the whole body


class _ClientGone(Exception):
    pass


class _BodyTimeout(Exception):
    pass


class _RequestIds:
    """32 hex digits: a random half drawn once per process, then a counter. A fresh random id per
    request (uuid4) costs a system call for its randomness on every request."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)  # a forked worker draws its own half

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


new_request_id = _RequestIds()


class RequestContextMiddleware:
    """Gives every request an id (the client's ``X-Request-ID`` when it is sane), returns it on every
    response, refuses a request with 503 ``overloaded`` while ``max_concurrent`` others are in
    progress (0: no limit; probes, metrics and CORS preflights are exempt and not counted; the count
    is per worker process) and bodies over ``max_body_bytes`` with 413, both before the body is
    buffered, turns any unhandled error into the JSON error shape, and records metrics and one access
    log line.

    A refused request's body is read to its end and dropped before the answer goes out, as long as it
    stays within ``discard_bytes`` in all (default: twice ``max_body_bytes``) and arrives within
    ``body_timeout_s`` of the request's start: closing a connection whose request data is still
    unread makes the kernel reset it, and the reset destroys the answer on its way to a client that
    reads it only once it has sent its body (most clients). Past those bounds the answer goes out
    unread, with ``Connection: close``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: ServiceMetrics,
        max_body_bytes: int,
        max_concurrent: int = 0,
        retry_after_s: int = 1,
        body_timeout_s: float | None = None,
        cors: StarletteCORSMiddleware | None = None,
        discard_bytes: int | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.discard_bytes = 2 * max_body_bytes if discard_bytes is None else discard_bytes
        self.body_timeout_s = body_timeout_s
        self.max_concurrent = max_concurrent
        self.retry_after_s = retry_after_s
        self.active = 0  # limited requests admitted and not finished (one event loop: no lock needed)
        # This layer answers some errors itself, outside the CORS layer: ``cors`` (configured like
        # that layer) adds the same headers to them, so that a page on an allowed origin can read
        # them and their Retry-After.
        self.cors = cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = _headers(scope)
        supplied = headers.get(REQUEST_ID_HEADER, "")
        request_id = supplied if _VALID_REQUEST_ID.match(supplied) else new_request_id()
        # A per-request copy: servers may hand every request the same lifespan state dict.
        state = dict(scope.get("state") or {})
        scope["state"] = state
        state["request_id"] = request_id
        state["started"] = started
        token = request_id_var.set(request_id)
        response: dict[str, Any] = {"status": 500, "started": False}
        method = scope.get("method", "GET")
        page = _page_path(scope.get("path", ""))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                response["started"] = True
                raw_headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER.encode()
                ]
                raw_headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                raw_headers.append(NOSNIFF)
                if page:
                    raw_headers.extend(PAGE_HEADERS)
                message = {**message, "headers": raw_headers}
            await send(message)

        path = scope.get("path", "")
        # Probes, scrapes and CORS preflights are never refused, and do not take a slot; none of them
        # takes a body, so none is read for them either (a POST there is a 405 that reads nothing).
        exempt = _exempt(path, method, headers)
        limited = bool(self.max_concurrent) and not exempt
        admitted = not limited or self.active < self.max_concurrent
        if limited and admitted:
            self.active += 1
        try:
            if not admitted:
                self.metrics.overloaded.inc()
                ended = await self._discard_body(method, headers, receive, started)
                await _send_error(
                    self._error_send(scope, send_with_id),
                    503,
                    "overloaded",
                    f"the service is handling its limit of {self.max_concurrent} requests at once; "
                    "retry later",
                    request_id,
                    path=path,
                    close=not ended,
                    headers=[(b"retry-after", str(self.retry_after_s).encode())],
                )
                return
            app_receive = receive
            if method in _BODY_METHODS and not exempt:
                try:
                    app_receive = await self._buffered_body(headers, receive)
                except _BodyTooLarge as too_large:
                    ended = too_large.ended or await self._discard_body(
                        method, headers, receive, started, too_large.read
                    )
                    await _send_error(
                        self._error_send(scope, send_with_id),
                        413,
                        "payload_too_large",
                        f"the request body is larger than the limit of {self.max_body_bytes} bytes",
                        request_id,
                        path=path,
                        close=not ended,
                    )
                    return
                except _BodyTimeout:
                    await _send_error(
                        self._error_send(scope, send_with_id),
                        408,
                        "request_timeout",
                        f"the request body did not arrive within {self.body_timeout_s:g} s",
                        request_id,
                        path=path,
                        close=True,
                    )
                    return
                except _ClientGone:
                    response["status"] = 499
                    return
            await self.app(scope, app_receive, send_with_id)
        except asyncio.CancelledError:
            # The server cancels the requests still running when its graceful shutdown ends: answer
            # the unanswered ones in the service's shape, as a retryable 503, instead of leaving the
            # server to send a plain-text 500.
            if not response["started"]:
                await _send_error(
                    self._error_send(scope, send_with_id),
                    503,
                    "shutting_down",
                    "the service shut down before this request could finish; retry",
                    request_id,
                    path=path,
                    close=True,
                    headers=[(b"retry-after", b"1")],
                )
            raise
        except Exception as exc:
            error_logger.exception("unhandled error: %s", type(exc).__name__)
            if not response["started"]:
                await _send_error(
                    self._error_send(scope, send_with_id),
                    500,
                    "internal_error",
                    "internal server error",
                    request_id,
                    path=path,
                )
        finally:
            if limited and admitted:
                self.active -= 1
            elapsed = time.perf_counter() - started
            route = _route_template(scope)
            status = int(response["status"])
            self.metrics.http_requests.labels(route, method, str(status)).inc()
            self.metrics.http_latency.labels(route, method).observe(elapsed)
            logger.info(
                "%s %s %d %.1fms",
                method,
                scope.get("path", ""),
                status,
                elapsed * 1000,
                extra={
                    "request_id": request_id,
                    "method": method,
                    "path": scope.get("path", ""),
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                    "client": (scope.get("client") or ("", 0))[0],
                    "model": state.get("model"),
                    "images": state.get("images"),
                },
            )
            request_id_var.reset(token)

    def _error_send(self, scope: Scope, send: Send) -> Send:
        """``send`` for an error this layer answers itself, with the CORS layer's headers added."""
        cors = self.cors
        if cors is None:
            return send
        request_headers = Headers(scope=scope)

        async def send_with_cors(message: Message) -> None:
            await cors.send(message, send, request_headers)

        return send_with_cors

    async def _buffered_body(self, headers: dict[str, str], receive: Receive) -> Receive:
        """Read the whole body (refusing it past the size limit, or when it has not arrived within
        ``body_timeout_s``: a stalled upload must not hold its slot), and replay it to the
        application."""
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _BodyTooLarge(0)
        if self.body_timeout_s is None:
            body = await self._read_body(receive)
        else:
            try:
                body = await asyncio.wait_for(self._read_body(receive), self.body_timeout_s)
            except asyncio.TimeoutError:
                raise _BodyTimeout from None
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    async def _discard_body(
        self, method: str, headers: dict[str, str], receive: Receive, started: float, read: int = 0
    ) -> bool:
        """Read and drop the rest of the body of a request being refused, ``read`` bytes of which
        have been read already. True when the body has ended, so that the connection
        can stay open; False when it was left unread: larger than ``discard_bytes`` (by its
        Content-Length or as it streams), later than ``body_timeout_s`` after ``started``, the client
        gone, or a client that waits to be told before it sends (``Expect: 100-continue``, which
        reading would answer with 100 Continue)."""
        if method not in _BODY_METHODS:
            return True  # not read here: the server drops a body after the answer on its own
        if read == 0 and headers.get("expect", "").lower() == "100-continue":
            return False
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.discard_bytes:
            return False
        if declared == "0":
            return True

        async def drain() -> bool:
            total = read
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return False
                total += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return True
                if total > self.discard_bytes:
                    return False

        if self.body_timeout_s is None:
            return await drain()
        left = self.body_timeout_s - (time.perf_counter() - started)
        if left <= 0:
            return False
        try:
            return await asyncio.wait_for(drain(), left)
        except asyncio.TimeoutError:
            return False

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _BodyTooLarge(size, ended=not message.get("more_body", False))
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _exempt(path: str, method: str, headers: dict[str, str]) -> bool:
    """Requests the concurrency limit never refuses: probes, metrics and CORS preflights."""
    preflight = method == "OPTIONS" and "access-control-request-method" in headers
    return path in UNLIMITED_PATHS or preflight or UNLIMITED_PATTERN.fullmatch(path) is not None


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"


async def _send_error(
    send: Send,
    status: int,
    code: str,
    message: str,
    request_id: str,
    *,
    path: str,
    close: bool = False,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """An error response in the shape of the path's API (see ``error_payload``)."""
    payload = error_payload(path, code, message, request_id)
    body = json.dumps(payload).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(headers or []),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class CORSMiddleware(StarletteCORSMiddleware):
    """Starlette's CORS handling, with refused preflight requests answered in the service's JSON
    error shape (``{"error": {...}}``, or ``{"error": "..."}`` under ``/v2``) instead of plain text.
    Allowed preflights and simple requests are Starlette's own behaviour."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            headers = Headers(scope=scope)
            if "origin" in headers and "access-control-request-method" in headers:
                response = self.preflight_response(request_headers=headers)
                if response.status_code == 400:
                    response = _refused_preflight(scope, response)
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _refused_preflight(scope: Scope, plain: Response) -> Response:
    message = bytes(plain.body).decode("utf-8", "replace") or "Disallowed CORS request"
    headers = {k: v for k, v in plain.headers.items() if k.lower() not in ("content-length", "content-type")}
    return error_response(
        Request(scope), 400, "cors_rejected", message + " (see the service's cors settings)", headers
    )
