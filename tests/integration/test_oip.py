"""Open Inference Protocol v2 on the ASGI app: request formats, options and every kind of bad request."""

from __future__ import annotations

import base64
import gzip
import json
import struct
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.config import ModelSettings
from tests.integration.conftest import LABELS, image_bytes, running_service, tiny_settings

INFER = "/v2/models/tiny/infer"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def image_request(*files: bytes, **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "image", "shape": [len(files)], "datatype": "BYTES", "data": [b64(f) for f in files]}
        ],
        **extra,
    }


def binary_body(header: dict[str, Any], *chunks: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(chunks), {"Inference-Header-Content-Length": str(len(head))}


def length_prefixed(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def assert_oip_error(response: httpx.Response, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    for fragment in fragments:
        assert fragment in body["error"], body["error"]
    return body["error"]


def output(body: dict[str, Any], name: str) -> dict[str, Any]:
    return next(item for item in body["outputs"] if item["name"] == name)


async def test_json_request_and_response(client: httpx.AsyncClient) -> None:
    response = await client.post(
        INFER,
        json=image_request(
            image_bytes(1),
            image_bytes(2),
            id="abc",
            parameters={"top_k": 3, "normalize": True, "map_size": "input"},
        ),
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["model_name"] == "tiny" and body["id"] == "abc"
    assert [item["name"] for item in body["outputs"]] == ["logits", "probabilities", "maps", "targets"]
    probabilities = np.array(output(body, "probabilities")["data"]).reshape(
        output(body, "probabilities")["shape"]
    )
    assert probabilities.shape == (2, 7)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    maps = output(body, "maps")
    assert maps["shape"] == [2, 3, 32, 32]
    values = np.array(maps["data"])
    assert values.min() >= 0.0 and values.max() <= 1.0 and values.max() > 0.5
    targets = np.array(output(body, "targets")["data"]).reshape(2, 3)
    np.testing.assert_array_equal(targets, np.argsort(-probabilities, axis=1)[:, :3])


async def test_prediction_only_outputs_and_classification_labels(client: httpx.AsyncClient) -> None:
    response = await client.post(
        INFER,
        json=image_request(
            image_bytes(3),
            outputs=[{"name": "logits", "parameters": {"classification": 2}}, {"name": "probabilities"}],
        ),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [item["name"] for item in body["outputs"]] == ["logits", "probabilities"]
    classes = output(body, "logits")
    assert classes["datatype"] == "BYTES" and classes["shape"] == [1, 2]
    (first, index, label), (second, _, _) = (entry.split(":", 2) for entry in classes["data"])
    assert label == LABELS[int(index)]
    assert float(first) >= float(second)
    probabilities = output(body, "probabilities")["data"]
    assert int(index) == int(np.argmax(probabilities))


async def test_binary_request_and_response(client: httpx.AsyncClient) -> None:
    file = image_bytes(4)
    payload = length_prefixed(file)
    header = {
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(payload)},
            }
        ],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}, {"name": "targets"}],
    }
    body, headers = binary_body(header, payload)
    response = await client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers["inference-header-content-length"])
    head = json.loads(response.content[:length])
    logits_meta = output(head, "logits")
    assert logits_meta["parameters"]["binary_data_size"] == 7 * 4
    assert "data" not in logits_meta
    logits = np.frombuffer(response.content[length:], dtype="<f4")
    assert logits.shape == (7,)
    assert output(head, "targets")["data"] == [int(np.argmax(logits))]
    json_logits = (await client.post(INFER, json=image_request(file, outputs=[{"name": "logits"}]))).json()
    np.testing.assert_allclose(logits, output(json_logits, "logits")["data"], atol=1e-5)


