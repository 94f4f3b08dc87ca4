"""The server process's watch over the shared engine process: start it, start it again when it dies
(the HTTP workers answer 503 with Retry-After meanwhile and reconnect), stop it last."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from app.config_errors import ENGINE_SOCKET_ENV

logger = logging.getLogger("app.supervisor")
ENGINE_MODULE = "app.serving.engine_process"
__all__ = ["ENGINE_SOCKET_ENV", "EngineSupervisor"]
RESTART_DELAYS_S = (0.0, 0.5, 1.0, 2.0, 5.0)  # by consecutive quick deaths
STABLE_S = 30.0  # an engine that lived this long resets the delay


class EngineSupervisor:
    def __init__(self, *, stop_timeout_s: float) -> None:
        self._directory = tempfile.mkdtemp(prefix="reciprocam-engine-")  # mode 0700: ours alone
        self.address = os.path.join(self._directory, "engine.sock")
        self.stop_timeout_s = stop_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._environment = dict(os.environ)  # as at start, for restarts too
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="engine-supervisor", daemon=True)

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        command = [sys.executable, "-m", ENGINE_MODULE, self.address]
        # its standard input is how it is told to stop (closed), see app.serving.engine_process
        self.process = subprocess.Popen(command, env=self._environment, stdin=subprocess.PIPE)
        self.starts += 1

    def _watch(self) -> None:
        quick_deaths = 0
        while not self._stopping.is_set():
            process = self.process
            assert process is not None
            started = time.monotonic()
            status = process.wait()
            if self._stopping.is_set():
                return
            quick_deaths = 0 if time.monotonic() - started > STABLE_S else quick_deaths + 1
            delay = RESTART_DELAYS_S[min(max(quick_deaths - 1, 0), len(RESTART_DELAYS_S) - 1)]
            logger.error("the engine process exited with status %s; restarting it in %.1f s", status, delay)
            if self._stopping.wait(delay):
                return
            self._spawn()

    def stop(self) -> None:
        """Close the engine's standard input (it finishes what is queued and exits), then SIGKILL
        after ``stop_timeout_s``."""
        self._stopping.set()
        process = self.process
        if process is not None and process.poll() is None:
            if process.stdin is not None:
                process.stdin.close()
            try:
                process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self._directory, ignore_errors=True)
