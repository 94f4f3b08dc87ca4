"""The HTTP load-test script: its CPU accounting, its client processes (closed and open loop, against
a scripted server), the stage figures from /metrics, and tiny runs end to end (real servers)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def loadgen(load_test):
    """The client module as the load test imports it (its client processes import it by that name)."""
    return sys.modules["benchmarks.loadgen"]


@pytest.fixture(scope="module")
def load_stages(load_test):
    return sys.modules["benchmarks.load_stages"]


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


def _rows(report: str, prefix: str, header: str) -> list[list[str]]:
    """The body rows starting with ``prefix`` of the report's table whose header holds ``header``."""
    table = next(block for block in report.split("\n\n") if header in block)
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in table.splitlines()
        if line.startswith(prefix) and not line.startswith("| configuration")
    ]


def test_a_tiny_load_test_reports_throughput_ratios_and_cpu(load_test, tmp_path):
    """Two client processes, a closed-loop and an open-loop level, three real servers: every request
    sent is counted once, answered, and both sides' CPU is reported."""
    import torch

    threads = torch.get_num_threads()
    out = tmp_path / "report.md"
    code = load_test.main(
        [
            "--arch=deit_tiny_patch16_224",
            '--model-kwargs={"img_size": 32}',
            "--endpoint",
            "explain",
            "--concurrency",
            "3",
            "--rate",
            "30",
            "--client-processes=2",
            "--requests=8",
            "--rounds=1",
            "--image-size=48",
            "--max-batch=4",
            '--variant={"reduced_jpeg_decode": false}',
            "--engine-threads=1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert torch.get_num_threads() == threads  # the engine-only run's thread count was undone
    report = out.read_text()
    closed = _rows(report, "| ", "| concurrency | client processes |")
    assert [row[0] for row in closed] == ["batching on", "batching off", "variant"]
    for row in closed:
        assert row[2:6] == ["3", "2", "8", "0"]  # concurrency, processes, 8 requests sent, no errors
        assert float(row[6]) > 0  # req/s
        assert float(row[13]) > 0  # server CPU ms per image, measured from /proc
        assert float(row[14]) > 0  # client CPU ms per request, from the client processes
        assert row[15].endswith("% of a core")
    opened = _rows(report, "| ", "| offered req/s |")
    assert [row[0] for row in opened] == ["batching on", "batching off", "variant"]
    for row in opened:
        assert row[2:7] == ["30", "poisson", "2", "8", "0"]  # rate, arrivals, processes, sent, errors
        assert float(row[8]) > 0  # answered req/s
        assert float(row[17]) > 0  # client CPU ms per request
    assert "batching on / off" in report and "engine only" in report
    assert "ms per image outside the model" in report
    # the server's compute threads, read by name from /proc, hold part of its CPU, not all of it
    (split,) = [line for line in report.splitlines() if "batching on: server CPU per image" in line]
    server_ms, compute_ms = (float(v) for v in re.findall(r"([0-9.]+) ms", split)[:2])
    assert 0 < compute_ms < server_ms
    assert 'variant ({"reduced_jpeg_decode": false}) / batching on' in report
    assert "the load generator used" in report


def test_ready_tensors_to_v2_in_open_loop(load_test, tmp_path):
    """``--payload tensor``: binary FP32 pixel_values to /v2, open loop only, one server."""
    out = tmp_path / "report.md"
    code = load_test.main(
        [
            "--arch=deit_tiny_patch16_224",
            '--model-kwargs={"img_size": 32}',
            "--endpoint",
            "explain",
            "predict",
            "--rate",
            "40",
            "--arrivals=uniform",
            "--requests=6",
            "--rounds=1",
            "--image-size=48",
            "--no-batching-off",
            "--no-engine",
            "--payload=tensor",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    rows = _rows(out.read_text(), "| batching on", "| offered req/s |")
    assert [row[1] for row in rows] == ["explain", "predict"]
    for row in rows:
        assert row[3] == "uniform" and row[5:7] == ["6", "0"]  # 6 sent, no errors
        assert float(row[15]) >= 1  # mean batch, read from /v2's parameters


class _Scripted:
    """A tiny HTTP server on 127.0.0.1 answering with scripted status codes (then 200), in a thread."""

    def __init__(self, statuses: list[int], metrics: list[str] | None = None) -> None:
        import http.server
        import threading

        script = list(statuses)
        scrapes = list(metrics or [])
        self.served: list[int] = []
        served = self.served

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                if self.path == "/metrics":
                    text = (scrapes.pop(0) if scrapes else "").encode()
                    self.send_response(200 if text else 404)
                    self.send_header("Content-Length", str(len(text)))
                    self.end_headers()
                    self.wfile.write(text)
                    return
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


def _template(loadgen, endpoint: str = "predict"):
    return loadgen.RequestTemplate("v1", f"/v1/models/m/{endpoint}", {}, [b"jpeg"])


def test_errors_are_counted_by_kind(loadgen):
    import asyncio

    with _Scripted([503, 503, 503]) as server:
        spec = loadgen.LevelSpec(server.url, _template(loadgen), requests=3, concurrency=1, warmup=1)
        result = asyncio.run(loadgen.run_client(spec))
    assert result.sent == 3
    assert result.errors == 2  # the warm-up request took the first 503; one of 3 measured was a 200
    assert result.error_kinds == {"503 queue_full: retry after 1 s": 2}  # one kind, whatever the ids
    assert len(result.latencies_ms) == 1 and result.batch_images == [1]


def test_an_answer_without_timings_is_an_error_not_a_crash(loadgen):
    import asyncio

    with _Scripted([]) as server:
        template = loadgen.RequestTemplate("v2", "/v2/models/m/infer", {}, [b"{}"])  # /v1's body on /v2
        result = asyncio.run(loadgen.run_client(loadgen.LevelSpec(server.url, template, 2, 1, warmup=0)))
    assert result.sent == 2 and result.latencies_ms == []
    ((kind, count),) = result.error_kinds.items()
    assert count == 2 and kind.startswith("200 unreadable answer")


def test_closed_loop_from_several_processes_counts_every_request(loadgen):
    # 5 in flight from 2 processes (3 + 2), 11 requests (7 + 4), each process warming up with its share
    with _Scripted([]) as server, loadgen.ClientPool(2) as pool:
        specs = loadgen.level_specs(server.url, _template(loadgen), 2, 11, 5)
        assert [(s.concurrency, s.requests, s.warmup) for s in specs] == [(3, 7, 3), (2, 4, 2)]
        started = []
        results = pool.run(specs, lambda: started.append(len(server.served)))
    assert started == [5]  # the parent's hook ran after the warm-ups and before any measured request
    assert len(server.served) == 5 + 11
    assert sorted(r.sent for r in results) == [4, 7]
    assert sum(len(r.latencies_ms) for r in results) == 11 and not any(r.errors for r in results)
    assert all(r.cpu_s > 0 and r.finished > r.started for r in results)  # each process's own CPU
    assert all(
        0 < r.max_in_flight <= s for r, s in zip(sorted(results, key=lambda r: -r.sent), (3, 2), strict=True)
    )


def test_open_loop_sends_at_its_rate_whatever_the_answers(loadgen):
    # every answer is a 503: the open loop still sends all its requests, and counts them by kind
    with _Scripted([503] * 100) as server, loadgen.ClientPool(2) as pool:
        specs = loadgen.level_specs(server.url, _template(loadgen), 2, 10, 64, rate=100.0, arrivals="uniform")
        assert [(s.requests, s.rate) for s in specs] == [(5, 50.0), (5, 50.0)]
        results = pool.run(specs)
    assert len(server.served) == 2 * 2 + 10  # two warm-ups per process, then every scheduled request
    assert sum(r.sent for r in results) == 10 and sum(len(r.send_lags_ms) for r in results) == 10
    errors: dict[str, int] = {}
    for r in results:
        for kind, count in r.error_kinds.items():
            errors[kind] = errors.get(kind, 0) + count
    assert errors == {"503 queue_full: retry after 1 s": 10}
    assert all(r.cpu_s > 0 for r in results)
    # 5 uniform arrivals 20 ms apart take at least 80 ms of sending in each process
    assert all(r.last_send - r.started >= 0.08 for r in results)


def test_open_loop_cap_refuses_to_send_past_it(loadgen):
    import asyncio

    with _Scripted([]) as server:
        spec = loadgen.LevelSpec(
            server.url, _template(loadgen), requests=20, concurrency=1, rate=10_000.0, arrivals="uniform"
        )
        result = asyncio.run(loadgen.run_client(spec))
    assert result.sent == 20 and result.max_in_flight == 1
    capped = result.error_kinds.get(loadgen.CAP_ERROR, 0)
    assert capped > 0 and len(result.latencies_ms) == 20 - capped


def test_a_round_adds_up_every_client_process(load_test, loadgen):
    result = load_test.LevelResult("batching on", "explain", "open", 20.0, 2, 1)
    first = loadgen.ClientResult(
        sent=10,
        latencies_ms=[1.0] * 9,
        batch_images=[1] * 9,
        error_kinds={"503 queue_full: retry": 1},
        started=100.0,
        finished=101.0,
        last_send=100.5,
        cpu_s=0.05,
        send_lags_ms=[0.0] * 10,
        max_in_flight=3,
    )
    second = loadgen.ClientResult(
        sent=10,
        latencies_ms=[2.0] * 10,
        batch_images=[2] * 10,
        started=100.0,
        finished=102.0,
        last_send=101.0,
        cpu_s=0.15,
        send_lags_ms=[1.0] * 10,
        max_in_flight=2,
    )
    result.add_round([first, second], server_cpu_s=1.9, workers_lost=0)
    assert (result.requests, result.errors, result.served_images) == (20, 1, 19)
    assert result.seconds == pytest.approx(2.0) and result.images_per_s == pytest.approx(9.5)
    assert result.sent_per_s == pytest.approx(30.0)  # 10 in 0.5 s and 10 in 1 s
    assert result.client_cpu_ms_per_request == pytest.approx(10.0)  # 0.2 CPU s over 20 requests
    assert result.core_shares == [pytest.approx(0.05), pytest.approx(0.075)]
    assert result.server_cpu_ms_per_image == pytest.approx(100.0)
    assert result.max_in_flight == 5 and result.error_kinds == {"503 queue_full: retry": 1}
    assert len(result.latencies_ms) == 19 and result.mean_batch == pytest.approx(29 / 19)


def test_a_busy_client_process_is_warned_about(load_test):
    result = load_test.LevelResult("batching on", "explain", "closed", 8, 1, 1)
    result.core_shares = [0.2]
    assert result.warnings() == []
    result.core_shares = [0.2, 0.9]
    (note,) = result.warnings()
    assert "90% of a core" in note and "bottleneck" in note


STAGES_BEFORE = """\
# HELP reciprocam_stage_seconds per-image stage time
# TYPE reciprocam_stage_seconds histogram
reciprocam_stage_seconds_bucket{model="bench",stage="decode",le="+Inf"} 10.0
reciprocam_stage_seconds_count{model="bench",stage="decode"} 10.0
reciprocam_stage_seconds_sum{model="bench",stage="decode"} 0.02
reciprocam_stage_seconds_count{model="other",stage="decode"} 2.0
reciprocam_stage_seconds_sum{model="other",stage="decode"} 0.004
reciprocam_stage_seconds_count{model="bench",stage="compute"} 2.0
reciprocam_stage_seconds_sum{model="bench",stage="compute"} 0.1
# TYPE reciprocam_images_total counter
reciprocam_images_total{model="bench",kind="explain"} 12.0
"""
STAGES_AFTER = """\
# TYPE reciprocam_stage_seconds histogram
reciprocam_stage_seconds_count{model="bench",stage="decode"} 30.0
reciprocam_stage_seconds_sum{model="bench",stage="decode"} 0.06
reciprocam_stage_seconds_count{model="other",stage="decode"} 2.0
reciprocam_stage_seconds_sum{model="other",stage="decode"} 0.004
reciprocam_stage_seconds_count{model="bench",stage="compute"} 3.0
reciprocam_stage_seconds_sum{model="bench",stage="compute"} 0.5
reciprocam_stage_seconds_count{model="bench",stage="encode"} 20.0
reciprocam_stage_seconds_sum{model="bench",stage="encode"} 0.01
# TYPE reciprocam_images_total counter
reciprocam_images_total{model="bench",kind="explain"} 32.0
"""


def test_stage_figures_from_metrics_text(load_test, load_stages):
    metric = load_test.STAGE_METRIC
    before = load_stages.parse_stages(STAGES_BEFORE, metric)
    after = load_stages.parse_stages(STAGES_AFTER, metric)
    assert before.sums == {"decode": pytest.approx(0.024), "compute": pytest.approx(0.1)}  # models summed
    assert before.counts == {"decode": 12.0, "compute": 2.0} and before.images == 12.0
    figures = load_stages.stage_figures(before, after, served_images=999)
    assert figures.images == 20  # the server's counter, not the clients' figure
    assert figures.ms_per_image == {
        "decode": pytest.approx(2.0),  # 40 ms over 20 images
        "compute": pytest.approx(20.0),  # 400 ms of one batch of 20 images
        "encode": pytest.approx(0.5),  # absent before: counted from zero
    }
    assert figures.observations_per_image == {
        "decode": pytest.approx(1.0),
        "compute": pytest.approx(0.05),
        "encode": pytest.approx(1.0),
    }
    table = load_stages.stage_table([("batching on, explain, concurrency 8", figures)])
    assert "| decode | compute | encode | sum of stages |" in table and "| 22.50 |" in table


def test_without_the_stage_family_there_are_no_stage_figures(load_test, load_stages):
    metric = load_test.STAGE_METRIC
    text = '# TYPE reciprocam_images_total counter\nreciprocam_images_total{model="m",kind="explain"} 3.0\n'
    assert load_stages.parse_stages(text, metric) is None
    assert load_stages.stage_figures(None, None, served_images=5) is None
    assert load_stages.stage_table([]) == ""


def test_stages_are_scraped_from_metrics(load_test, load_stages):
    with _Scripted([], metrics=[STAGES_BEFORE, ""]) as server:
        snapshot = load_stages.scrape_stages(server.url, load_test.STAGE_METRIC)
        assert snapshot is not None and snapshot.images == 12.0
        assert load_stages.scrape_stages(server.url, load_test.STAGE_METRIC) is None  # 404


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
