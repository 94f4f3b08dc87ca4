"""API keys, CORS and logs."""

from __future__ import annotations

import hmac
import json
import logging

import pytest

from app.api import deps
from app.api.deps import key_is_valid
from app.serving.logs import JsonFormatter, RequestIdFilter, request_id_var
from tests.integration.conftest import assert_error, image_bytes, running_service, tiny_settings

KEY = "s3cret-key-0123456789"


@pytest.fixture
async def secured(tiny_weights):
    settings = tiny_settings(tiny_weights, auth={"api_keys": ["other-key", KEY]})
    async with running_service(settings) as client:
        yield client


async def test_api_key_required_on_api_routes(secured, caplog):
    caplog.set_level(logging.DEBUG)
    image = {"content": image_bytes(1), "headers": {"content-type": "image/png"}}
    error = assert_error(await secured.post("/v1/models/tiny/predict", **image), 401, "unauthorized")
    assert "API key" in error["message"]
    assert_error(await secured.get("/v1/models"), 401, "unauthorized")
    wrong = await secured.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert_error(wrong, 401, "unauthorized")
    assert wrong.headers["www-authenticate"] == "Bearer"
    assert_error(await secured.get("/v1/models", headers={"X-API-Key": KEY + "x"}), 401)
    assert (await secured.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})).status_code == 200
    assert (await secured.get("/v1/models", headers={"X-API-Key": KEY})).status_code == 200
    # both headers: let in when either carries a valid key, refused when neither does
    for pair in (
        {"X-API-Key": "nope", "Authorization": f"Bearer {KEY}"},
        {"X-API-Key": KEY, "Authorization": "Bearer nope"},
    ):
        assert (await secured.get("/v1/models", headers=pair)).status_code == 200, pair
    both_wrong = {"X-API-Key": "nope", "Authorization": "Bearer nope"}
    assert_error(await secured.get("/v1/models", headers=both_wrong), 401, "unauthorized")
    ok = await secured.post(
        "/v1/models/tiny/predict",
        content=image["content"],
        headers={**image["headers"], "Authorization": f"Bearer {KEY}"},
    )
    assert ok.status_code == 200
    # health, readiness and metrics stay open by default (probes and scrapers carry no key)
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await secured.get(path)).status_code == 200
    for path in ("/healthz", "/readyz"):  # probes that check with HEAD: the status, no body
        head = await secured.head(path)
        assert head.status_code == 200 and head.content == b"", path
    # the key never reaches the logs
    assert caplog.records
    assert all(KEY not in record.getMessage() and KEY not in str(vars(record)) for record in caplog.records)


async def test_health_and_metrics_can_be_protected(tiny_weights):
    settings = tiny_settings(
        tiny_weights, auth={"api_keys": [KEY], "protect_health": True, "protect_metrics": True}
    )
    async with running_service(settings, wait_ready=False) as client:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert_error(await client.get(path), 401, "unauthorized")
            assert (await client.get(path, headers={"X-API-Key": KEY})).status_code in (200, 503)
        for path in ("/healthz", "/readyz"):
            assert (await client.head(path)).status_code == 401
            assert (await client.head(path, headers={"X-API-Key": KEY})).status_code in (200, 503)


def test_key_comparison():
    keys = [b"alpha", b"beta"]
    assert key_is_valid("beta", keys) and key_is_valid("alpha", keys)
    assert not key_is_valid("bet", keys) and not key_is_valid("", keys) and not key_is_valid("gamma", keys)
    assert not key_is_valid("bétä", keys)