async def test_gzip_body_and_version_path(client: httpx.AsyncClient) -> None:
    body = gzip.compress(json.dumps(image_request(image_bytes(5), outputs=[{"name": "logits"}])).encode())
    response = await client.post(
        "/v2/models/tiny/versions/1/infer", content=body, headers={"Content-Encoding": "gzip"}
    )
    assert response.status_code == 200, response.text
    assert_oip_error(
        await client.post("/v2/models/tiny/versions/2/infer", json=image_request(image_bytes(5))),
        404,
        "version",
    )
    assert_oip_error(
        await client.post(INFER, content=b"not gzip", headers={"Content-Encoding": "gzip"}), 400, "gzip"
    )


def fp32_input(shape: list[int], data: Any = None, **extra: Any) -> dict[str, Any]:
    if data is None:
        data = [0.0] * int(np.prod(shape))
    return {"inputs": [{"name": "pixel_values", "shape": shape, "datatype": "FP32", "data": data}], **extra}


@pytest.mark.parametrize(
    ("request_body", "fragments"),
    [
        (image_request(image_bytes(1), parameters={"top_k": 8}), ["top_k"]),
        (image_request(image_bytes(1), parameters={"targets": [3, 9]}), ["targets", "[9]"]),
        (image_request(image_bytes(1), parameters={"targets": "x"}), ["targets"]),
        (image_request(image_bytes(1), parameters={"kernel": "box"}), ["kernel"]),
        (image_request(image_bytes(1), parameters={"target_block": 9}), ["block"]),
        (image_request(image_bytes(1), outputs=[{"name": "heatmap"}]), ["unknown output"]),
        (image_request(image_bytes(1), outputs=[]), ["outputs"]),
        (
            image_request(image_bytes(1), outputs=[{"name": "logits"}, {"name": "logits"}]),
            ["twice"],
        ),
        (
            image_request(image_bytes(1), outputs=[{"name": "maps", "parameters": {"classification": 2}}]),
            ["classification"],
        ),
        ({"inputs": []}, ["inputs"]),
        ({"outputs": [{"name": "logits"}]}, ["inputs"]),
        (
            {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["!!notbase64!!"]}]},
            ["base64"],
        ),
        (
            {
                "inputs": [
                    {"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(b"garbage bytes")]}
                ]
            },
            ["image 0"],
        ),
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [12]}]}, ["base64"]),
        (
            {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [b64(image_bytes(1))]}]},
            ["2"],
        ),
        (
            {"inputs": [{"name": "image", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]}]},
            ["shape"],
        ),
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "INT32", "data": [1]}]}, ["BYTES"]),
        ({"inputs": [{"name": "image", "shape": [0], "datatype": "BYTES", "data": []}]}, ["no image"]),
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES"}]}, ["neither"]),
        (
            {"inputs": [{"name": "INPUT__0", "shape": [1], "datatype": "BYTES", "data": ["aa"]}]},
            ["unknown input"],
        ),
        (
            {
                "inputs": [
                    {"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(image_bytes(1))]},
                    {"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(image_bytes(1))]},
                ]
            },
            ["exactly one input"],
        ),
        (fp32_input([1, 3, 16, 16]), ["[N, 3, 32, 32]"]),
        (fp32_input([3, 32, 32]), ["shape"]),
        (fp32_input([1, 3, 32, 32], data=[0.0] * 10), ["3072"]),
        (fp32_input([1, 3, 32, 32], data=["a"] * 3072), ["numbers"]),
        (fp32_input([1, 3, 32, 32], data=[[0.0, 1.0], [2.0]]), ["pixel_values"]),
        (fp32_input([1, 3, 32, 32], data=[float("nan")] + [0.0] * 3071), ["NaN"]),
        (fp32_input([1, 3, 32, 32], data=[1e30] + [0.0] * 3071), ["beyond", "normalised"]),
        (fp32_input([1, 3, 32, 32], data=[10**400] + [0.0] * 3071), ["numbers"]),
        (
            {"inputs": [{"name": "pixel_values", "shape": [1, 3, 32, 32], "datatype": "FP64", "data": [0]}]},
            ["FP32"],
        ),
        ({"inputs": "image"}, ["inputs"]),
    ],
)
async def test_bad_requests_are_400(
    client: httpx.AsyncClient, request_body: dict[str, Any], fragments: list[str]
) -> None:
    content = json.dumps(request_body, allow_nan=True)
    response = await client.post(INFER, content=content, headers={"Content-Type": "application/json"})
    assert_oip_error(response, 400, *fragments)


