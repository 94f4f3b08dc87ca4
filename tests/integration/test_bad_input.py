"""Bad input gets a 4xx in the one error shape, and the service keeps serving."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

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
    assert_error(await client.get("/v2/anything"), 404, "not_found")
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
