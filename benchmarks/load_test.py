"""HTTP load test of the service: throughput and latency, batching on vs off, HTTP vs engine-only.

For each server configuration (batching on: the configured batch size and window; batching off:
batches of one image) the script starts ``python -m app serve`` in a subprocess on 127.0.0.1 with
one model, drives it with ``--concurrency`` concurrent httpx clients per level, and prints
requests/s, images/s and p50/p95/p99 latency. It then measures the engine alone
(``ReciproCAM.explain`` on preprocessed batches, in this process, with the server stopped) and prints
the ratio of HTTP throughput to engine-only throughput. ``--variant JSON`` adds a third server,
batching on plus the given settings (for example ``{"reduced_jpeg_decode": false}``), measured in
the same alternation, and prints its ratio to batching on. With ``--url`` it drives a running server
instead (one configuration, no engine-only comparison unless ``--engine`` is given).

Example (CPU, random weights, fp32):
    python benchmarks/load_test.py --arch deit_small_patch16_224 --weights random:0 \
        --endpoint explain --concurrency 1 8 32 --requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class LevelResult:
    config: str
    endpoint: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    batch_images: list[int]
    images_per_request: int
    server_cpu_s: float | None = None  # CPU time of the server's process tree during the level
    client_cpu_s: float = 0.0  # CPU time of this (client) process during the level
    error_kinds: dict[str, int] = field(default_factory=dict)  # status code and body, or exception
    workers_lost: int = 0  # server worker processes that ended during the level (killed, crashed)

    @property
    def served_requests(self) -> int:
        return self.requests - self.errors

    @property
    def served_images(self) -> int:
        return self.served_requests * self.images_per_request

    @property
    def server_cpu_ms_per_image(self) -> float:
        if self.server_cpu_s is None or not self.served_images:
            return float("nan")
        return 1000 * self.server_cpu_s / self.served_images

    @property
    def client_cpu_ms_per_request(self) -> float:
        served = self.served_requests
        return 1000 * self.client_cpu_s / served if served else float("nan")

    @property
    def requests_per_s(self) -> float:
        return self.served_requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        return self.requests_per_s * self.images_per_request

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    @property
    def mean_batch(self) -> float:
        return statistics.fmean(self.batch_images) if self.batch_images else float("nan")


def test_images(count: int, size: int, seed: int = 0) -> list[bytes]:
    """Distinct, smooth (so JPEG-compressible) photographs-like images."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def process_tree_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process and its live descendants (uvicorn workers), read from
    /proc; None where /proc is not available (not Linux) or the process is gone."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total, pending, seen = 0.0, [pid], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
            # fields after the parenthesised command name; utime and stime are fields 14 and 15
            fields = stat[stat.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, ValueError, IndexError):
            if current == pid:
                return None
            continue  # a descendant that ended meanwhile
        pending.extend(child_pids(current) or ())
    return total


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


def error_kind(response: httpx.Response) -> str:
    """A failed response's kind: its status with the service's error code and message (the body
    without its per-request id), or the start of a body that is not the service's JSON error."""
    try:
        error = response.json()["error"]
        return f"{response.status_code} {error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} {response.text[:120]}"