async def test_bad_bodies_and_binary_framing(client: httpx.AsyncClient) -> None:
    assert_oip_error(await client.post(INFER, content=b""), 400, "empty")
    assert_oip_error(await client.post(INFER, content=b"{not json"), 400, "JSON")
    assert_oip_error(await client.post(INFER, content=b"[1, 2]"), 400, "JSON object")
    # a header length in digits that are not ASCII ("²" in Latin-1)
    body, _ = binary_body(image_request(image_bytes(1)))
    length = {"Inference-Header-Content-Length": "\xb2".encode("latin-1")}
    assert_oip_error(await client.post(INFER, content=body, headers=length), 400, "byte count")
    # one longer than Python converts to an integer (4300 digits)
    length = {"Inference-Header-Content-Length": "1" * 5000}
    assert_oip_error(await client.post(INFER, content=body, headers=length), 400, "byte count")
    # an integer past Python's 4300-digit conversion limit, and nesting past the recursion limit
    assert_oip_error(await client.post(INFER, content=b'{"id": ' + b"9" * 5000 + b"}"), 400, "JSON")
    assert_oip_error(await client.post(INFER, content=b"[" * 100_000 + b"]" * 100_000), 400, "nested")
    file = image_bytes(6)
    header = {
        "inputs": [
            {"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 999}}
        ]
    }
    body, headers = binary_body(header, length_prefixed(file))
    assert_oip_error(await client.post(INFER, content=body, headers=headers), 400, "binary")
    body, _ = binary_body(header)
    assert_oip_error(
        await client.post(INFER, content=body, headers={"Inference-Header-Content-Length": "999999"}),
        400,
        "Inference-Header-Content-Length",
    )
    assert_oip_error(
        await client.post(INFER, content=body, headers={"Inference-Header-Content-Length": "-3"}),
        400,
        "Inference-Header-Content-Length",
    )
    # A length prefix that claims more bytes than follow, and one cut short.
    for payload in (struct.pack("<I", 10_000) + file, b"\x01\x00"):
        header["inputs"][0]["parameters"]["binary_data_size"] = len(payload)
        body, headers = binary_body(header, payload)
        assert_oip_error(await client.post(INFER, content=body, headers=headers), 400, "BYTES")
    # Bytes after the last input.
    payload = length_prefixed(file)
    header["inputs"][0]["parameters"]["binary_data_size"] = len(payload)
    body, headers = binary_body(header, payload, b"extra")
    assert_oip_error(await client.post(INFER, content=body, headers=headers), 400, "belong to no input")
    # FP32 binary data of the wrong length.
    header = {
        "inputs": [
            {
                "name": "pixel_values",
                "shape": [1, 3, 32, 32],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 8},
            }
        ]
    }
    body, headers = binary_body(header, b"\x00" * 8)
    assert_oip_error(await client.post(INFER, content=body, headers=headers), 400, "12288 bytes")
    # The service still answers.
    response = await client.post(INFER, json=image_request(file, outputs=[{"name": "logits"}]))
    assert response.status_code == 200


async def test_unknown_model_and_endpoints_are_404(client: httpx.AsyncClient) -> None:
    assert_oip_error(
        await client.post("/v2/models/nope/infer", json=image_request(image_bytes(1))), 404, "nope"
    )
    assert_oip_error(await client.get("/v2/models/nope"), 404, "nope")
    assert_oip_error(await client.get("/v2/models/nope/ready"), 404, "nope")
    # Endpoints this server does not have (model config, repository) are 404 too.
    assert (await client.get("/v2/models/tiny/config")).status_code == 404
    assert (await client.post("/v2/repository/index")).status_code == 404


