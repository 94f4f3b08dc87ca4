"""Bad input gets a 4xx in the one error shape, and the service keeps serving."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
from typing import Any

import pytest
from PIL import Image

from app.main import create_app
from tests import bad_inputs
from tests.integration.conftest import assert_error, image_bytes, running_service, tiny_settings

GOOD = image_bytes(0)


def png_of_size(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def multipart(data: bytes, **fields):
    return {"files": {"file": ("x.png", data, "image/png")}, "data": fields}


CASES = {
    "not_an_image": (multipart(b"<html><body>hello</body></html>"), 400, "unsupported_image"),
    "text_as_raw_image": (
        {"content": b"just some text", "headers": {"content-type": "image/jpeg"}},
        400,
        "unsupported_image",
    ),
    "truncated_png": (multipart(GOOD[: len(GOOD) // 2]), 400, "corrupt_image"),
    "truncated_jpeg": (multipart(image_bytes(1, fmt="JPEG")[:300]), 400, None),
    "empty_body": ({"content": b"", "headers": {"content-type": "application/json"}}, 400, "empty_body"),
    "empty_file": (multipart(b""), 400, "empty_image"),
    "no_file_field": ({"files": {"picture": ("x.png", GOOD, "image/png")}}, 422, "invalid_request"),
    "file_field_as_text": (
        {"data": {"file": "not a file"}, "files": {"other": ("x.png", b"", "image/png")}},
        422,
        None,
    ),
    "invalid_json": (
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
        400,
        "invalid_json",
    ),
    "json_without_images": ({"json": {"top_k": 1}}, 400, "no_images"),
    "json_images_not_list": ({"json": {"images": "abc"}}, 400, "no_images"),
    "invalid_base64": ({"json": {"images": [{"data": "***not base64***"}]}}, 400, "invalid_base64"),
    "json_unknown_field": (
        {"json": {"images": [{"data": base64.b64encode(GOOD).decode()}], "colour": "red"}},
        422,
        "invalid_options",
    ),
    "unsupported_content_type": (
        {"content": b"abc", "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
    "bad_kernel": (multipart(GOOD, kernel="box"), 422, "invalid_options"),
    "bad_score": (multipart(GOOD, score="rank"), 422, "invalid_options"),
    "top_k_zero": (multipart(GOOD, top_k="0"), 422, "invalid_options"),
    "top_k_not_int": (multipart(GOOD, top_k="many"), 422, "invalid_options"),
    "top_k_beyond_classes": (multipart(GOOD, top_k="8"), 422, "invalid_options"),
    "targets_out_of_range": (multipart(GOOD, targets="1,7"), 422, "invalid_options"),
    "negative_target": (multipart(GOOD, targets="-1"), 422, "invalid_options"),
    "empty_targets": (
        {"json": {"images": [{"data": base64.b64encode(GOOD).decode()}], "targets": []}},
        422,
        "invalid_options",
    ),
    "unknown_encoding": (multipart(GOOD, encodings="png,jpeg"), 422, "invalid_options"),
    "bad_map_size": (multipart(GOOD, map_size="huge"), 422, "invalid_options"),
    "bad_colormap": (multipart(GOOD, colormap="rainbow"), 422, "invalid_options"),
    "opacity_out_of_range": (multipart(GOOD, opacity="1.5"), 422, "invalid_options"),
    "target_block_out_of_range": (multipart(GOOD, target_block="3"), 422, "invalid_options"),
    "unknown_option_field": (multipart(GOOD, sharpen="yes"), 422, "invalid_options"),
    "too_many_pixels": (multipart(png_of_size(200, 200)), 413, "too_many_pixels"),
    "too_many_images": (
        {"files": [("files", (f"{i}.png", GOOD, "image/png")) for i in range(4)]},
        413,
        "too_many_images",
    ),
    "oversized_body": (
        {"content": b"\x89PNG" + b"0" * 300_000, "headers": {"content-type": "image/png"}},
        413,
        "payload_too_large",
    ),
}


@pytest.fixture
async def limited_client(tiny_weights):
    settings = tiny_settings(
        tiny_weights,
        limits={"max_pixels": 100 * 100, "max_images_per_request": 3, "max_body_bytes": 200_000},
    )
    async with running_service(settings) as client:
        yield client


async def test_every_bad_input_is_refused_and_the_service_keeps_serving(limited_client):
    client = limited_client
    for name, (request, status, code) in CASES.items():
        response = await client.post("/v1/models/tiny/explain", **request)
        try:
            assert_error(response, status, code)
        except AssertionError as exc:
            raise AssertionError(f"case {name}: {exc}") from exc
        good = await client.post("/v1/models/tiny/explain", **multipart(GOOD))
        assert good.status_code == 200, f"after {name}: {good.text}"
    metrics = (await client.get("/metrics")).text
    assert 'route="/v1/models/{name}/explain",status="422"' in metrics
    assert 'route="/v1/models/{name}/explain",status="413"' in metrics


async def test_unknown_model_route_and_method(limited_client):
    client = limited_client
    assert_error(await client.post("/v1/models/nope/explain", **multipart(GOOD)), 404, "model_not_found")
    assert_error(await client.get("/v3/anything"), 404, "not_found")
    protocol = await client.get("/v2/anything")
    assert protocol.status_code == 404 and isinstance(protocol.json()["error"], str)
    assert_error(await client.get("/v1/models/tiny/explain"), 405, "method_not_allowed")


async def test_predict_refuses_explain_options(limited_client):
    response = await limited_client.post("/v1/models/tiny/predict", **multipart(GOOD, kernel="dirac"))
    assert_error(response, 422, "invalid_options")


async def test_oversized_body_without_content_length_is_refused(limited_client):
    async def chunks():
        for _ in range(30):
            yield b"0" * 10_000

    response = await limited_client.post(
        "/v1/models/tiny/explain", content=chunks(), headers={"content-type": "image/png"}
    )
    assert_error(response, 413, "payload_too_large")
    assert (await limited_client.post("/v1/models/tiny/explain", **multipart(GOOD))).status_code == 200


async def test_decompression_bomb_refused_before_decoding(limited_client):
    """A small file that declares a huge image is refused from its header."""
    bomb = png_of_size(5000, 5000)
    assert len(bomb) < 200_000
    error = assert_error(
        await limited_client.post("/v1/models/tiny/explain", **multipart(bomb)), 413, "too_many_pixels"
    )
    assert "5000x5000" in error["message"]


# ---------------------------------------------------------------- the generated corpus, over HTTP
CORPUS = list(bad_inputs.corpus())


@pytest.fixture
async def corpus_client(tiny_weights):
    """Default limits (20 MiB bodies, 40 Mpx images): the corpus itself must trip the checks."""
    async with running_service(tiny_settings(tiny_weights)) as client:
        yield client


def _as_multipart(entry: bad_inputs.BadInput) -> dict[str, Any]:
    return {"files": {"file": (entry.name, entry.data, entry.content_type)}}


def _as_json(entry: bad_inputs.BadInput) -> dict[str, Any]:
    return {"json": {"images": [{"data": base64.b64encode(entry.data).decode()}]}}


@pytest.mark.parametrize("endpoint", ["predict", "explain"])
async def test_bad_input_corpus_over_http(corpus_client, endpoint):
    """Every broken upload, as a multipart file and as JSON base64, gets its 4xx in the error shape,
    and a good request right after it still succeeds."""
    client = corpus_client
    url = f"/v1/models/tiny/{endpoint}"
    assert len(CORPUS) >= 20
    for entry in CORPUS:
        for form, build in (("multipart", _as_multipart), ("json", _as_json)):
            response = await client.post(url, **build(entry), headers={"X-Request-ID": f"bad-{entry.name}"})
            try:
                error = assert_error(response, entry.expected_status)
            except AssertionError as exc:
                raise AssertionError(f"{entry.name} as {form}: {exc}") from exc
            assert error["request_id"] == f"bad-{entry.name}"
            assert error["code"] in {
                "empty_image",
                "unsupported_image",
                "corrupt_image",
                "invalid_image",
                "too_many_pixels",
            }, (entry.name, form, error)
            good = await client.post(url, **multipart(GOOD))
            assert good.status_code == 200, f"after {entry.name} as {form}: {good.text}"
    # nothing broken reached the model: only the good images were computed
    metrics = (await client.get("/metrics")).text
    assert f'reciprocam_images_total{{kind="{endpoint}",model="tiny"}} {2.0 * len(CORPUS)}' in metrics
    assert not re.search(r'reciprocam_image_failures_total\{model="tiny"\} [1-9]', metrics)


async def test_an_elongated_strip_is_refused_before_the_resize(corpus_client):
    """A 1x100000 strip is under the pixel limit, but resizing its shorter side to the model's
    would make billions of pixels: 413 from the geometry, before any resize, and the service serves
    on."""
    strip = png_of_size(1, 100_000)
    for window in ("predict", "explain"):
        response = await corpus_client.post(f"/v1/models/tiny/{window}", **multipart(strip))
        error = assert_error(response, 413, "too_many_pixels")
        assert "1x100000" in error["message"] and "resized for the model" in error["message"]
    assert (await corpus_client.post("/v1/models/tiny/predict", **multipart(GOOD))).status_code == 200


async def test_a_bomb_asking_for_original_size_maps_is_refused_from_its_header(corpus_client):
    """With map_size=original the sizes are read before decoding, to budget the maps: a PNG that
    declares 16000x16000 pixels is refused there, from its header alone."""
    from tests.bad_inputs import png_header

    bomb = png_header(16_000, 16_000)
    response = await corpus_client.post(
        "/v1/models/tiny/explain", **multipart(bomb, map_size="original", encodings="png")
    )
    error = assert_error(response, 413, "too_many_pixels")
    assert "16000x16000" in error["message"]


async def test_maps_as_json_numbers_are_bounded(tiny_weights):
    """JSON maps at input size take about 9 bytes of text per value: past
    `limits.max_json_map_values` the request is refused before any work (422 maps_too_large), while
    the same maps as PNGs, or on the grid, are served."""
    settings = tiny_settings(tiny_weights, limits={"max_json_map_values": 2000})
    async with running_service(settings) as client:
        url = "/v1/models/tiny/explain"
        asked = {"top_k": "2", "map_size": "input"}  # 2 classes x 32 x 32 = 2048 values
        refused = await client.post(url, **multipart(GOOD, encodings="json", **asked))
        error = assert_error(refused, 422, "maps_too_large")
        assert "2048 JSON numbers" in error["message"]
        assert (await client.post(url, **multipart(GOOD, encodings="png", **asked))).status_code == 200
        grid = await client.post(url, **multipart(GOOD, encodings="json", top_k="2", map_size="grid"))
        assert grid.status_code == 200, grid.text


async def test_corpus_as_raw_image_bodies(corpus_client):
    """The image entries posted as the raw body with an image/* type: the same statuses."""
    for entry in CORPUS:
        if not entry.content_type.startswith("image/"):
            continue
        response = await corpus_client.post(
            "/v1/models/tiny/predict", content=entry.data, headers={"content-type": entry.content_type}
        )
        try:
            assert_error(response, entry.expected_status)
        except AssertionError as exc:
            raise AssertionError(f"{entry.name}: {exc}") from exc
    assert (await corpus_client.post("/v1/models/tiny/predict", **multipart(GOOD))).status_code == 200


# ---------------------------------------------------------------- fields, JSON, base64, options
GOOD_B64 = base64.b64encode(GOOD).decode()
MORE_CASES: dict[str, tuple[str, dict[str, Any], int, str | None]] = {
    "multipart_without_any_field": (
        "predict",
        {"files": {"top_k": (None, "1")}},
        400,
        "no_images",
    ),
    "file_under_unknown_field": (
        "predict",
        {"files": {"image": ("x.png", GOOD, "image/png")}},
        422,
        "invalid_request",
    ),
    "option_wrong_type_multipart": ("explain", multipart(GOOD, opacity="very"), 422, "invalid_options"),
    "targets_not_ints_multipart": ("explain", multipart(GOOD, targets="a,b"), 422, "invalid_options"),
    "keep_prefix_not_bool": ("explain", multipart(GOOD, keep_prefix="perhaps"), 422, "invalid_options"),
    "top_k_wrong_type_json": (
        "predict",
        {"json": {"images": [{"data": GOOD_B64}], "top_k": "three"}},
        422,
        "invalid_options",
    ),
    "top_k_as_list_json": (
        "predict",
        {"json": {"images": [{"data": GOOD_B64}], "top_k": [1, 2]}},
        422,
        "invalid_options",
    ),
    "targets_as_object_json": (
        "explain",
        {"json": {"images": [{"data": GOOD_B64}], "targets": {"a": 1}}},
        422,
        "invalid_options",
    ),
    "image_data_not_string": ("predict", {"json": {"images": [{"data": 12345}]}}, 422, "invalid_options"),
    "image_entry_not_object": ("predict", {"json": {"images": [GOOD_B64]}}, 422, "invalid_options"),
    "image_entry_extra_field": (
        "predict",
        {"json": {"images": [{"data": GOOD_B64, "url": "http://127.0.0.1/x.png"}]}},
        422,
        "invalid_options",
    ),
    "json_array_body": ("predict", {"json": [{"data": GOOD_B64}]}, 400, "invalid_json"),
    "json_not_utf8": (
        "predict",
        {"content": b'{"images": "\xff\xfe"}', "headers": {"content-type": "application/json"}},
        400,
        "invalid_json",
    ),
    "json_deeply_nested": (
        "predict",
        {"content": b"[" * 100_000 + b"]" * 100_000, "headers": {"content-type": "application/json"}},
        400,
        "invalid_json",
    ),
    "base64_with_bad_characters": (
        "predict",
        {"json": {"images": [{"data": GOOD_B64[:40] + "!!" + GOOD_B64[40:]}]}},
        400,
        "invalid_base64",
    ),
    "base64_wrong_length": ("predict", {"json": {"images": [{"data": "abcde"}]}}, 400, "invalid_base64"),
    "base64_of_text": (
        "predict",
        {"json": {"images": [{"data": base64.b64encode(b"not an image").decode()}]}},
        400,
        "unsupported_image",
    ),
    "empty_base64": ("predict", {"json": {"images": [{"data": ""}]}}, 400, "empty_image"),
    "data_url_not_base64": (
        "predict",
        {"json": {"images": [{"data": "data:image/png,%89PNG"}]}},
        400,
        "invalid_base64",
    ),
    "data_url_with_bad_base64": (
        "predict",
        {"json": {"images": [{"data": "data:image/png;base64,@@@@"}]}},
        400,
        "invalid_base64",
    ),
    "data_url_of_html": (
        "predict",
        {"json": {"images": [{"data": "data:text/html;base64," + base64.b64encode(b"<b>x</b>").decode()}]}},
        400,
        "unsupported_image",
    ),
    "too_many_images_json": (
        "predict",
        {"json": {"images": [{"data": GOOD_B64}] * 4}},
        413,
        "too_many_images",
    ),
    "too_many_files_multipart": (
        "predict",
        {"files": [("file", (f"{i}.png", GOOD, "image/png")) for i in range(6)]},
        413,
        "too_many_images",
    ),
    "top_k_beyond_classes_json": (
        "predict",
        {"json": {"images": [{"data": GOOD_B64}], "top_k": 8}},
        422,
        "invalid_options",
    ),
    "targets_out_of_range_json": (
        "explain",
        {"json": {"images": [{"data": GOOD_B64}], "targets": [0, 99]}},
        422,
        "invalid_options",
    ),
    "too_many_targets": (
        "explain",
        {"json": {"images": [{"data": GOOD_B64}], "targets": list(range(7)) * 3}},
        422,
        "invalid_options",
    ),
    "unknown_kernel_json": (
        "explain",
        {"json": {"images": [{"data": GOOD_B64}], "kernel": "box"}},
        422,
        "invalid_options",
    ),
    "empty_encodings_json": (
        "explain",
        {"json": {"images": [{"data": GOOD_B64}], "encodings": []}},
        422,
        "invalid_options",
    ),
    "empty_encodings_multipart": ("explain", multipart(GOOD, encodings=""), 422, "invalid_options"),
    "targets_deeply_nested_multipart": (
        "explain",
        multipart(GOOD, targets="[" * 3000),
        422,
        "invalid_options",
    ),
    "unknown_encoding_json": (
        "explain",
        {"json": {"images": [{"data": GOOD_B64}], "encodings": ["gif"]}},
        422,
        "invalid_options",
    ),
    "unknown_raw_query_option": (
        "predict",
        {"content": GOOD, "headers": {"content-type": "image/png"}, "params": {"colour": "red"}},
        422,
        "invalid_options",
    ),
    "top_k_query_not_int": (
        "predict",
        {"content": GOOD, "headers": {"content-type": "image/png"}, "params": {"top_k": "x"}},
        422,
        "invalid_options",
    ),
    "huge_json_over_limit": (
        "predict",
        {"json": {"images": [{"data": "A" * 300_000}]}},
        413,
        "payload_too_large",
    ),
    "multipart_without_boundary": (
        "predict",
        {"content": b"--x\r\n\r\n", "headers": {"content-type": "multipart/form-data"}},
        400,
        None,
    ),
    "multipart_bad_part_header": (
        "predict",
        {
            "content": b"--b\r\nno colon here\r\n\r\nx\r\n--b--\r\n",
            "headers": {"content-type": "multipart/form-data; boundary=b"},
        },
        400,
        None,
    ),
    "json_huge_integer": (
        "predict",
        {
            "content": b'{"images": [{"data": "x"}], "top_k": ' + b"9" * 5000 + b"}",
            "headers": {"content-type": "application/json"},
        },
        400,
        "invalid_json",
    ),
    "multipart_without_closing_boundary": (
        "predict",
        {
            "content": (
                b'--b\r\nContent-Disposition: form-data; name="files"; filename="0.png"\r\n\r\n'
                + GOOD
                + b'\r\n--b\r\nContent-Disposition: form-data; name="files"; filename="1.png"\r\n\r\n'
                + GOOD
                + b"\r\n"
            ),
            "headers": {"content-type": "multipart/form-data; boundary=b"},
        },
        400,
        "invalid_multipart",
    ),
    "multipart_cut_inside_second_file": (
        "predict",
        {
            "content": (
                b'--b\r\nContent-Disposition: form-data; name="files"; filename="0.png"\r\n\r\n'
                + GOOD
                + b'\r\n--b\r\nContent-Disposition: form-data; name="files"; filename="1.png"\r\n\r\n'
                + GOOD[:100]
            ),
            "headers": {"content-type": "multipart/form-data; boundary=b"},
        },
        400,
        "invalid_multipart",
    ),
    "multipart_with_query_options": (
        "predict",
        {**multipart(GOOD), "params": {"top_k": "3"}},
        422,
        "invalid_options",
    ),
    "json_with_query_options": (
        "predict",
        {"json": {"images": [{"data": GOOD_B64}]}, "params": {"bogus": "1"}},
        422,
        "invalid_options",
    ),
    "multipart_truncated": (
        "predict",
        {
            "content": b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n\x89PNG',
            "headers": {"content-type": "multipart/form-data; boundary=b"},
        },
        400,
        None,
    ),
}


@pytest.mark.parametrize("name", list(MORE_CASES))
async def test_malformed_requests(limited_client, name):
    endpoint, request, status, code = MORE_CASES[name]
    client = limited_client
    response = await client.post(f"/v1/models/tiny/{endpoint}", **request)
    assert_error(response, status, code)
    good = await client.post(f"/v1/models/tiny/{endpoint}", **multipart(GOOD))
    assert good.status_code == 200, good.text


async def test_data_url_is_accepted(limited_client):
    response = await limited_client.post(
        "/v1/models/tiny/predict", json={"images": [{"data": f"data:image/png;base64,{GOOD_B64}"}]}
    )
    assert response.status_code == 200, response.text
    plain = await limited_client.post("/v1/models/tiny/predict", json={"images": [{"data": GOOD_B64}]})
    assert response.json()["images"] == plain.json()["images"]


async def _post_endless_body(
    app: Any, headers: list[tuple[bytes, bytes]]
) -> tuple[int, list[dict[str, Any]]]:
    """POST an endless stream of 100-byte chunks to ``app`` at the raw ASGI level (no client in
    between that could buffer or stop it); returns how many chunks it read and what it sent."""
    reads = 0

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        assert reads < 100, "the body was read on past the limit"
        return {"type": "http.request", "body": b"x" * 100, "more_body": True}

    sent = await _post_raw(app, headers, receive)
    return reads, sent


async def _post_raw(
    app: Any, headers: list[tuple[bytes, bytes]], receive: Any, path: str = "/v1/models/tiny/predict"
) -> list[dict[str, Any]]:
    """POST to ``path`` at the raw ASGI level, the body from ``receive``; returns the messages the
    app sent."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    return sent


async def test_declared_oversized_body_is_refused_unread(tiny_weights):
    """A Content-Length over the limit is answered 413 before a single body chunk is read."""
    app = create_app(tiny_settings(tiny_weights, limits={"max_body_bytes": 1000}))
    reads, sent = await _post_endless_body(
        app, [(b"content-type", b"application/json"), (b"content-length", b"50000000")]
    )
    assert reads == 0
    assert sent[0]["status"] == 413
    assert (b"connection", b"close") in sent[0]["headers"]
    body = json.loads(sent[1]["body"])
    assert body["error"]["code"] == "payload_too_large" and body["error"]["request_id"]


async def test_streamed_body_stops_being_read_at_the_limit(tiny_weights):
    """Without a Content-Length the body is counted as it streams; past the limit the rest is read
    and dropped (so that the 413 is not lost to a reset) only up to twice the limit, and a body that
    goes on past that is answered unread with the connection closed."""
    app = create_app(tiny_settings(tiny_weights, limits={"max_body_bytes": 1000}))
    reads, sent = await _post_endless_body(
        app, [(b"content-type", b"image/png"), (b"transfer-encoding", b"chunked")]
    )
    assert reads == 21  # 2,100 bytes: the first chunk past twice 1,000
    assert sent[0]["status"] == 413
    assert (b"connection", b"close") in sent[0]["headers"]


async def test_a_stalled_upload_times_out_and_frees_its_slot(tiny_weights):
    """A client that sends part of its body and then nothing (slowloris) gets 408 after
    `limits.body_timeout_s` with the connection closed, and its concurrency slot is free again: with
    one slot, the next request is answered (413 for its declared size), not refused as overloaded."""
    app = create_app(
        tiny_settings(
            tiny_weights,
            limits={"body_timeout_s": 0.2, "max_concurrent_requests": 1, "max_body_bytes": 1000},
        )
    )
    stalled = asyncio.Event()
    reads = 0

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        if reads == 1:
            return {"type": "http.request", "body": b"x" * 10, "more_body": True}
        await stalled.wait()  # never set: the rest of the body never comes
        raise AssertionError("unreachable")

    headers = [(b"content-type", b"image/png"), (b"content-length", b"500")]
    sent = await asyncio.wait_for(_post_raw(app, headers, receive), timeout=10)
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_timeout"
    _, after = await _post_endless_body(
        app, [(b"content-type", b"image/png"), (b"content-length", b"50000000")]
    )
    assert after[0]["status"] == 413


async def test_probe_paths_never_read_a_body(tiny_weights):
    """Probes and the scrape are exempt from the concurrency limit, so a body posted to them must not
    be read either (it would be held in memory outside the limit's bound): 405 with nothing read."""
    app = create_app(tiny_settings(tiny_weights, limits={"max_concurrent_requests": 1}))
    for path in ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/models/tiny/ready"):
        reads = 0

        async def receive() -> dict[str, Any]:
            nonlocal reads
            reads += 1
            return {"type": "http.request", "body": b"x" * 100, "more_body": True}

        headers = [(b"content-type", b"application/octet-stream"), (b"transfer-encoding", b"chunked")]
        sent = await asyncio.wait_for(_post_raw(app, headers, receive, path), timeout=10)
        assert sent[0]["status"] == 405, (path, sent[0])
        assert reads == 0, path


def test_concurrency_limit_comes_from_the_settings(tiny_weights):
    """`limits.max_concurrent_requests` reaches the outermost middleware (its behaviour:
    tests/unit/test_overload.py), with the queue's Retry-After."""
    from app.api.middleware import RequestContextMiddleware

    app = create_app(
        tiny_settings(
            tiny_weights, limits={"max_concurrent_requests": 3}, batch={"max_wait_ms": 2, "retry_after_s": 4}
        )
    )
    [outer] = [m for m in app.user_middleware if m.cls is RequestContextMiddleware]
    assert outer.kwargs["max_concurrent"] == 3 and outer.kwargs["retry_after_s"] == 4
