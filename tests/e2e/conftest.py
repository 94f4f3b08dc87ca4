"""A real ``serve`` process (uvicorn) on a tiny model, reached over TCP on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.e2e.readiness import wait_until_ready
from tests.helpers import free_port, save_self_describing

ROOT = Path(__file__).resolve().parents[2]
LABELS = [f"class_{i}" for i in range(7)]


@pytest.fixture(scope="session")
def e2e_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("e2e-weights") / "tiny.safetensors"
    return save_self_describing(path, "deit_tiny", seed=3, labels=LABELS)


class ServerProcess:
    """``python -m tests.e2e.server`` with settings from the environment; stopped on exit."""

    def __init__(
        self,
        weights: Path,
        workdir: Path,
        settings: dict[str, Any],
        delay_s: float = 0.0,
        serve_args: tuple[str, ...] = (),
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.delay_file = workdir / f"delay-{self.port}"
        self.log_path = workdir / f"server-{self.port}.log"
        self.set_delay(delay_s)
        env = {key: value for key, value in os.environ.items() if not key.startswith("RECIPROCAM_")}
        env.update(
            RECIPROCAM_MODELS=json.dumps([{"name": "tiny", "weights": str(weights)}]),
            RECIPROCAM_TEST_DELAY_FILE=str(self.delay_file),
            RECIPROCAM_IO_WORKERS="2",
            RECIPROCAM_LOG_LEVEL="warning",
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        for key, value in settings.items():
            env[f"RECIPROCAM_{key.upper()}"] = str(value)
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                *("-m", "tests.e2e.server", "--host", "127.0.0.1", "--port", str(self.port)),
                *serve_args,
            ],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def set_delay(self, seconds: float) -> None:
        self.delay_file.write_text(str(seconds))

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        wait_until_ready(self.url, self.process, timeout_s, self.log)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (0 when absent)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
        prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
        for line in text.splitlines():
            if line.startswith(prefix):
                return float(line[len(prefix) :])
        return 0.0

    def stop(self) -> None:
        """Stop the server (gracefully first, so that its workers remove their shared memory), then
        kill whatever is left of it and of the processes it started (``--workers`` children too)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(15)
        if self.process.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                for child in psutil.Process(self.pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)
        self._log.close()


@pytest.fixture
def start_server(e2e_weights: Path, tmp_path: Path) -> Iterator[Any]:
    started: list[ServerProcess] = []

    def start(
        settings: dict[str, Any], delay_s: float = 0.0, serve_args: tuple[str, ...] = ()
    ) -> ServerProcess:
        server = ServerProcess(e2e_weights, tmp_path, settings, delay_s, serve_args)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


# The labelled live server used by the OIP client and browser tests.
from tests.e2e.live_server import live_server  # noqa: E402, F401
