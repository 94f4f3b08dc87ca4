"""The HTTP load-test script: its CPU accounting, and one tiny run end to end (two real servers)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_process_tree_cpu_counts_the_descendants(load_test, tmp_path):
    """A parent that only waits, whose child burns 0.3 s of CPU: the tree's CPU time includes it."""
    ready = tmp_path / "burned"
    child = textwrap.dedent(
        f"""
        import time, pathlib
        while time.process_time() < 0.3:
            pass
        pathlib.Path({str(ready)!r}).write_text("done")
        time.sleep(60)
        """
    )
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    process = subprocess.Popen([sys.executable, "-c", parent])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists()
        assert load_test.process_tree_cpu_seconds(process.pid) >= 0.3
    finally:
        for pid_file in Path(f"/proc/{process.pid}/task").glob("*/children"):
            for pid in pid_file.read_text().split():
                subprocess.run(["kill", pid], check=False)
        process.kill()
        process.wait()
    assert load_test.process_tree_cpu_seconds(process.pid) is None  # gone


def test_a_tiny_load_test_reports_throughput_ratios_and_cpu(load_test, tmp_path, capsys):
    out = tmp_path / "report.md"
    code = load_test.main(
        [
            "--arch=deit_tiny_patch16_224",
            '--model-kwargs={"img_size": 32}',
            "--endpoint",
            "explain",
            "--concurrency",
            "2",
            "--requests=8",
            "--rounds=1",
            "--image-size=48",
            "--max-batch=4",
            '--variant={"reduced_jpeg_decode": false}',
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = out.read_text()
    rows = [line for line in report.splitlines() if line.startswith("| batching")]
    variant_rows = [line for line in report.splitlines() if line.startswith("| variant")]
    assert len(rows) == 2 and len(variant_rows) == 1  # batching on and off, and the variant
    rows += variant_rows
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[4] == "0"  # no errors
        assert float(cells[5]) > 0  # req/s
        assert float(cells[11]) > 0  # server CPU ms per image, measured from /proc
        assert float(cells[12]) > 0  # client CPU ms per request
    assert "batching on / off" in report and "engine only" in report
    assert "ms per image outside the model" in report
    assert 'variant ({"reduced_jpeg_decode": false}) / batching on' in report
