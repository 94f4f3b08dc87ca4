"""One real server: `python -m app serve` in a subprocess on 127.0.0.1, driven over TCP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

import httpx
import numpy as np
import pytest

from tests.e2e.readiness import wait_until_ready
from tests.helpers import free_port, save_self_describing

ROOT = Path(__file__).resolve().parents[2]


def _read_all(log: IO[str]) -> str:
    """What the server wrote to its log file so far (read before failing a test)."""
    log.seek(0)
    return log.read()


@pytest.fixture
def server(tmp_path):
    weights = save_self_describing(tmp_path / "tiny.safetensors", "deit_tiny", seed=5)
    config = tmp_path / "service.json"
    config.write_text(
        json.dumps(
            {
                "models": [
                    {"name": "tiny", "weights": str(weights)},
                    {"name": "absent", "weights": str(tmp_path / "absent.safetensors")},
                ],
                "batch": {"max_wait_ms": 5},
                "drain_timeout_s": 10,
            }
        )
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECIPROCAM_")}
    env.update(RECIPROCAM_CONFIG_FILE=str(config), RECIPROCAM_IO_WORKERS="2", OMP_NUM_THREADS="1")
    log = (tmp_path / "server.log").open("w+")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "info",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, process, 90, lambda: _read_all(log))
        yield base, process, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        log.close()


def test_real_server_serves_reports_and_shuts_down_cleanly(server):
    base, process, log = server
    rng = np.random.default_rng(0)
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(buffer, format="PNG")
    with httpx.Client(base_url=base, timeout=30) as client:
        ready = client.get("/readyz").json()
        statuses = {m["name"]: m["status"] for m in ready["models"]}
        assert statuses == {"tiny": "ready", "absent": "unavailable"}
        response = client.post(
            "/v1/models/tiny/explain",
            files={"file": ("a.png", buffer.getvalue(), "image/png")},
            data={"top_k": "2", "encodings": "heatmap,json", "map_size": "original"},
            headers={"X-Request-ID": "e2e-1"},
        )
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == "e2e-1"
        body = response.json()
        assert len(body["images"][0]["explanations"]) == 2
        assert np.asarray(body["images"][0]["explanations"][0]["json"]).shape == (40, 52)
        error = client.post("/v1/models/absent/predict", content=b"x", headers={"content-type": "image/png"})
        assert error.status_code == 503 and error.json()["error"]["code"] == "model_unavailable"
        assert "reciprocam_batch_size_images_count" in client.get("/metrics").text
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    log.seek(0)
    lines = [line for line in log.read().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    access = [r for r in records if r.get("logger") == "app.access" and r.get("request_id") == "e2e-1"]
    assert access and access[0]["status"] == 200 and access[0]["route"] == "/v1/models/{name}/explain"
    assert any("service stopped" in r["message"] for r in records)
