"""Soak run: a steady stream of requests, bounded in count and time, reporting throughput over time
and the resident memory of the server process.

    python benchmarks/soak.py --requests 10000 --max-seconds 600 --concurrency 8
    python benchmarks/soak.py --url http://127.0.0.1:8000 --model deit_small --pid 1234

Without ``--url`` it starts ``python -m app serve`` itself on a free port of 127.0.0.1, with one model
(``--arch``/``--weights``/``--model-kwargs``; by default a randomly initialised DeiT-Tiny at 96x96
input, enough for CPU). With ``--url``, pass ``--pid`` to follow the server's memory.

Every ``--window`` seconds one line: requests completed, throughput, statuses, latency percentiles
and the server's RSS. At the end: totals, and RSS growth from the end of the first window (allocator
and pools warmed up) to the end of the run. ``--json-out`` writes everything as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Window:
    start_s: float
    end_s: float = 0.0
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies_ms: list[float] = field(default_factory=list)
    rss_mib: float | None = None

    def summary(self) -> dict[str, Any]:
        count = sum(self.statuses.values())
        duration = max(1e-9, self.end_s - self.start_s)
        latencies = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {
            "t_start_s": round(self.start_s, 1),
            "t_end_s": round(self.end_s, 1),
            "requests": count,
            "throughput_rps": round(count / duration, 2),
            "statuses": dict(sorted(self.statuses.items())),
            "p50_ms": round(float(np.percentile(latencies, 50)), 1),
            "p99_ms": round(float(np.percentile(latencies, 99)), 1),
            "rss_mib": None if self.rss_mib is None else round(self.rss_mib, 1),
        }


def make_images(count: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        width, height = (int(v) for v in rng.integers(64, 400, size=2))
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG")
        images.append(buffer.getvalue())
    return images


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        import psutil

        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except Exception:
        return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    model: dict[str, Any] = {"name": args.model, "weights": args.weights, "device": "cpu"}
    if args.arch:
        model["arch"] = args.arch
    if args.model_kwargs:
        model["model_kwargs"] = json.loads(args.model_kwargs)
    env = {key: value for key, value in os.environ.items() if not key.startswith("RECIPROCAM_")}
    env.update(
        RECIPROCAM_MODELS=json.dumps([model]),
        RECIPROCAM_LOG_LEVEL="warning",
        RECIPROCAM_BATCH__MAX_BATCH_IMAGES=str(args.max_batch_images),
    )
    log = open(args.server_log, "wb") if args.server_log else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return process, f"http://127.0.0.1:{port}"


def wait_ready(url: str, process: subprocess.Popen[bytes] | None, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} was not ready within {timeout_s} s")


async def soak(args: argparse.Namespace, url: str, pid: int | None) -> dict[str, Any]:
    images = make_images(16, seed=args.seed)
    windows: list[Window] = []
    started = time.monotonic()
    current = Window(0.0)
    issued = 0
    stop_at = started + args.max_seconds
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    def rotate(now: float) -> None:
        nonlocal current
        current.end_s = now - started
        current.rss_mib = rss_mib(pid)
        windows.append(current)
        print(json.dumps(current.summary()), flush=True)
        current = Window(now - started)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < args.requests and time.monotonic() < stop_at:
            index = issued
            issued += 1
            explain = args.endpoint == "explain" or (args.endpoint == "mix" and index % 2 == 1)
            kind = "explain" if explain else "predict"
            params = {"top_k": "2"}
            if explain:
                params.update(encodings="heatmap", map_size="input")
            began = time.monotonic()
            try:
                response = await client.post(
                    f"/v1/models/{args.model}/{kind}",
                    content=images[index % len(images)],
                    params=params,
                    headers={"content-type": "image/jpeg", **headers},
                )
                status = str(response.status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            now = time.monotonic()
            current.statuses[status] += 1
            current.latencies_ms.append((now - began) * 1000.0)

    async def ticker() -> None:
        while True:
            await asyncio.sleep(args.window)
            rotate(time.monotonic())

    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        tick = asyncio.ensure_future(ticker())
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))
        tick.cancel()
    rotate(time.monotonic())
    summaries = [window.summary() for window in windows]
    total: collections.Counter[str] = collections.Counter()
    for window in windows:
        total.update(window.statuses)
    elapsed = time.monotonic() - started
    rss_values = [w["rss_mib"] for w in summaries if w["rss_mib"] is not None]
    result: dict[str, Any] = {
        "url": url,
        "endpoint": args.endpoint,
        "concurrency": args.concurrency,
        "requests": sum(total.values()),
        "seconds": round(elapsed, 1),
        "throughput_rps": round(sum(total.values()) / elapsed, 2),
        "statuses": dict(sorted(total.items())),
        "windows": summaries,
    }
    if len(rss_values) >= 2:
        first, last = rss_values[0], rss_values[-1]
        result.update(
            rss_first_window_mib=first,
            rss_end_mib=last,
            rss_max_mib=max(rss_values),
            rss_growth_pct=round((last - first) / first * 100.0, 2),
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=None, help="a running server (default: start one)")
    parser.add_argument("--pid", type=int, default=None, help="with --url: the server process to follow")
    parser.add_argument("--model", default="soak", help="model name in the URL")
    parser.add_argument("--arch", default="deit_tiny_patch16_224")
    parser.add_argument("--weights", default="random:0")
    parser.add_argument("--model-kwargs", default='{"img_size": 96}', help="JSON (started server only)")
    parser.add_argument("--max-batch-images", type=int, default=16)
    parser.add_argument("--endpoint", choices=["predict", "explain", "mix"], default="mix")
    parser.add_argument("--requests", type=int, default=10_000, help="stop after this many requests")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop after this long")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--window", type=float, default=10.0, help="seconds per report line")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--server-log", type=Path, default=None, help="started server's output")
    args = parser.parse_args(argv)

    process: subprocess.Popen[bytes] | None = None
    url, pid = args.url, args.pid
    if url is None:
        process, url = start_server(args)
        pid = process.pid
    try:
        wait_ready(url, process)
        result = asyncio.run(soak(args, url, pid))
    finally:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                result_code = process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                result_code = process.wait(10)
            print(f"server exited with {result_code} after SIGTERM", file=sys.stderr)
    print(json.dumps({key: value for key, value in result.items() if key != "windows"}, indent=2))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2))
    failures = sum(n for status, n in result["statuses"].items() if status != "200")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