async def test_cors_for_allowed_origins_only(tiny_weights):
    settings = tiny_settings(tiny_weights, cors={"allow_origins": ["https://app.example"]})
    async with running_service(settings) as client:
        preflight = await client.options(
            "/v1/models/tiny/explain",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "X-API-Key, Content-Type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "x-api-key" in preflight.headers["access-control-allow-headers"].lower()
        simple = await client.get("/v1/models", headers={"Origin": "https://app.example"})
        assert simple.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()
        foreign = await client.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in foreign.headers
    async with running_service(tiny_settings(tiny_weights)) as client:
        plain = await client.get("/v1/models", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in plain.headers


@pytest.mark.parametrize(
    "cors",
    [
        {"allow_origins": ["https://app.example"]},
        {"allow_origins": ["*"]},
        {"allow_origins": ["*"], "allow_credentials": True},
    ],
    ids=["listed", "any", "any-with-credentials"],
)
async def test_errors_of_the_outer_layer_carry_the_cors_headers(tiny_weights, cors):
    """The 413 (and 503 overloaded) that the outermost layer answers itself carry the same CORS
    headers as the CORS layer puts on an ordinary response, so a page can read them."""
    settings = tiny_settings(tiny_weights, cors=cors, limits={"max_body_bytes": 1000})
    cors_names = ("access-control-allow-origin", "access-control-allow-credentials")
    async with running_service(settings) as client:
        for origin in ("https://app.example", "https://evil.example"):
            ordinary = await client.get("/v1/models", headers={"Origin": origin})
            refused = await client.post(
                "/v1/models/tiny/predict",
                content=b"x" * 2000,
                headers={"Origin": origin, "content-type": "image/png"},
            )
            assert ordinary.status_code == 200 and refused.status_code == 413
            for name in cors_names:
                assert refused.headers.get(name) == ordinary.headers.get(name), (origin, name)
            expose = refused.headers.get("access-control-expose-headers", "")
            expected = ordinary.headers.get("access-control-expose-headers", "")
            assert {h.strip().lower() for h in expose.split(",")} == {
                h.strip().lower() for h in expected.split(",")
            }
            if "origin" in ordinary.headers.get("vary", "").lower():
                assert "origin" in refused.headers.get("vary", "").lower()
        allowed = "*" in cors["allow_origins"] or "https://evil.example" in cors["allow_origins"]
        assert ("access-control-allow-origin" in refused.headers) == allowed


def test_json_log_lines_carry_the_request_id():
    record = logging.LogRecord("app.access", logging.INFO, __file__, 1, "GET %s %d", ("/x", 200), None)
    record.status = 200
    token = request_id_var.set("rid-1")
    try:
        RequestIdFilter().filter(record)
    finally:
        request_id_var.reset(token)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "GET /x 200" and line["request_id"] == "rid-1"
    assert line["status"] == 200 and line["level"] == "info" and line["logger"] == "app.access"


def test_text_log_lines_cannot_be_forged_through_the_request_path():
    """In the text format a request path carrying a newline (``%0a`` in the URL) stays on its own
    record's line, escaped; a traceback still follows on lines of its own."""
    import logging.config

    from app.serving.logs import logging_config

    config = logging_config("info", "text")
    formatter = logging.config.DictConfigurator(config).configure_custom(
        dict(config["formatters"]["default"])
    )
    forged = "/x\n2026-01-01 00:00:00,000 INFO app.access [admin]: POST /v1/models/m/explain 200"
    record = logging.LogRecord("app.access", logging.INFO, __file__, 1, "GET %s %d", (forged, 404), None)
    record.request_id = "rid-2"
    line = formatter.format(record)
    assert "\n" not in line and "\\n2026-01-01" in line and line.endswith(" 404")
    # other characters that end a line for str.splitlines and log viewers: C1 NEL, Unicode separators
    record.args = ("/x\x85a\u2028b\u2029c\x1ed", 404)
    assert len(formatter.format(record).splitlines()) == 1
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        failing = logging.LogRecord("app", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    failing.request_id = None
    assert "Traceback" in formatter.format(failing).split("\n", 1)[1]


async def test_access_log_records_each_request(client, caplog):
    caplog.set_level(logging.INFO, logger="app.access")
    await client.get("/v1/models/tiny", headers={"X-Request-ID": "trace-9"})
    records = [r for r in caplog.records if r.name == "app.access"]
    assert records and records[-1].status == 200 and records[-1].route == "/v1/models/{name}"
    assert records[-1].duration_ms >= 0 and records[-1].request_id == "trace-9"


def test_every_accepted_key_is_compared_in_constant_time(monkeypatch):
    """hmac.compare_digest against every accepted key, with no early exit on a match."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(deps.hmac, "compare_digest", spy)
    keys = [b"first", b"second", b"third"]
    assert key_is_valid("first", keys)
    assert [b for _, b in calls] == keys
    calls.clear()
    assert not key_is_valid("fourth", keys)
    assert len(calls) == 3


async def test_keys_never_reach_the_logs_even_when_wrong(secured, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-key-6a1f0c9e"
    attempts = [
        {"Authorization": f"Bearer {KEY}"},
        {"X-API-Key": KEY},
        {"Authorization": f"Bearer {wrong}"},
        {"X-API-Key": wrong},
        {"Authorization": f"Basic {KEY}"},
    ]
    statuses = []
    for headers in attempts:
        response = await secured.post(
            "/v1/models/tiny/predict",
            content=image_bytes(2),
            headers={"content-type": "image/png", **headers},
        )
        statuses.append(response.status_code)
        assert KEY not in response.text and wrong not in response.text
    assert statuses == [200, 200, 401, 401, 401]
    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    assert any('"status": 401' in line for line in lines) and any('"status": 200' in line for line in lines)
    for line in lines:
        assert KEY not in line and wrong not in line


async def test_unusual_credentials_are_refused_not_crashed(secured):
    for headers in (
        {"X-API-Key": "clé".encode("latin-1")},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer " + "x" * 10_000},
        {"Authorization": KEY},
        {"X-API-Key": ""},
    ):
        assert_error(await secured.get("/v1/models", headers=headers), 401, "unauthorized")
    # a key is only read from the headers, never from the query string
    assert_error(await secured.get("/v1/models", params={"api_key": KEY}), 401, "unauthorized")


async def test_unauthenticated_uploads_are_not_decoded(secured, monkeypatch):
    import app.serving.pipeline as pipeline_module
    import app.serving.service as service_module

    service = secured.app.state.service
    touched = []
    real_run_io, real_headers, real_prepare = (
        service.run_io,
        pipeline_module.read_headers,
        service_module.prepare_image,
    )

    async def counting(function, *args, **kwargs):
        touched.append("io pool")
        return await real_run_io(function, *args, **kwargs)

    def reading_headers(*args, **kwargs):
        touched.append("headers")
        return real_headers(*args, **kwargs)

    def decoding(*args, **kwargs):
        touched.append("decode")
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(service, "run_io", counting)
    monkeypatch.setattr(pipeline_module, "read_headers", reading_headers)
    monkeypatch.setattr(service_module, "prepare_image", decoding)
    post = {"content": image_bytes(3), "headers": {"content-type": "image/png"}}
    response = await secured.post("/v1/models/tiny/explain", **post)
    assert_error(response, 401, "unauthorized")
    assert touched == []
    # the same upload with the key is read and decoded (on the event loop's thread: it is small)
    response = await secured.post(
        "/v1/models/tiny/explain", **{**post, "headers": {**post["headers"], "X-API-Key": KEY}}
    )
    assert response.status_code == 200, response.text
    assert touched == ["headers", "decode"]


async def test_cors_preflight_from_a_foreign_origin_is_refused(tiny_weights):
    settings = tiny_settings(tiny_weights, cors={"allow_origins": ["https://app.example"]})
    async with running_service(settings) as client:
        preflight = await client.options(
            "/v1/models/tiny/explain",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        error = assert_error(preflight, 400, "cors_rejected")
        assert "origin" in error["message"]
        assert "access-control-allow-origin" not in preflight.headers
        # a disallowed method from an allowed origin is refused the same way, and /v2 paths answer
        # in the Open Inference Protocol's error shape
        oip = await client.options(
            "/v2/models/tiny/infer",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "PATCH"},
        )
        assert oip.status_code == 400
        assert set(oip.json()) == {"error"} and "method" in oip.json()["error"]


async def test_open_probes_reveal_no_model_list_or_failure_details(tiny_weights):
    """With API keys set, the probes that need none say whether the service and each model are ready,
    but not why one is unavailable (server paths, error texts), and an unknown name is a plain 404:
    /v1/models, behind the key, gives the reasons. Without keys, /readyz gives them too."""
    from app.config import ModelSettings

    models = [
        ModelSettings(name="tiny", weights=str(tiny_weights)),
        ModelSettings(name="broken", weights="/srv/private/broken.safetensors"),
    ]
    async with running_service(
        tiny_settings(tiny_weights, models=models, auth={"api_keys": [KEY]})
    ) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert {m["name"]: m["status"] for m in ready.json()["models"]} == {
            "tiny": "ready",
            "broken": "unavailable",
        }
        assert "/srv/private" not in ready.text and "reason" not in ready.text
        unknown = await client.get("/v2/models/nosuch/ready")
        assert unknown.status_code == 404 and "tiny" not in unknown.text and "broken" not in unknown.text
        listed = await client.get("/v1/models", headers={"X-API-Key": KEY})
        assert "/srv/private" in listed.text
    async with running_service(tiny_settings(tiny_weights, models=models)) as client:
        assert "/srv/private" in (await client.get("/readyz")).text
