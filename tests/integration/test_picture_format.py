"""Heatmaps and overlays as JPEG (``picture_format``) on both image paths, and the tensor path's
render stage answering as the Pillow path's over HTTP (on the CPU)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app.config import ModelSettings
from tests.helpers import jpeg_bytes, photo_like
from tests.integration.conftest import image_bytes, running_service, tiny_settings

PICTURES = ("png", "heatmap", "overlay")


def _settings(weights: Path, image_path: str):
    return tiny_settings(
        weights, models=[ModelSettings(name="tiny", weights=str(weights), image_path=image_path)]
    )


def _files() -> list[bytes]:
    photos = [jpeg_bytes(photo_like(90 + 7 * seed, 70 + 5 * seed, seed=seed, cell=16)) for seed in range(3)]
    return [*photos, image_bytes(7, size=(50, 44))]


async def _explain(weights: Path, image_path: str, files: list[bytes], **fields: str) -> dict[str, Any]:
    async with running_service(_settings(weights, image_path)) as client:
        multipart = [("files", (f"{i}", data, "application/octet-stream")) for i, data in enumerate(files)]
        response = await client.post("/v1/models/tiny/explain", files=multipart, data=fields)
        assert response.status_code == 200, response.text
        return response.json()


def _picture(field: str) -> Image.Image:
    picture = Image.open(io.BytesIO(base64.b64decode(field)))
    picture.load()
    return picture


def _pixels(field: str) -> np.ndarray:
    return np.asarray(_picture(field).convert("RGB")).astype(np.int16)


@pytest.mark.parametrize("image_path", ["pillow", "device"])
@pytest.mark.parametrize("map_size", ["input", "original"])
async def test_jpeg_heatmaps_and_overlays_on_both_paths(
    tiny_weights: Path, image_path: str, map_size: str
) -> None:
    files = _files()
    answer = await _explain(
        tiny_weights,
        image_path,
        files,
        encodings="png,heatmap,overlay",
        map_size=map_size,
        picture_format="jpeg",
        jpeg_quality="75",
        top_k="2",
    )
    for image in answer["images"]:
        expected_size = (image["width"], image["height"]) if map_size == "original" else (32, 32)
        for explanation in image["explanations"]:
            assert explanation["media_types"] == {
                "png": "image/png",
                "heatmap": "image/jpeg",
                "overlay": "image/jpeg",
            }
            assert explanation["size"] == [expected_size[1], expected_size[0]]
            grey = _picture(explanation["png"])
            assert (grey.format, grey.mode, grey.size) == ("PNG", "L", expected_size)
            for name in ("heatmap", "overlay"):
                picture = _picture(explanation[name])
                assert (picture.format, picture.mode, picture.size) == ("JPEG", "RGB", expected_size), name


async def test_png_answers_state_no_media_types(tiny_weights: Path) -> None:
    answer = await _explain(tiny_weights, "pillow", _files()[:1], encodings="heatmap,overlay")
    explanation = answer["images"][0]["explanations"][0]
    assert "media_types" not in explanation
    assert _picture(explanation["heatmap"]).format == "PNG"
    assert _picture(explanation["overlay"]).format == "PNG"


async def test_jpeg_quality_trades_bytes_for_fidelity(tiny_weights: Path) -> None:
    files = _files()[:1]
    sizes = {}
    for quality in ("20", "95"):
        answer = await _explain(
            tiny_weights, "pillow", files, encodings="overlay", picture_format="jpeg", jpeg_quality=quality
        )
        sizes[quality] = len(base64.b64decode(answer["images"][0]["explanations"][0]["overlay"]))
    assert sizes["20"] < sizes["95"]


@pytest.mark.parametrize(
    ("fields", "option"),
    [
        ({"picture_format": "gif"}, "picture_format"),
        ({"picture_format": "jpeg", "jpeg_quality": "0"}, "jpeg_quality"),
        ({"picture_format": "jpeg", "jpeg_quality": "101"}, "jpeg_quality"),
        ({"picture_format": "jpeg", "jpeg_quality": "high"}, "jpeg_quality"),
    ],
)
async def test_bad_picture_options_are_refused_naming_the_option(
    tiny_weights: Path, fields: dict[str, str], option: str
) -> None:
    async with running_service(_settings(tiny_weights, "pillow")) as client:
        response = await client.post(
            "/v1/models/tiny/explain",
            files={"file": ("a.png", image_bytes(1), "image/png")},
            data={"encodings": "heatmap", **fields},
        )
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["code"] == "invalid_options"
        assert option in error["message"]
        as_json = await client.post(
            "/v1/models/tiny/explain",
            json={"images": [{"data": base64.b64encode(image_bytes(1)).decode()}], **fields},
        )
        assert as_json.status_code == 422 and option in as_json.json()["error"]["message"]


@pytest.mark.parametrize("picture_format", ["png", "jpeg"])
@pytest.mark.parametrize("map_size", ["grid", "input", "original"])
async def test_device_render_answers_as_the_pillow_render(
    tiny_weights: Path, picture_format: str, map_size: str
) -> None:
    """The two paths' inputs differ by a level here and there (docs/image-path.md), so maps differ
    a little: their pictures differ by a few levels (more where JPEG's quantisation amplifies it)."""
    files = _files()
    fields = {
        "encodings": "png,heatmap,overlay,json",
        "map_size": map_size,
        "picture_format": picture_format,
        "top_k": "2",
    }
    pillow = await _explain(tiny_weights, "pillow", files, **fields)
    device = await _explain(tiny_weights, "device", files, **fields)
    differences: dict[str, list[np.ndarray]] = {name: [] for name in PICTURES}
    for a, b in zip(pillow["images"], device["images"], strict=True):
        for x, y in zip(a["explanations"], b["explanations"], strict=True):
            assert x["class_id"] == y["class_id"] and x["size"] == y["size"]
            assert x.get("media_types") == y.get("media_types")
            assert np.abs(np.asarray(x["json"]) - np.asarray(y["json"])).max() < 0.01
            for name in PICTURES:
                assert _picture(x[name]).format == _picture(y[name]).format
                differences[name].append(np.abs(_pixels(x[name]) - _pixels(y[name])).ravel())
    both = {name: np.concatenate(values) for name, values in differences.items()}
    assert both["png"].max() <= 2 and both["png"].mean() < 0.5
    if picture_format == "png":
        assert both["heatmap"].max() <= 8 and both["heatmap"].mean() < 0.5
        assert both["overlay"].max() <= 6 and both["overlay"].mean() < 0.5
    else:
        for name in ("heatmap", "overlay"):
            assert both[name].max() <= 40 and both[name].mean() < 2.5, name


@pytest.mark.parametrize(("image_path", "calls"), [("device", 1), ("pillow", 0)])
async def test_the_tensor_path_renders_its_requests_with_render_maps(
    tiny_weights: Path, image_path: str, calls: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.serving.device_stage as device_stage

    seen: list[tuple[int, str]] = []
    original = device_stage.render_maps

    def recording(normalized: Any, geometry: Any, **options: Any) -> Any:
        seen.append((int(normalized.shape[0]), options["image_format"]))
        return original(normalized, geometry, **options)

    monkeypatch.setattr(device_stage, "render_maps", recording)
    answer = await _explain(
        tiny_weights, image_path, _files(), encodings="heatmap,json", picture_format="jpeg", top_k="2"
    )
    assert len(answer["images"]) == 4
    # the request's 4 images x 2 classes in one call, with the asked picture format
    assert seen == [(8, "jpeg")] * calls


@pytest.mark.parametrize("normalize", [False, True])
async def test_v2_maps_from_the_tensor_path_match_the_pillow_path(
    tiny_weights: Path, normalize: bool
) -> None:
    files = _files()
    body = {
        "inputs": [
            {
                "name": "image",
                "shape": [len(files)],
                "datatype": "BYTES",
                "data": [base64.b64encode(data).decode("ascii") for data in files],
            }
        ],
        "outputs": [{"name": "maps"}, {"name": "targets"}],
        "parameters": {"top_k": 2, "map_size": "input", "normalize": normalize},
    }
    answers = {}
    for image_path in ("pillow", "device"):
        async with running_service(_settings(tiny_weights, image_path)) as client:
            response = await client.post("/v2/models/tiny/infer", json=body)
            assert response.status_code == 200, response.text
            answers[image_path] = {output["name"]: output for output in response.json()["outputs"]}
    pillow, device = answers["pillow"], answers["device"]
    assert pillow["maps"]["shape"] == device["maps"]["shape"] == [len(files), 2, 32, 32]
    assert pillow["targets"]["data"] == device["targets"]["data"]
    a, b = np.asarray(pillow["maps"]["data"]), np.asarray(device["maps"]["data"])
    scale = 1.0 if normalize else float(np.abs(a).max())
    assert np.abs(a - b).max() < 0.01 * scale
