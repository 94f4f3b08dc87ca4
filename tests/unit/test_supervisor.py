"""The server's watch over the shared engine process: restarted when it dies, stopped last."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from app.serving import supervisor


def _wait(condition, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("timed out")
        time.sleep(0.02)


def test_a_dead_engine_is_started_again_and_stop_ends_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # a stand-in engine: waits until its standard input ends
    monkeypatch.setattr(supervisor, "ENGINE_MODULE", "tests.unit.sleeping_engine")
    watch = supervisor.EngineSupervisor(stop_timeout_s=10)
    directory = os.path.dirname(watch.address)
    assert os.stat(directory).st_mode & 0o777 == 0o700  # only this user reaches the socket
    watch.start()
    first = watch.process
    assert first is not None
    first.send_signal(signal.SIGKILL)
    _wait(lambda: watch.starts == 2)
    second = watch.process
    assert second is not None and second.pid != first.pid and second.poll() is None
    _wait(lambda: os.path.exists(watch.address) and Path(watch.address).read_text() == str(second.pid))
    second.send_signal(signal.SIGTERM)  # a signal for the whole group does not stop it
    time.sleep(0.3)
    assert second.poll() is None
    watch.stop()
    assert second.poll() == 0  # stopped by closing its input, not killed
    assert watch.starts == 2  # not restarted after the stop
    assert not os.path.exists(directory)
