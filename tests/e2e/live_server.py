"""A real uvicorn process serving a tiny self-describing model with labels (OIP and browser tests)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.engine.models import LoadedModel
from app.serving.images import ALLOWED_FORMATS
from app.serving.prepare import prepare_image
from tests.e2e.readiness import wait_until_ready
from tests.helpers import free_port, save_self_describing

ROOT = Path(__file__).resolve().parents[2]
LABELS = [
    "tabby cat",
    "golden retriever",
    "hot-air balloon",
    "lighthouse",
    "sunflower",
    "espresso",
    "red fox",
]
MODEL = "tiny"


@dataclass
class LiveServer:
    url: str
    weights: Path
    log: Path


def colourful_png(width: int = 320, height: int = 240, seed: int = 0) -> bytes:
    """Smooth colour gradients with a few bright discs: pleasant to look at, distinct per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 0.5 + 0.5 * np.sin(x / width * 3.1 + seed)
    green = 0.5 + 0.5 * np.sin(y / height * 2.7 + 1.0 + seed)
    blue = 0.5 + 0.5 * np.cos((x + y) / (width + height) * 4.0 + seed)
    pixels = np.stack([red, green, blue], axis=-1)
    for _ in range(4):
        cx, cy = rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height
        radius = rng.uniform(0.08, 0.18) * min(width, height)
        colour = rng.uniform(0.2, 1.0, size=3)
        inside = (x - cx) ** 2 + (y - cy) ** 2 < radius**2
        pixels[inside] = colour
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """``python -m uvicorn app.main:create_app --factory`` on a free port, ready to serve."""
    folder = tmp_path_factory.mktemp("live")
    weights = save_self_describing(folder / "tiny.safetensors", "deit_tiny", seed=3, labels=LABELS)
    port = free_port()
    env = {
        **os.environ,
        "RECIPROCAM_MODELS": json.dumps([{"name": MODEL, "weights": str(weights)}]),
        "RECIPROCAM_BATCH__MAX_WAIT_MS": "2",
        "RECIPROCAM_IO_WORKERS": "2",
        "RECIPROCAM_LOG_FORMAT": "text",
        "RECIPROCAM_LOG_LEVEL": "warning",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("RECIPROCAM_CONFIG_FILE", None)
    log = folder / "server.log"
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "app.main:create_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, 120, lambda: log.read_text()[-4000:])
        yield LiveServer(url=url, weights=weights, log=log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def preprocessed(loaded: LoadedModel, data: bytes) -> torch.Tensor:
    """``data`` prepared as the live server prepares posted images (torch's resize, its default),
    normalised: the reference input for what the server returns."""
    image = prepare_image(
        data,
        loaded.preprocessor,
        max_pixels=10**8,
        allowed_formats=ALLOWED_FORMATS,
        keep_original=False,
        tensor_resize=True,
    )
    return image.tensor
