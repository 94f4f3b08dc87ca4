"""Waiting for a server process started by a test to answer /readyz."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import httpx
import pytest


def wait_until_ready(
    url: str, process: subprocess.Popen[bytes], timeout_s: float, log: Callable[[], str]
) -> None:
    """Poll ``url``/readyz until it answers 200; fail the test, with the server's log, if the
    process exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the server was not ready within {timeout_s} s:\n{log()}")
        time.sleep(0.2)
