"""The load test's servers: ``python -m app serve`` subprocesses, and their CPU time from /proc."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_tree_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process and its live descendants (uvicorn workers), read from
    /proc; None where /proc is not available (not Linux) or the process is gone."""
    return _tree_sum(pid, lambda process: _cpu_seconds(Path(f"/proc/{process}/stat")))


def named_threads_cpu_seconds(pid: int, name: str) -> float | None:
    """User + system CPU seconds of the threads called ``name`` (``/proc/<pid>/task/*/comm``) in a
    process and its live descendants: the server's compute threads (app/serving/threads.py). None
    where /proc is not available or the process is gone."""

    def named(process: int) -> float:
        total = 0.0
        for task in list(Path(f"/proc/{process}/task").iterdir()):
            try:
                if (task / "comm").read_text().strip() == name:
                    total += _cpu_seconds(task / "stat")
            except (OSError, ValueError, IndexError):
                continue  # a thread that ended meanwhile
        return total

    return _tree_sum(pid, named)


def _tree_sum(pid: int, per_process: Callable[[int], float]) -> float | None:
    """``per_process`` summed over a process and its live descendants; None when it fails for the
    process itself (gone, or no /proc), a descendant that ended meanwhile counts nothing."""
    total, pending, seen = 0.0, [pid], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            total += per_process(current)
        except (OSError, ValueError, IndexError):
            if current == pid:
                return None
            continue
        pending.extend(child_pids(current) or ())
    return total


def _cpu_seconds(stat: Path) -> float:
    """utime + stime of a /proc stat file (process or thread), in seconds."""
    text = stat.read_text()
    # fields after the parenthesised command name; utime and stime are fields 14 and 15
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def child_pids(pid: int) -> set[int] | None:
    """The direct children of a process (a server's workers), read from /proc; None where /proc is
    not available or the process is gone."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    children: set[int] = set()
    for task in tasks:
        try:
            children.update(int(child) for child in (task / "children").read_text().split())
        except OSError:
            continue  # a thread that ended meanwhile
    return children


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``python -m app serve`` with a JSON config holding one model."""

    def __init__(
        self,
        model: dict[str, Any],
        batch: dict[str, Any],
        workdir: Path,
        name: str,
        workers: int = 1,
        settings: dict[str, Any] | None = None,
        serve_args: tuple[str, ...] = (),
    ) -> None:
        self.port = free_port()
        self.workers = workers
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / f"{name}.json"
        values: dict[str, Any] = {
            "models": [model],
            "batch": batch,
            "limits": {"max_images_per_request": 64},
            "log_level": "warning",
        }
        for key, value in (settings or {}).items():  # sections (batch, limits, ...) merge one level deep
            if isinstance(value, dict) and isinstance(values.get(key), dict):
                values[key] = {**values[key], **value}
            else:
                values[key] = value
        config.write_text(json.dumps(values))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECIPROCAM_")}
        env["RECIPROCAM_CONFIG_FILE"] = str(config)
        self.log_path = workdir / f"{name}.log"
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app",
                "serve",
                "--port",
                str(self.port),
                "--workers",
                str(workers),
                "--log-level",
                "warning",
                *serve_args,
            ],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 300) -> None:
        """Until /readyz answers 200 on 4 fresh connections per worker in a row.

        Each worker loads its model on its own and answers 503 until then; a fresh connection goes
        to whichever worker accepts it first, so one 200 says only that some worker is ready. The
        run of 200s makes it likely, not certain, that every worker answered: a busy loading worker
        may lose every race for a connection.
        """
        deadline = time.monotonic() + timeout_s
        in_a_row = 0
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited; see {self.log_path}:\n{self.log_path.read_text()[-3000:]}"
                )
            try:
                response = httpx.get(f"{self.url}/readyz", timeout=2)
                if response.status_code == 200:
                    in_a_row += 1
                    if in_a_row >= 4 * self.workers:
                        return
                    continue
                in_a_row = 0
                if response.json().get("status") == "unavailable":
                    raise RuntimeError(f"model unavailable: {response.text}")
            except httpx.TransportError:
                in_a_row = 0
            time.sleep(0.3)
        raise TimeoutError("server did not become ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
