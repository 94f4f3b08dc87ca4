"""What real Open Inference Protocol clients send and expect beyond the bare protocol: health answers
with JSON bodies (KServe's client reads ``{"live": true}`` and ``{"ready": true}``), and the model's
name and version in the request body (KServe's client sends ``model_name``), which must agree with
the path."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import image_bytes
from tests.integration.test_oip import INFER, assert_oip_error, image_request


async def test_health_answers_have_json_bodies(client: httpx.AsyncClient) -> None:
    for path, body in (
        ("/v2/health/live", {"live": True}),
        ("/v2/health/ready", {"ready": True}),
        ("/v2/models/tiny/ready", {"name": "tiny", "ready": True}),
        ("/v2/models/tiny/versions/1/ready", {"name": "tiny", "ready": True}),
    ):
        response = await client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == "application/json", path
        assert response.json() == body, path
    assert_oip_error(await client.get("/v2/models/nope/ready"), 404, "nope")


@pytest.mark.parametrize(
    "keys",
    [
        {"model_name": "tiny"},
        {"model_name": "tiny", "model_version": "1", "id": "kserve-7"},
        {"model_version": ""},
    ],
)
async def test_the_model_named_in_the_body_is_accepted(client: httpx.AsyncClient, keys: dict) -> None:  # type: ignore[type-arg]
    response = await client.post(INFER, json=image_request(image_bytes(1), **keys))
    assert response.status_code == 200, response.text
    assert response.json()["model_name"] == "tiny"
    if "id" in keys:
        assert response.json()["id"] == keys["id"]
    versioned = await client.post(
        "/v2/models/tiny/versions/1/infer", json=image_request(image_bytes(1), **keys)
    )
    assert versioned.status_code == 200, versioned.text


@pytest.mark.parametrize(
    ("keys", "fragments"),
    [
        ({"model_name": "resnet"}, ("'resnet'", "'tiny'")),
        ({"model_version": "2"}, ("version '2'",)),
        ({"model_name": 3}, ("model_name",)),
        ({"model": "tiny"}, ("model", "Extra inputs")),
    ],
)
async def test_a_body_that_names_another_model_or_unknown_keys_is_refused(
    client: httpx.AsyncClient,
    keys: dict,
    fragments: tuple[str, ...],  # type: ignore[type-arg]
) -> None:
    assert_oip_error(await client.post(INFER, json=image_request(image_bytes(1), **keys)), 400, *fragments)
