"""Every stage of a request is timed per image in ``reciprocam_stage_seconds``."""

from __future__ import annotations

import re

import httpx
import numpy as np

from app.serving.metrics import STAGES
from tests.integration.conftest import image_bytes

IMAGE_STAGES = ("decode", "preprocess")


async def _stages(client: httpx.AsyncClient) -> dict[str, tuple[float, float]]:
    """stage -> (count, sum) of the tiny model's stage histogram."""
    text = (await client.get("/metrics")).text
    found: dict[str, list[float]] = {}
    for kind, stage, value in re.findall(
        r'^reciprocam_stage_seconds_(count|sum)\{model="tiny",stage="(\w+)"\} (\S+)$', text, flags=re.M
    ):
        found.setdefault(stage, [0.0, 0.0])[0 if kind == "count" else 1] = float(value)
    return {stage: (values[0], values[1]) for stage, values in found.items()}


def _delta(
    after: dict[str, tuple[float, float]], before: dict[str, tuple[float, float]], stage: str
) -> float:
    return after.get(stage, (0.0, 0.0))[0] - before.get(stage, (0.0, 0.0))[0]


async def test_each_stage_counts_every_image_of_both_protocols(client: httpx.AsyncClient) -> None:
    before = await _stages(client)
    files = [("files", (f"{i}.png", image_bytes(i), "image/png")) for i in range(3)]
    response = await client.post("/v1/models/tiny/explain", files=files, data={"encodings": "heatmap"})
    assert response.status_code == 200, response.text
    after = await _stages(client)
    for stage in STAGES:
        assert _delta(after, before, stage) == 3, stage
    assert after["decode"][1] > before.get("decode", (0.0, 0.0))[1]  # CPU time was spent decoding
    assert after["compute"][1] > before.get("compute", (0.0, 0.0))[1]

    # client-preprocessed tensors are neither decoded nor preprocessed by the service
    pixels = np.zeros((2, 3, 32, 32), dtype=np.float32)
    body = {
        "inputs": [
            {
                "name": "pixel_values",
                "shape": [2, 3, 32, 32],
                "datatype": "FP32",
                "data": pixels.ravel().tolist(),
            }
        ]
    }
    answered = await client.post("/v2/models/tiny/infer", json=body)
    assert answered.status_code == 200, answered.text
    last = await _stages(client)
    for stage in STAGES:
        assert _delta(last, after, stage) == (0 if stage in IMAGE_STAGES else 2), stage