async def test_too_many_images_is_413(tiny_weights: Path) -> None:
    settings = tiny_settings(tiny_weights, limits={"max_images_per_request": 2})
    async with running_service(settings) as client:
        response = await client.post(
            INFER, json=image_request(image_bytes(1), image_bytes(2), image_bytes(3))
        )
        assert_oip_error(response, 413, "limit is 2")
        pixels = fp32_input([3, 3, 32, 32])
        assert_oip_error(await client.post(INFER, json=pixels), 413, "limit is 2")


async def test_health_and_readiness_with_an_unavailable_model(tiny_weights: Path) -> None:
    settings = tiny_settings(
        tiny_weights,
        models=[
            ModelSettings(name="tiny", weights=str(tiny_weights)),
            ModelSettings(name="broken", weights="/nonexistent/broken.safetensors"),
        ],
    )
    async with running_service(settings) as client:
        live = await client.get("/v2/health/live")
        assert live.status_code == 200 and live.json() == {"live": True}
        assert (await client.get("/v2/health/ready")).json() == {"ready": True}
        assert (await client.get("/v2/models/tiny/ready")).json() == {"name": "tiny", "ready": True}
        assert (await client.get("/v2/models/broken/ready")).status_code == 400
        assert_oip_error(
            await client.post("/v2/models/broken/infer", json=image_request(image_bytes(1))), 503
        )
        assert_oip_error(await client.get("/v2/models/broken"), 503)
        client.app.state.service.begin_drain()  # type: ignore[attr-defined]
        assert (await client.get("/v2/health/ready")).status_code == 400
        assert (await client.get("/v2/models/tiny/ready")).status_code == 400
        assert (await client.get("/v2/health/live")).status_code == 200


async def test_api_keys_apply_with_the_protocol_error_shape(tiny_weights: Path) -> None:
    async with running_service(tiny_settings(tiny_weights, auth={"api_keys": ["s3cret"]})) as client:
        assert_oip_error(await client.get("/v2"), 401, "API key")
        assert_oip_error(await client.post(INFER, json=image_request(image_bytes(1))), 401, "API key")
        assert (await client.get("/v2/health/ready")).status_code == 200
        response = await client.post(
            INFER,
            json=image_request(image_bytes(1), outputs=[{"name": "logits"}]),
            headers={"X-API-Key": "s3cret"},
        )
        assert response.status_code == 200, response.text
        assert (await client.get("/v2", headers={"Authorization": "Bearer s3cret"})).status_code == 200


async def test_oip_routes_are_documented(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    for path in (
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{name}",
        "/v2/models/{name}/infer",
    ):
        assert path in paths


async def test_maps_as_json_numbers_are_bounded(tiny_weights: Path) -> None:
    """Maps at input size as JSON numbers take about 9 bytes of text each: past
    `limits.max_json_map_values` they are refused (400, naming binary_data), and the same maps with
    binary_data, or on the grid, are served."""
    settings = tiny_settings(tiny_weights, limits={"max_json_map_values": 2000})
    async with running_service(settings) as client:
        parameters = {"top_k": 2, "map_size": "input"}  # 2 x 32 x 32 = 2048 numbers
        refused = await client.post(INFER, json=image_request(image_bytes(1), parameters=parameters))
        assert_oip_error(refused, 400, "binary_data", "2048")
        # checked before decoding: a file that is no image is not even looked at
        early = await client.post(INFER, json=image_request(b"not an image", parameters=parameters))
        assert_oip_error(early, 400, "binary_data", "2048")
        binary = {"top_k": 2, "map_size": "input", "binary_data_output": True}
        served = await client.post(INFER, json=image_request(image_bytes(1), parameters=binary))
        assert served.status_code == 200, served.text
        grid = await client.post(INFER, json=image_request(image_bytes(1), parameters={"top_k": 2}))
        assert grid.status_code == 200, grid.text
