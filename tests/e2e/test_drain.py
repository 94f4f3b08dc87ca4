"""Real server under SIGTERM and vanishing clients (slow: needs a model that takes seconds per batch)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_uvicorn import ROOT
from tests.helpers import free_port
from tests.integration.conftest import image_bytes

pytestmark = pytest.mark.slow


def start_server(tmp_path: Path) -> tuple[subprocess.Popen, str, Path]:
    config = tmp_path / "service.json"
    config.write_text(
        json.dumps(
            {
                # a full-size ViT explained on the reference path: about a second per image on a CPU
                # (deit_tiny was too fast: a batch of 4 finished before the 1 s client timed out)
                "models": [
                    {
                        "name": "slow",
                        "arch": "deit_small_patch16_224",
                        "weights": "random:0",
                        "path": "reference",
                        "device": "cpu",
                    }
                ],
                "batch": {"max_batch_images": 4, "max_wait_ms": 0},
                "drain_timeout_s": 120,
            }
        )
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECIPROCAM_")}
    env["RECIPROCAM_CONFIG_FILE"] = str(config)
    log_path = tmp_path / "server.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return process, base, log_path
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.kill()
    pytest.fail("server did not become ready")


def explain(base: str, images: int, timeout: float = 600) -> httpx.Response:
    files = [("files", (f"{i}.png", image_bytes(i, size=(224, 224)), "image/png")) for i in range(images)]
    return httpx.post(f"{base}/v1/models/slow/explain", files=files, timeout=timeout)


def test_vanished_client_is_skipped_and_sigterm_drains(tmp_path):
    process, base, log_path = start_server(tmp_path)
    try:
        results: dict[str, httpx.Response | Exception] = {}

        def run(name: str, images: int, timeout: float = 600) -> None:
            try:
                results[name] = explain(base, images, timeout)
            except Exception as exc:
                results[name] = exc

        busy = threading.Thread(target=run, args=("busy", 4))
        busy.start()
        time.sleep(1.0)  # 'busy' is computing
        gone = threading.Thread(target=run, args=("gone", 1, 1.0))  # gives up after 1 s, while queued
        gone.start()
        gone.join()
        assert isinstance(results["gone"], httpx.TimeoutException)
        busy.join()
        assert results["busy"].status_code == 200
        metrics = httpx.get(f"{base}/metrics").text
        assert re.search(
            r'reciprocam_rejections_total{model="slow",reason="client_disconnected"} 1\.0', metrics
        )
        assert 'reciprocam_images_total{kind="explain",model="slow"} 4.0' in metrics

        # SIGTERM while a request computes and another waits: both are answered, then a clean exit
        first = threading.Thread(target=run, args=("first", 4))
        second = threading.Thread(target=run, args=("second", 2))
        first.start()
        time.sleep(1.0)
        second.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        first.join()
        second.join()
        assert results["first"].status_code == 200, results["first"]
        assert results["second"].status_code == 200, results["second"]
        assert len(results["second"].json()["images"]) == 2
        assert process.wait(timeout=60) == 0
        assert "draining" in log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