async def run_level(
    url: str,
    model: str,
    endpoint: str,
    concurrency: int,
    total_requests: int,
    images: list[bytes],
    images_per_request: int,
    options: dict[str, str],
    config: str,
    api_key: str | None,
    server_pid: int | None = None,
) -> LevelResult:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    batch_images: list[int] = []
    errors = 0
    error_kinds: collections.Counter[str] = collections.Counter()  # status code or exception
    counter = iter(range(total_requests))

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, headers=headers) as client:

        async def one(index: int) -> None:
            nonlocal errors
            files = [
                ("files", (f"{index}_{k}.jpg", images[(index + k) % len(images)], "image/jpeg"))
                for k in range(images_per_request)
            ]
            started = time.perf_counter()
            try:
                response = await client.post(f"/v1/models/{model}/{endpoint}", files=files, data=options)
            except httpx.TransportError as exc:  # connection dropped or refused: count it, go on
                errors += 1
                error_kinds[type(exc).__name__] += 1
                return
            elapsed = (time.perf_counter() - started) * 1000
            if response.status_code != 200:
                errors += 1
                error_kinds[error_kind(response)] += 1
                return
            body = response.json()
            latencies.append(elapsed)
            batch_images.append(int(body["timing"]["batch_images"]))

        async def worker() -> None:
            for index in counter:
                await one(index)

        # one warm-up round at this concurrency, not measured
        await asyncio.gather(*(one(i) for i in range(min(concurrency, 4))))
        latencies.clear()
        batch_images.clear()
        errors = 0
        error_kinds.clear()
        server_cpu_before = process_tree_cpu_seconds(server_pid) if server_pid else None
        workers_before = child_pids(server_pid) if server_pid else None
        client_cpu_before = time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        client_cpu_s = time.process_time() - client_cpu_before
        server_cpu_after = process_tree_cpu_seconds(server_pid) if server_pid else None
        workers_after = child_pids(server_pid) if server_pid else None
    server_cpu_s = None
    if server_cpu_before is not None and server_cpu_after is not None:
        server_cpu_s = server_cpu_after - server_cpu_before
    return LevelResult(
        config,
        endpoint,
        concurrency,
        total_requests,
        errors,
        seconds,
        latencies,
        batch_images,
        images_per_request,
        server_cpu_s,
        client_cpu_s,
        dict(error_kinds),
        len(workers_before - workers_after)
        if workers_before is not None and workers_after is not None
        else 0,
    )


def engine_only(
    arch: str | None,
    weights: str,
    model_kwargs: dict[str, Any],
    dtype: str,
    device: str,
    batch_size: int,
    total_images: int,
    images: list[bytes],
    explain: bool,
) -> tuple[float, float]:
    """Images/s of ReciproCAM.explain alone, on preprocessed batches (decoding excluded), and the CPU
    milliseconds this process spent per image (all its threads)."""
    import torch

    from app.engine.models import load_model
    from app.engine.options import CamOptions
    from app.serving.images import decode_image

    loaded = load_model(
        arch, weights, device=device, dtype=dtype, model_kwargs=model_kwargs or None, warmup=True
    )
    preprocessor = loaded.preprocessor
    tensors = [preprocessor(decode_image(data))[0] for data in images]
    total_images = max(total_images, 3 * batch_size)
    batches = []
    for start in range(0, total_images, batch_size):
        count = min(batch_size, total_images - start)
        batches.append(torch.stack([tensors[(start + k) % len(tensors)] for k in range(count)]))
    options = CamOptions() if explain else None
    loaded.engine.explain(batches[0], options, top_k=1)  # warm-up at the measured batch size
    started, cpu_started = time.perf_counter(), time.process_time()
    for batch in batches:
        loaded.engine.explain(batch, options, top_k=1)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    cpu_ms = 1000 * (time.process_time() - cpu_started) / total_images
    return total_images / (time.perf_counter() - started), cpu_ms


def _ms(value: float) -> str:
    return "–" if value != value else f"{value:.1f}"


