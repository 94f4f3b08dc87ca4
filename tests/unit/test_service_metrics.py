"""Prometheus metrics across worker processes (prometheus_client's multiprocess files)."""

from __future__ import annotations

import os
import subprocess
import sys

from app.serving.metrics import _forget_dead_workers


def test_live_gauges_of_dead_workers_are_dropped(tmp_path):
    """A worker killed without a clean shutdown leaves its live gauges behind; a scrape drops them
    (and keeps its counters), and keeps those of processes that still run."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = os.getpid()
    for name in (
        f"gauge_livesum_{gone.pid}.db",
        f"gauge_livemin_{gone.pid}.db",
        f"counter_{gone.pid}.db",
        f"gauge_livesum_{alive}.db",
    ):
        (tmp_path / name).write_bytes(b"")
    _forget_dead_workers(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"counter_{gone.pid}.db", f"gauge_livesum_{alive}.db"]
    )
