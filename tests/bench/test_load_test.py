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


class _Scripted:
    """A tiny HTTP server on 127.0.0.1 answering with scripted status codes (then 200), in a thread."""

    def __init__(self, statuses: list[int]) -> None:
        import http.server
        import threading

        script = list(statuses)
        self.served: list[int] = []
        served = self.served

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                status = script.pop(0) if script else 200
                served.append(status)
                body = b'{"status": "ready", "timing": {"batch_images": 1}}'
                if status != 200:  # the service's error body, with its per-request id
                    request_id = f"{len(served):032x}"
                    body = (
                        '{"error": {"code": "queue_full", "message": "retry after 1 s", '
                        f'"request_id": "{request_id}"}}}}'
                    ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Scripted:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_readiness_waits_for_every_worker(load_test):
    # One 200 says only that some worker is ready: wait for 4 per worker in a row; a 503 between
    # them (a worker still loading) starts the count again.
    statuses = [503, 200, 200, 503] + [200] * 20
    with _Scripted(statuses) as server:
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            waiter = object.__new__(load_test.ServerProcess)
            waiter.process, waiter.url, waiter.workers = process, server.url, 2
            waiter.wait_ready(timeout_s=60)
        finally:
            process.kill()
            process.wait()
    assert server.served == [503, 200, 200, 503] + [200] * 8


def test_errors_are_counted_by_kind(load_test):
    import asyncio

    with _Scripted([503, 503, 503]) as server:
        result = asyncio.run(
            load_test.run_level(server.url, "m", "predict", 1, 3, [b"jpeg"], 1, {}, "cfg", None, None)
        )
    assert result.errors == 2  # the warm-up request took the first 503; one of 3 measured was a 200
    assert result.error_kinds == {"503 queue_full: retry after 1 s": 2}  # one kind, whatever the ids
    assert result.served_requests == 1


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")
def test_child_pids_sees_a_worker_end(load_test):
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; "
            "subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)",
        ]
    )
    try:
        deadline = time.monotonic() + 30
        children = load_test.child_pids(parent.pid)
        while not children and time.monotonic() < deadline:
            time.sleep(0.05)
            children = load_test.child_pids(parent.pid)
        assert children and len(children) == 1
        (child,) = children
        subprocess.run(["kill", str(child)], check=True)
        while load_test.child_pids(parent.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert load_test.child_pids(parent.pid) == set()  # the worker is gone, the parent is not
    finally:
        parent.kill()
        parent.wait()
    assert load_test.child_pids(parent.pid) is None