def print_table(results: list[LevelResult]) -> str:
    lines = [
        "| configuration | endpoint | concurrency | requests | errors | req/s | images/s | p50 ms | p95 ms | p99 ms "
        "| mean batch | server CPU ms/image | client CPU ms/request |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.config} | {r.endpoint} | {r.concurrency} | {r.requests} | {r.errors} | {r.requests_per_s:.2f} | "
            f"{r.images_per_s:.2f} | {r.percentile(50):.0f} | {r.percentile(95):.0f} | {r.percentile(99):.0f} | "
            f"{r.mean_batch:.1f} | {_ms(r.server_cpu_ms_per_image)} | {_ms(r.client_cpu_ms_per_request)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="deit_small_patch16_224")
    parser.add_argument("--weights", default="random:0")
    parser.add_argument("--model-kwargs", default="{}", help="JSON kwargs for timm.create_model")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--endpoint", nargs="+", default=["explain"], choices=["explain", "predict"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument(
        "--requests", type=int, default=64, help="measured requests per level (at least 2x concurrency)"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternate the configurations this many times per level"
    )
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=320, help="side of the posted JPEGs")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--encodings", default="heatmap")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    parser.add_argument("--url", default=None, help="drive a running server instead of starting one")
    parser.add_argument("--model-name", default="bench", help="model name on a server given by --url")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--no-engine", action="store_true", help="skip the engine-only comparison")
    parser.add_argument(
        "--variant",
        default=None,
        help="JSON settings for a third server, 'variant': batching on plus these settings "
        "(e.g. '{\"reduced_jpeg_decode\": false}'); the report gives variant / batching on",
    )
    parser.add_argument("--engine", action="store_true", help="with --url: also measure the engine alone")
    parser.add_argument("--out", type=Path, default=None, help="also write the report (markdown) here")
    args = parser.parse_args(argv)

    model_kwargs = json.loads(args.model_kwargs)
    images = test_images(16, args.image_size)
    options = {"encodings": args.encodings} if "explain" in args.endpoint else {}
    results: list[LevelResult] = []

    def measure(servers: dict[str, tuple[str, int | None]], model: str) -> None:
        """Every level on every server; with several rounds the servers alternate within a level,
        so that drifting load from elsewhere on the machine affects each configuration alike."""
        for endpoint in args.endpoint:
            for concurrency in args.concurrency:
                total = max(args.requests, 2 * concurrency)
                per_round = max(concurrency, total // args.rounds)
                merged: dict[str, LevelResult] = {}
                for round_index in range(args.rounds):
                    order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
                    for config in order:
                        result = asyncio.run(
                            run_level(
                                servers[config][0],
                                model,
                                endpoint,
                                concurrency,
                                per_round,
                                images,
                                args.images_per_request,
                                options if endpoint == "explain" else {},
                                config,
                                args.api_key,
                                servers[config][1],
                            )
                        )
                        if config in merged:
                            previous = merged[config]
                            previous.requests += result.requests
                            previous.errors += result.errors
                            previous.seconds += result.seconds
                            previous.latencies_ms += result.latencies_ms
                            previous.batch_images += result.batch_images
                            previous.client_cpu_s += result.client_cpu_s
                            for kind, count in result.error_kinds.items():
                                previous.error_kinds[kind] = previous.error_kinds.get(kind, 0) + count
                            previous.workers_lost += result.workers_lost
                            if previous.server_cpu_s is not None and result.server_cpu_s is not None:
                                previous.server_cpu_s += result.server_cpu_s
                            else:
                                previous.server_cpu_s = None
                        else:
                            merged[config] = result
                for config, result in merged.items():
                    results.append(result)
                    print(
                        f"{config:>13} {endpoint:>7} c={concurrency:<3} {result.requests_per_s:7.2f} req/s "
                        f"p50 {result.percentile(50):7.0f} ms p99 {result.percentile(99):7.0f} ms "
                        f"batch {result.mean_batch:.1f} errors {result.errors}",
                        flush=True,
                    )
                    for kind, count in result.error_kinds.items():
                        print(f"{'':>13} error x{count}: {kind}", flush=True)
                    if result.workers_lost:
                        print(f"{'':>13} {result.workers_lost} server worker process(es) ended", flush=True)

    if args.url:
        measure({"given server": (args.url, None)}, args.model_name)
    else:
        model = {
            "name": "bench",
            "arch": args.arch,
            "weights": args.weights,
            "dtype": args.dtype,
            "device": args.device,
            "model_kwargs": model_kwargs,
        }
        batching_on = {"max_batch_images": args.max_batch, "max_wait_ms": args.max_wait_ms}
        configurations: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
            "batching on": (batching_on, None),
            "batching off": ({"max_batch_images": 1, "max_wait_ms": 0}, None),
        }
        if args.variant:
            configurations["variant"] = (batching_on, json.loads(args.variant))
        with tempfile.TemporaryDirectory() as workdir:
            servers = {
                config: ServerProcess(
                    model,
                    {**batch, "max_queue_images": 4096},
                    Path(workdir),
                    config.replace(" ", "_"),
                    args.workers,
                    settings,
                )
                for config, (batch, settings) in configurations.items()
            }
            try:
                for server in servers.values():
                    server.wait_ready()
                measure(
                    {config: (server.url, server.process.pid) for config, server in servers.items()}, "bench"
                )
            finally:
                for server in servers.values():
                    server.stop()
                if any(result.errors for result in results):
                    for config, server in servers.items():  # the servers' own account of the errors
                        tail = server.log_path.read_text(errors="replace").splitlines()[-30:]
                        print(f"--- last lines of the {config!r} server's log", *tail, sep="\n")

    engine_rate: dict[str, float] = {}
    engine_cpu_ms: dict[str, float] = {}
    if not args.no_engine and (not args.url or args.engine):
        total = max(args.requests, 2 * max(args.concurrency)) * args.images_per_request
        for endpoint in args.endpoint:
            engine_rate[endpoint], engine_cpu_ms[endpoint] = engine_only(
                args.arch,
                args.weights,
                model_kwargs,
                args.dtype,
                args.device,
                args.max_batch,
                total,
                images,
                explain=endpoint == "explain",
            )
            print(
                f"engine only {endpoint}: {engine_rate[endpoint]:.2f} images/s (batch {args.max_batch}), "
                f"CPU {engine_cpu_ms[endpoint]:.1f} ms/image",
                flush=True,
            )

    report = [
        f"Command: `python benchmarks/load_test.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        f"Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; machine: {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {platform.platform()}; Python {platform.python_version()}",
        f"Model: {args.arch} ({args.weights}, {args.dtype}, kwargs {model_kwargs}); "
        f"{args.images_per_request} image(s) of {args.image_size}x{args.image_size} JPEG per request; "
        f"explain encodings: {args.encodings}; {args.rounds} alternating round(s) per level",
        "",
        print_table(results),
        "",
    ]
    by_key = {(r.config, r.endpoint, r.concurrency): r for r in results}
    top = max(args.concurrency)
    for endpoint in args.endpoint:
        on, off = by_key.get(("batching on", endpoint, top)), by_key.get(("batching off", endpoint, top))
        if on and off and off.images_per_s > 0:
            report.append(
                f"- {endpoint}, concurrency {top}: batching on / off = "
                f"{on.images_per_s:.2f} / {off.images_per_s:.2f} images/s = **{on.images_per_s / off.images_per_s:.2f}x**"
            )
        variant = by_key.get(("variant", endpoint, top))
        if on and variant and on.images_per_s > 0:
            report.append(
                f"- {endpoint}, concurrency {top}: variant ({args.variant}) / batching on = "
                f"{variant.images_per_s:.2f} / {on.images_per_s:.2f} images/s = "
                f"**{variant.images_per_s / on.images_per_s:.2f}x**; server CPU per image "
                f"{_ms(variant.server_cpu_ms_per_image)} / {_ms(on.server_cpu_ms_per_image)} ms"
            )
        best = on or by_key.get(("given server", endpoint, top))
        if best and endpoint in engine_rate:
            report.append(
                f"- {endpoint}: HTTP (concurrency {top}) / engine only (batch {args.max_batch}) = "
                f"{best.images_per_s:.2f} / {engine_rate[endpoint]:.2f} images/s = "
                f"**{best.images_per_s / engine_rate[endpoint]:.2f}x**"
            )
            served_ms = best.server_cpu_ms_per_image
            if served_ms == served_ms:  # measured (not NaN)
                report.append(
                    f"- {endpoint}: CPU per image, server (concurrency {top}) / engine only = "
                    f"{served_ms:.1f} / {engine_cpu_ms[endpoint]:.1f} ms: "
                    f"{served_ms - engine_cpu_ms[endpoint]:.1f} ms per image outside the model"
                )
    for r in results:
        if r.workers_lost:
            report.append(
                f"- {r.config}, {r.endpoint}, concurrency {r.concurrency}: {r.workers_lost} server worker "
                "process(es) ended during the level (killed or crashed; their connections were lost)"
            )
    text = "\n".join(report)
    print()
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
