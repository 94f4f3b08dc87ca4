"""The concurrency limit of the outermost middleware: past it, a JSON 503 with Retry-After, before
the body is read; probes and metrics always get through; a finished request frees its slot."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from app.api.middleware import RequestContextMiddleware
from app.config import Settings
from app.serving.metrics import ServiceMetrics


class _Inner:
    """A raw ASGI app: ``/slow`` waits for ``release``; every path answers 200 with its body length."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.calls.append(scope["path"])
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/slow":
            await self.release.wait()
        payload = str(len(body)).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": payload})


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def _wait_for(condition: Any) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


async def test_requests_past_the_limit_get_a_json_503_and_probes_still_pass():
    import app.api.oip  # (mounting /v2 registers its error shape)

    inner = _Inner()
    metrics = ServiceMetrics()
    app = RequestContextMiddleware(
        inner, metrics=metrics, max_body_bytes=1000, max_concurrent=2, retry_after_s=3
    )
    async with _client(app) as client:
        slow = [asyncio.create_task(client.post("/slow", content=b"x" * 10)) for _ in range(2)]
        await _wait_for(lambda: app.active == 2)

        refused = await client.post("/v1/models/m/explain", content=b"y" * 50)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "3"
        # its body was read to its end and dropped, so the connection can stay open
        assert "connection" not in refused.headers
        error = refused.json()["error"]
        assert error["code"] == "overloaded" and "2 requests" in error["message"]
        assert error["request_id"] == refused.headers["x-request-id"]
        # the Open Inference Protocol's error shape under /v2
        oip = await client.post("/v2/models/m/infer", content=b"{}")
        assert oip.status_code == 503 and isinstance(oip.json()["error"], str)
        assert inner.calls == ["/slow", "/slow"]  # neither refused request reached the app

        probes = ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready")
        model_probes = ("/v2/models/m/ready", "/v2/models/m/versions/1/ready")
        for probe in probes + model_probes:
            assert (await client.get(probe)).status_code == 200, probe
        # a CORS preflight is answered too (by the CORS layer inside; here the inner app)
        preflight = await client.options(
            "/v1/models/m/explain",
            headers={"origin": "https://app.example", "access-control-request-method": "POST"},
        )
        assert preflight.status_code == 200
        # a plain OPTIONS is an ordinary request
        assert (await client.options("/v1/models/m/explain")).status_code == 503
        assert app.active == 2  # none of these took a slot
        # a path that only looks like a probe is counted
        assert (await client.get("/v2/models/m/ready/x")).status_code == 503

        inner.release.set()
        assert [(await task).status_code for task in slow] == [200, 200]
        assert app.active == 0
        again = await client.post("/v1/models/m/explain", content=b"y" * 50)
        assert again.status_code == 200 and again.text == "50"
    exported = metrics.render().decode()
    assert "reciprocam_overloaded_total 4.0" in exported
    assert 'status="503"' in exported


async def test_no_limit_when_zero():
    inner = _Inner()
    app = RequestContextMiddleware(inner, metrics=ServiceMetrics(), max_body_bytes=1000, max_concurrent=0)
    async with _client(app) as client:
        slow = [asyncio.create_task(client.post("/slow")) for _ in range(5)]
        await _wait_for(lambda: inner.calls.count("/slow") == 5)
        assert (await client.get("/other")).status_code == 200
        assert app.active == 0  # nothing is counted without a limit
        inner.release.set()
        assert [(await task).status_code for task in slow] == [200] * 5


def test_the_limit_is_a_setting(monkeypatch: pytest.MonkeyPatch):
    assert Settings().limits.max_concurrent_requests == 512
    monkeypatch.setenv("RECIPROCAM_LIMITS__MAX_CONCURRENT_REQUESTS", "7")
    assert Settings().limits.max_concurrent_requests == 7
    monkeypatch.setenv("RECIPROCAM_LIMITS__MAX_CONCURRENT_REQUESTS", "-1")
    with pytest.raises(ValueError):
        Settings()


async def test_middleware_errors_take_the_shape_of_the_paths_api():
    """The 413 of the body limit, like the 503 above: OIP `{"error": message}` under /v2."""
    app = RequestContextMiddleware(_Inner(), metrics=ServiceMetrics(), max_body_bytes=10)
    async with _client(app) as client:
        oip = await client.post("/v2/models/m/infer", content=b"x" * 11)
        service = await client.post("/v1/models/m/predict", content=b"x" * 11)
    assert oip.status_code == service.status_code == 413
    assert oip.json() == {"error": "the request body is larger than the limit of 10 bytes"}
    assert service.json()["error"]["code"] == "payload_too_large"


async def test_a_refusal_carries_the_cors_headers_for_an_allowed_origin():
    from starlette.middleware.cors import CORSMiddleware

    inner = _Inner()
    cors = CORSMiddleware(inner, allow_origins=["https://app.example"], expose_headers=["Retry-After"])
    app = RequestContextMiddleware(
        cors, metrics=ServiceMetrics(), max_body_bytes=1000, max_concurrent=1, cors=cors
    )
    async with _client(app) as client:
        slow = asyncio.create_task(client.post("/slow"))
        await _wait_for(lambda: app.active == 1)
        allowed = await client.post("/x", headers={"origin": "https://app.example"})
        foreign = await client.post("/x", headers={"origin": "https://evil.example"})
        inner.release.set()
        assert (await slow).status_code == 200
    assert allowed.status_code == foreign.status_code == 503
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert allowed.headers["access-control-expose-headers"] == "Retry-After"
    assert "access-control-allow-origin" not in foreign.headers


def test_exempt_paths_are_exactly_the_apps_probe_and_metrics_routes():
    """The exempt paths are listed by hand in the middleware, which runs before routing: every route
    guarded by the health or metrics key (the probes and the scrape) must be exempt, and no other
    route may be. Path parameters are filled in with sample values."""
    import re

    from fastapi.routing import APIRoute

    from app.api import health, oip, v1
    from app.api.deps import require_api_key_for_health, require_api_key_for_metrics
    from app.api.middleware import _exempt

    probe_guards = {require_api_key_for_health, require_api_key_for_metrics}
    seen = 0
    for route in [*health.router.routes, *v1.router.routes, *oip.router.routes]:
        assert isinstance(route, APIRoute)
        path = re.sub(r"\{[^}]+\}", "sample", route.path)
        is_probe = any(dependency.call in probe_guards for dependency in route.dependant.dependencies)
        for method in route.methods:
            assert _exempt(path, method, {}) == is_probe, (route.path, method)
        seen += is_probe
    # GET and HEAD /healthz and /readyz, /metrics, and four /v2 health and model-ready probes
    assert seen == 9


async def test_a_request_cancelled_by_the_server_shutdown_gets_a_json_503():
    """The server cancels the requests still running when its graceful shutdown ends: the
    unanswered one gets a retryable 503 shutting_down in the service's shape (not the server's
    plain-text 500), the cancellation still propagates, and the slot is freed."""
    import json

    inner = _Inner()
    app = RequestContextMiddleware(inner, metrics=ServiceMetrics(), max_body_bytes=1000, max_concurrent=2)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"x", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/slow",
        "headers": [(b"content-length", b"1")],
        "query_string": b"",
    }
    task = asyncio.create_task(app(scope, receive, send))
    await _wait_for(lambda: inner.calls == ["/slow"])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sent[0]["status"] == 503
    headers = dict(sent[0]["headers"])
    assert headers[b"retry-after"] == b"1" and headers[b"connection"] == b"close"
    assert json.loads(sent[1]["body"])["error"]["code"] == "shutting_down"
    assert app.active == 0
