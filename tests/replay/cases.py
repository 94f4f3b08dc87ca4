"""The requests of the behaviour recording: both protocols, every encoding, the options, and errors.

``recorded.json`` holds these requests as sent (bytes included) and the service's answers to them;
``record.py`` writes it, ``test_replay.py`` sends the same bytes again and compares the answers.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import struct
from typing import Any

import httpx
import numpy as np
from PIL import Image

from app.eval.shapes import render

SHAPES_WEIGHTS = "app/weights/shapes_vit.safetensors"
TINY_LABELS = [f"class_{i}" for i in range(7)]


def _encoded(pixels: np.ndarray, fmt: str, **save: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _shape(index: int, size: int = 64) -> np.ndarray:
    return render(seed=4242, index=index, size=size)[0]


def _noise(seed: int, width: int, height: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _request(name: str, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    built = httpx.Request(method, "http://service" + path, **kwargs)
    body = built.read()
    headers = {
        key: value
        for key, value in built.headers.items()
        if key.lower() in ("content-type", "content-encoding", "inference-header-content-length")
    }
    return {
        "name": name,
        "method": method,
        "path": path,
        "headers": headers,
        "body": base64.b64encode(body).decode("ascii"),
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _multipart(name: str, model: str, kind: str, images: list[bytes], **fields: Any) -> dict[str, Any]:
    files = [("file", (f"image{i}.bin", data, "application/octet-stream")) for i, data in enumerate(images)]
    data = {
        key: (json.dumps(value) if isinstance(value, list) else str(value)) for key, value in fields.items()
    }
    return _request(name, "POST", f"/v1/models/{model}/{kind}", files=files, data=data)


def _json_v1(name: str, model: str, kind: str, images: list[bytes], **options: Any) -> dict[str, Any]:
    body = {"images": [{"data": _b64(data)} for data in images], **options}
    return _request(name, "POST", f"/v1/models/{model}/{kind}", json=body)


def _infer(
    name: str, model: str, document: dict[str, Any], binary: bytes = b"", **extra: Any
) -> dict[str, Any]:
    header = json.dumps(document).encode()
    if not binary:
        return _request(name, "POST", f"/v2/models/{model}/infer", content=header, **extra)
    headers = {"Inference-Header-Content-Length": str(len(header)), **extra.pop("headers", {})}
    return _request(
        name, "POST", f"/v2/models/{model}/infer", content=header + binary, headers=headers, **extra
    )


def _bytes_elements(files: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(data)) + data for data in files)


def build_cases() -> list[dict[str, Any]]:
    shape_png = _encoded(_shape(0), "PNG")
    shape_jpeg = _encoded(_shape(1, 96), "JPEG", quality=90)
    wide_png = _encoded(_noise(5, 90, 50), "PNG")
    tall_jpeg = _encoded(_noise(6, 40, 70), "JPEG", quality=85)
    gray_png = _encoded(_shape(2)[..., 0], "PNG")
    tiny_png = _encoded(_noise(7, 48, 40), "PNG")
    corrupt = shape_png[:40]
    cases: list[dict[str, Any]] = [
        _request("models", "GET", "/v1/models"),
        _request("model shapes", "GET", "/v1/models/shapes"),
        _request("model tiny", "GET", "/v1/models/tiny"),
        _request("model unknown", "GET", "/v1/models/nope"),
        _request("healthz", "GET", "/healthz"),
        _request("readyz", "GET", "/readyz"),
        # /v1 predict
        _multipart("predict multipart png", "shapes", "predict", [shape_png]),
        _multipart("predict multipart jpeg top3", "shapes", "predict", [shape_jpeg], top_k=3),
        _multipart("predict multipart two", "tiny", "predict", [tiny_png, wide_png], top_k=2),
        _json_v1("predict json", "shapes", "predict", [shape_png, gray_png], top_k=6),
        _json_v1("predict json tiny", "tiny", "predict", [tall_jpeg], top_k=7),
        # /v1 explain: encodings, sizes, colormaps, options
        _multipart("explain default", "shapes", "explain", [shape_png]),
        _multipart("explain png grid", "shapes", "explain", [shape_png], encodings="png", map_size="grid"),
        _multipart("explain heatmap input", "shapes", "explain", [shape_jpeg], encodings="heatmap"),
        _multipart(
            "explain overlay original",
            "shapes",
            "explain",
            [wide_png],
            encodings="overlay",
            map_size="original",
        ),
        _multipart(
            "explain overlay grid", "shapes", "explain", [shape_png], encodings="overlay", map_size="grid"
        ),
        _multipart("explain json grid", "shapes", "explain", [shape_png], encodings="json", map_size="grid"),
        _json_v1(
            "explain all encodings",
            "shapes",
            "explain",
            [shape_png],
            encodings=["png", "heatmap", "overlay", "json"],
            map_size="grid",
            top_k=2,
        ),
        _json_v1(
            "explain json original",
            "tiny",
            "explain",
            [tall_jpeg],
            encodings=["json"],
            map_size="original",
        ),
        _json_v1("explain viridis", "shapes", "explain", [shape_png], colormap="viridis", opacity=0.2),
        _json_v1(
            "explain inferno overlay",
            "shapes",
            "explain",
            [gray_png],
            colormap="inferno",
            encodings=["overlay"],
        ),
        _json_v1("explain gray heatmap", "tiny", "explain", [tiny_png], colormap="gray"),
        _json_v1(
            "explain dirac",
            "shapes",
            "explain",
            [shape_png],
            kernel="dirac",
            encodings=["json"],
            map_size="grid",
        ),
        _json_v1(
            "explain drop prefix",
            "shapes",
            "explain",
            [shape_png],
            keep_prefix=False,
            encodings=["json"],
            map_size="grid",
        ),
        _json_v1(
            "explain probability",
            "tiny",
            "explain",
            [tiny_png],
            score="probability",
            encodings=["json"],
            map_size="grid",
        ),
        _json_v1(
            "explain block 0",
            "tiny",
            "explain",
            [tiny_png],
            target_block=0,
            encodings=["json"],
            map_size="grid",
        ),
        _json_v1(
            "explain block -2",
            "shapes",
            "explain",
            [shape_png],
            target_block=-2,
            encodings=["png"],
            map_size="grid",
        ),
        _json_v1(
            "explain targets", "shapes", "explain", [shape_png, shape_jpeg], targets=[1, 4], encodings=["png"]
        ),
        _multipart(
            "explain targets multipart", "tiny", "explain", [tiny_png], targets="[6, 0]", encodings="json"
        ),
        _json_v1("explain top3 three images", "tiny", "explain", [tiny_png, wide_png, tall_jpeg], top_k=3),
        _multipart(
            "explain form top2 original", "shapes", "explain", [tall_jpeg], top_k=2, map_size="original"
        ),
        # /v1 errors
        _json_v1("error top_k too big", "shapes", "predict", [shape_png], top_k=9),
        _json_v1("error targets outside", "shapes", "explain", [shape_png], targets=[2, 40]),
        _json_v1("error targets empty", "shapes", "explain", [shape_png], targets=[]),
        _json_v1("error kernel", "shapes", "explain", [shape_png], kernel="box"),
        _json_v1("error encoding", "shapes", "explain", [shape_png], encodings=["gif"]),
        _json_v1("error block", "shapes", "explain", [shape_png], target_block=17),
        _json_v1("error opacity", "shapes", "explain", [shape_png], opacity=1.5),
        _json_v1("error unknown option", "shapes", "predict", [shape_png], colour="red"),
        _json_v1("error corrupt image", "shapes", "predict", [corrupt]),
        _json_v1("error second image corrupt", "shapes", "predict", [shape_png, b"not an image"]),
        _request("error bad base64", "POST", "/v1/models/shapes/predict", json={"images": [{"data": "%%%"}]}),
        _request("error no images", "POST", "/v1/models/shapes/predict", json={"images": []}),
        _request(
            "error invalid json",
            "POST",
            "/v1/models/shapes/predict",
            content=b"{",
            headers={"Content-Type": "application/json"},
        ),
        _request(
            "error media type",
            "POST",
            "/v1/models/shapes/predict",
            content=b"abc",
            headers={"Content-Type": "text/plain"},
        ),
        _multipart("error unknown model", "nope", "predict", [shape_png]),
        _multipart("error empty file", "shapes", "predict", [b""]),
        _multipart("error form top_k text", "shapes", "predict", [shape_png], top_k="many"),
        _request("error get explain", "GET", "/v1/models/shapes/explain"),
        # /v2 metadata and health
        _request("v2 server", "GET", "/v2"),
        _request("v2 live", "GET", "/v2/health/live"),
        _request("v2 ready", "GET", "/v2/health/ready"),
        _request("v2 model", "GET", "/v2/models/shapes"),
        _request("v2 model version", "GET", "/v2/models/tiny/versions/1"),
        _request("v2 model bad version", "GET", "/v2/models/tiny/versions/2"),
        _request("v2 model ready", "GET", "/v2/models/shapes/ready"),
        _request("v2 model unknown ready", "GET", "/v2/models/nope/ready"),
        _request("v2 model unknown", "GET", "/v2/models/nope"),
    ]
    # /v2 inference
    image_json = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [_b64(shape_png)]}
    cases += [
        _infer("v2 bytes json", "shapes", {"inputs": [image_json]}),
        _infer(
            "v2 bytes json id", "shapes", {"id": "req-7", "inputs": [image_json], "parameters": {"top_k": 2}}
        ),
        _infer(
            "v2 bytes b64 object",
            "tiny",
            {
                "inputs": [
                    {
                        "name": "image",
                        "shape": [2, 1],
                        "datatype": "BYTES",
                        "data": [{"b64": _b64(tiny_png)}, {"b64": _b64(wide_png)}],
                    }
                ]
            },
        ),
        _infer(
            "v2 bytes binary",
            "shapes",
            {
                "inputs": [
                    {
                        "name": "image",
                        "shape": [2],
                        "datatype": "BYTES",
                        "parameters": {"binary_data_size": len(_bytes_elements([shape_png, shape_jpeg]))},
                    }
                ],
                "outputs": [
                    {"name": "logits", "parameters": {"binary_data": True}},
                    {"name": "maps", "parameters": {"binary_data": True}},
                    {"name": "targets"},
                ],
            },
            _bytes_elements([shape_png, shape_jpeg]),
        ),
        _infer(
            "v2 classification",
            "shapes",
            {
                "inputs": [image_json],
                "outputs": [
                    {"name": "probabilities", "parameters": {"classification": 3}},
                    {"name": "logits"},
                ],
            },
        ),
        _infer(
            "v2 options",
            "shapes",
            {
                "inputs": [image_json],
                "parameters": {
                    "targets": "1,3",
                    "kernel": "dirac",
                    "score": "probability",
                    "normalize": True,
                },
                "outputs": [{"name": "maps"}, {"name": "targets"}],
            },
        ),
        _infer(
            "v2 map input normalised",
            "tiny",
            {
                "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [_b64(tiny_png)]}],
                "parameters": {
                    "map_size": "input",
                    "normalize": True,
                    "keep_prefix": False,
                    "target_block": 1,
                },
                "outputs": [{"name": "maps"}],
            },
        ),
        _infer(
            "v2 binary output everything",
            "tiny",
            {
                "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [_b64(tall_jpeg)]}],
                "parameters": {"binary_data_output": True, "top_k": 2},
            },
        ),
    ]
    pixels = np.random.default_rng(11).standard_normal((2, 3, 32, 32)).astype(np.float32)
    cases += [
        _infer(
            "v2 fp32 json",
            "tiny",
            {
                "inputs": [
                    {
                        "name": "pixel_values",
                        "shape": [2, 3, 32, 32],
                        "datatype": "FP32",
                        "data": pixels.ravel().round(4).tolist(),
                    }
                ]
            },
        ),
        _infer(
            "v2 fp32 binary",
            "tiny",
            {
                "inputs": [
                    {
                        "name": "pixel_values",
                        "shape": [2, 3, 32, 32],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": pixels.nbytes},
                    }
                ],
                "outputs": [{"name": "logits"}, {"name": "maps", "parameters": {"binary_data": True}}],
            },
            pixels.tobytes(),
        ),
        _infer(
            "v2 gzip",
            "shapes",
            {},
            headers={"Content-Encoding": "gzip"},
        ),
    ]
    # the gzip case carries a compressed body built from a real request
    gzip_body = gzip.compress(
        json.dumps({"inputs": [image_json], "outputs": [{"name": "logits"}]}).encode(), mtime=0
    )
    cases[-1]["body"] = _b64(gzip_body)
    cases += [
        _infer("v2 error two inputs", "shapes", {"inputs": [image_json, image_json]}),
        _infer("v2 error unknown input", "shapes", {"inputs": [{**image_json, "name": "picture"}]}),
        _infer("v2 error datatype", "shapes", {"inputs": [{**image_json, "datatype": "FP32"}]}),
        _infer("v2 error shape", "shapes", {"inputs": [{**image_json, "shape": [2]}]}),
        _infer(
            "v2 error unknown output", "shapes", {"inputs": [image_json], "outputs": [{"name": "saliency"}]}
        ),
        _infer("v2 error empty outputs", "shapes", {"inputs": [image_json], "outputs": []}),
        _infer(
            "v2 error targets outside", "shapes", {"inputs": [image_json], "parameters": {"targets": [99]}}
        ),
        _infer("v2 error top_k", "shapes", {"inputs": [image_json], "parameters": {"top_k": 9}}),
        _infer("v2 error extra key", "shapes", {"inputs": [image_json], "colour": 1}),
        _infer("v2 error corrupt image", "shapes", {"inputs": [{**image_json, "data": [_b64(corrupt)]}]}),
        _infer(
            "v2 error fp32 shape",
            "tiny",
            {
                "inputs": [
                    {"name": "pixel_values", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192}
                ]
            },
        ),
        _request("v2 error invalid json", "POST", "/v2/models/shapes/infer", content=b"{]"),
        _request(
            "v2 error brotli",
            "POST",
            "/v2/models/shapes/infer",
            content=b"xx",
            headers={"Content-Encoding": "br"},
        ),
        _request(
            "v2 error header length",
            "POST",
            "/v2/models/shapes/infer",
            content=b"{}",
            headers={"Inference-Header-Content-Length": "99"},
        ),
        _infer("v2 error unknown model", "nope", {"inputs": [image_json]}),
        _infer("v2 version infer", "shapes", {"inputs": [image_json], "outputs": [{"name": "targets"}]}),
    ]
    cases[-1]["path"] = "/v2/models/shapes/versions/1/infer"
    return cases
