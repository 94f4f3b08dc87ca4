"""The decode stage on the model's device (``image_path``): tensor code, tested here on the CPU,
answering as the Pillow path does."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.config import ModelSettings
from tests.helpers import jpeg_bytes, photo_like
from tests.integration.conftest import image_bytes, running_service, tiny_settings


def _settings(weights: Path, image_path: str):
    return tiny_settings(
        weights, models=[ModelSettings(name="tiny", weights=str(weights), image_path=image_path)]
    )


async def _explain(weights: Path, image_path: str, files: list[bytes], **fields: str) -> dict:
    async with running_service(_settings(weights, image_path)) as client:
        multipart = [("files", (f"{i}", data, "application/octet-stream")) for i, data in enumerate(files)]
        response = await client.post(
            "/v1/models/tiny/explain", files=multipart, data={"encodings": "json", **fields}
        )
        assert response.status_code == 200, response.text
        return response.json()


async def test_device_path_answers_as_the_pillow_path(tiny_weights: Path) -> None:
    files = [jpeg_bytes(photo_like(90, 70, seed=seed, cell=16)) for seed in range(3)] + [image_bytes(7)]
    pillow = await _explain(tiny_weights, "pillow", files, top_k="2")
    device = await _explain(tiny_weights, "device", files, top_k="2")
    for a, b in zip(pillow["images"], device["images"], strict=True):
        assert (a["width"], a["height"]) == (b["width"], b["height"])
        assert [p["class_id"] for p in a["predictions"]] == [p["class_id"] for p in b["predictions"]]
        for x, y in zip(a["predictions"], b["predictions"], strict=True):
            assert abs(x["logit"] - y["logit"]) < 0.05
        for x, y in zip(a["explanations"], b["explanations"], strict=True):
            correlation = np.corrcoef(np.ravel(x["json"]), np.ravel(y["json"]))[0, 1]
            assert correlation > 0.99


async def test_device_path_overlays_on_the_original_and_refuses_bad_images(tiny_weights: Path) -> None:
    files = [jpeg_bytes(photo_like(80, 60, seed=4, cell=16))]
    answer = await _explain(tiny_weights, "device", files, map_size="original")
    explanation = answer["images"][0]["explanations"][0]
    assert explanation["size"] == [60, 80]
    async with running_service(_settings(tiny_weights, "device")) as client:
        multipart = [("files", ("a", files[0], "image/jpeg")), ("files", ("b", b"not an image", "image/png"))]
        refused = await client.post("/v1/models/tiny/explain", files=multipart)
        assert refused.status_code == 400
        assert refused.json()["error"]["message"].startswith("image 1: ")
