"""HTTP load test of the service: throughput and latency, batching on vs off, HTTP vs engine-only.

For each server configuration (batching on: the configured batch size and window; batching off:
batches of one image) the script starts ``python -m app serve`` in a subprocess on 127.0.0.1 with
one model and drives it from ``--client-processes`` client processes (each its own asyncio loop and
httpx client, see ``loadgen.py``), level by level:

* ``--concurrency C ...``: closed loop, C requests in flight in all (split over the processes);
* ``--rate R ...``: open loop, R requests/s in all (``--arrivals poisson`` or ``uniform``) whatever
  the answers, at most ``--max-in-flight`` in flight.

Each level reports requests/s, images/s, p50/p90/p95/p99 latency, errors by status and code, the
server's CPU per image (its process tree, from /proc), the clients' own CPU (user + system of every
client process, per request and as a share of a core: a client process near a full core is itself
the limit, and the script then warns), and, when the server's /metrics has the ``STAGE_METRIC``
histogram family, milliseconds per image in each stage. Between rounds of the top level the engine
alone (``ReciproCAM.explain`` on preprocessed batches, in this process, servers idle) is measured,
and the ratio of HTTP to engine-only images/s is given from the medians over rounds.
``--payload tensor`` posts ready FP32 ``pixel_values`` to ``/v2`` (binary) instead of JPEGs to
``/v1``. ``--variant JSON`` adds a third server, batching on plus the given settings, measured in
the same alternation. With ``--url`` it drives a running server instead.

Example (CPU, random weights, fp32):
    python benchmarks/load_test.py --arch deit_small_patch16_224 --weights random:0 \
        --model-kwargs '{"img_size": 112}' --endpoint explain --concurrency 8 64 \
        --client-processes 2 --rate 20 40 --requests 128
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.serving.threads import COMPUTE_THREAD_NAME  # noqa: E402
from benchmarks.load_engine import EngineOnly  # noqa: E402
from benchmarks.load_report import print_level, ratio_lines, report_tables  # noqa: E402
from benchmarks.load_servers import (  # noqa: E402
    ServerProcess,
    child_pids,
    named_threads_cpu_seconds,
    process_tree_cpu_seconds,
)
from benchmarks.load_stages import StageFigures, scrape_stages, stage_figures  # noqa: E402
from benchmarks.loadgen import (  # noqa: E402
    ClientPool,
    ClientResult,
    RequestTemplate,
    level_specs,
    pixel_values,
    v1_template,
    v2_tensor_template,
)

# the server's histogram of per-image stage times, one label "stage"
STAGE_METRIC = "reciprocam_stage_seconds"
# a client process above this share of one core is close to being the bottleneck itself
CLIENT_CORE_WARNING = 0.7
# an open-loop process this late (p99) on its schedule did not keep up with the rate
SEND_LAG_WARNING_MS = 20.0


@dataclass
class LevelResult:
    config: str
    endpoint: str
    mode: str  # "closed" (level: concurrency) or "open" (level: requests/s)
    level: float
    processes: int
    images_per_request: int
    requests: int = 0  # sent
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    batch_images: list[int] = field(default_factory=list)
    server_cpu_s: float | None = 0.0  # CPU time of the server's process tree; None: not measured
    compute_cpu_s: float | None = 0.0  # of which its compute threads' (the model); None: not measured
    client_cpu_s: float = 0.0  # user + system CPU of all client processes
    error_kinds: dict[str, int] = field(default_factory=dict)  # status and code, or exception
    workers_lost: int = 0  # server worker processes that ended during the level (killed, crashed)
    send_lags_ms: list[float] = field(default_factory=list)
    max_in_flight: int = 0  # the sum of the processes' peaks
    core_shares: list[float] = field(default_factory=list)  # each client process's CPU s per second
    round_images_per_s: list[float] = field(default_factory=list)
    round_sent_per_s: list[float] = field(default_factory=list)  # the processes' send rates, summed
    stages: list[StageFigures] = field(default_factory=list)

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
    def compute_cpu_ms_per_image(self) -> float:
        if self.compute_cpu_s is None or not self.served_images:
            return float("nan")
        return 1000 * self.compute_cpu_s / self.served_images

    @property
    def client_cpu_ms_per_request(self) -> float:
        return 1000 * self.client_cpu_s / self.requests if self.requests else float("nan")

    @property
    def client_core_share(self) -> float:
        """The busiest client process's CPU seconds per second (1.0: a full core)."""
        return max(self.core_shares, default=0.0)

    @property
    def requests_per_s(self) -> float:
        return self.served_requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        return self.requests_per_s * self.images_per_request

    @property
    def median_images_per_s(self) -> float:
        return statistics.median(self.round_images_per_s) if self.round_images_per_s else float("nan")

    @property
    def sent_per_s(self) -> float:
        """The median over rounds of the send rate: each process's requests over its time from start
        to last send, summed over the processes (one process's late last arrival, likely with
        Poisson arrivals, would understate the others' rates)."""
        return statistics.median(self.round_sent_per_s) if self.round_sent_per_s else float("nan")

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def send_lag_percentile(self, q: float) -> float:
        return float(np.percentile(self.send_lags_ms, q)) if self.send_lags_ms else float("nan")

    @property
    def mean_batch(self) -> float:
        return statistics.fmean(self.batch_images) if self.batch_images else float("nan")

    def add_round(
        self,
        clients: list[ClientResult],
        server_cpu_s: float | None,
        workers_lost: int,
        compute_cpu_s: float | None = None,
    ) -> None:
        """One round's client results (one per process) and server figures, added to the totals."""
        active = [client for client in clients if client.sent]
        started = min((c.started for c in active), default=0.0)
        seconds = max((c.finished for c in active), default=0.0) - started
        self.seconds += seconds
        self.round_sent_per_s.append(
            sum(c.sent / (c.last_send - c.started) for c in active if c.last_send > c.started)
        )
        served = 0
        for client in clients:
            self.requests += client.sent
            self.errors += client.errors
            served += client.sent - client.errors
            self.latencies_ms += client.latencies_ms
            self.batch_images += client.batch_images
            self.client_cpu_s += client.cpu_s
            self.send_lags_ms += client.send_lags_ms
            for kind, count in client.error_kinds.items():
                self.error_kinds[kind] = self.error_kinds.get(kind, 0) + count
        self.max_in_flight = max(self.max_in_flight, sum(c.max_in_flight for c in clients))
        self.core_shares += [client.core_share for client in active]
        self.round_images_per_s.append(served * self.images_per_request / seconds if seconds > 0 else 0.0)
        if self.server_cpu_s is not None and server_cpu_s is not None:
            self.server_cpu_s += server_cpu_s
        else:
            self.server_cpu_s = None
        if self.compute_cpu_s is not None and compute_cpu_s is not None:
            self.compute_cpu_s += compute_cpu_s
        else:
            self.compute_cpu_s = None
        self.workers_lost += workers_lost

    def warnings(self) -> list[str]:
        """Loud notes when the load generator, not the server, may have set the pace."""
        notes = []
        if self.client_core_share >= CLIENT_CORE_WARNING:
            notes.append(
                f"WARNING: a client process used {100 * self.client_core_share:.0f}% of a core: the load "
                "generator may be the bottleneck; add --client-processes"
            )
        if self.mode == "open" and self.send_lag_percentile(99) > SEND_LAG_WARNING_MS:
            notes.append(
                f"WARNING: the clients sent late (p99 {self.send_lag_percentile(99):.0f} ms behind schedule), so "
                "the offered rate was not fully met: busy client processes (add --client-processes) or a "
                "machine short of CPU"
            )
        return notes


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


def request_template(
    args: argparse.Namespace, endpoint: str, url: str, model: str, images: list[bytes]
) -> RequestTemplate:
    if args.payload == "jpeg":
        fields = {"encodings": args.encodings} if endpoint == "explain" else {}
        return v1_template(model, endpoint, images, args.images_per_request, fields, args.api_key)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    described = httpx.get(f"{url}/v1/models/{model}", headers=headers, timeout=30).raise_for_status().json()
    tensors = pixel_values(images, described["data_config"])
    return v2_tensor_template(model, endpoint, tensors, args.images_per_request, args.api_key)


def run_round(
    pool: ClientPool,
    args: argparse.Namespace,
    result: LevelResult,
    url: str,
    pid: int | None,
    template: RequestTemplate,
    requests: int,
    seed: int,
) -> None:
    """One round of one level on one server, added to ``result``."""
    rate = result.level if result.mode == "open" else None
    concurrency = args.max_in_flight if rate is not None else int(result.level)
    specs = level_specs(url, template, pool.processes, requests, concurrency, rate, args.arrivals, seed)
    before: dict[str, Any] = {}

    def at_start() -> None:  # /metrics first, so that the scrape's own CPU is not counted
        before["stages"] = scrape_stages(url, STAGE_METRIC, args.api_key)
        before["cpu"] = process_tree_cpu_seconds(pid) if pid else None
        before["compute"] = named_threads_cpu_seconds(pid, COMPUTE_THREAD_NAME) if pid else None
        before["workers"] = child_pids(pid) if pid else None

    clients = pool.run(specs, at_start)
    cpu_after = process_tree_cpu_seconds(pid) if pid else None
    compute_after = named_threads_cpu_seconds(pid, COMPUTE_THREAD_NAME) if pid else None
    workers_after = child_pids(pid) if pid else None
    stages_after = scrape_stages(url, STAGE_METRIC, args.api_key)
    cpu = cpu_after - before["cpu"] if cpu_after is not None and before["cpu"] is not None else None
    lost = len(before["workers"] - workers_after) if before["workers"] and workers_after is not None else 0
    served = sum(client.sent - client.errors for client in clients) * args.images_per_request
    figures = stage_figures(before["stages"], stages_after, served)
    if figures is not None:
        result.stages.append(figures)
    compute = (
        compute_after - before["compute"]
        if compute_after is not None and before["compute"] is not None
        else None
    )
    result.add_round(clients, cpu, lost, compute)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="deit_small_patch16_224")
    parser.add_argument("--weights", default="random:0")
    parser.add_argument("--model-kwargs", default="{}", help="JSON kwargs for timm.create_model")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--endpoint", nargs="+", default=["explain"], choices=["explain", "predict"])
    parser.add_argument(
        "--concurrency",
        nargs="*",
        type=int,
        default=None,
        help="closed-loop levels (default 1 8 32 without --rate)",
    )
    parser.add_argument(
        "--rate", nargs="*", type=float, default=[], help="open-loop levels, requests/s in all"
    )
    parser.add_argument("--arrivals", choices=["poisson", "uniform"], default="poisson")
    parser.add_argument(
        "--max-in-flight", type=int, default=1024, help="open loop: cap on requests in flight"
    )
    parser.add_argument("--client-processes", type=int, default=1, help="load-generator processes")
    parser.add_argument(
        "--requests",
        type=int,
        default=64,
        help="measured requests per level (closed loop: at least 2x concurrency)",
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternate the configurations this many times per level"
    )
    parser.add_argument(
        "--payload", choices=["jpeg", "tensor"], default="jpeg", help="tensor: FP32 pixel_values to /v2"
    )
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=320, help="side of the posted JPEGs")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--encodings", default="heatmap")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    parser.add_argument("--no-batching-off", action="store_true", help="skip the batching-off server")
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
    parser.add_argument(
        "--variant-serve",
        default="",
        help="serve options of the variant server, after the common ones (e.g. '--workers 2'); "
        "with it, --variant may be '{}'",
    )
    parser.add_argument("--engine", action="store_true", help="with --url: also measure the engine alone")
    parser.add_argument(
        "--engine-threads",
        type=int,
        default=None,
        help="torch threads of the engine-only run, shared out among its streams (default: torch's)",
    )
    parser.add_argument(
        "--engine-streams",
        type=int,
        default=None,
        help="batches the engine-only run computes at once (default: the server's default, "
        "batch.compute_streams)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the report (markdown) here")
    args = parser.parse_args(argv)
    if args.concurrency is None:
        args.concurrency = [] if args.rate else [1, 8, 32]
    if not args.concurrency and not args.rate:
        parser.error("give --concurrency or --rate levels")
    return args


def measure(
    args: argparse.Namespace,
    servers: dict[str, tuple[str, int | None]],
    model: str,
    images: list[bytes],
    engine: EngineOnly | None,
) -> list[LevelResult]:
    """Every level on every server; the servers alternate within a level, round by round, so that
    drifting load from elsewhere on the machine affects each configuration alike. The engine alone
    is measured after each round of the top closed-loop level."""
    results: list[LevelResult] = []
    levels = [("closed", float(c)) for c in args.concurrency] + [("open", r) for r in args.rate]
    first_url = next(iter(servers.values()))[0]
    # the engine alone runs beside the top closed-loop level (or the last open-loop one)
    engine_level = max((k for k, (mode, _) in enumerate(levels) if mode == "closed"), default=len(levels) - 1)
    with ClientPool(args.client_processes) as pool:
        for endpoint in args.endpoint:
            template = request_template(args, endpoint, first_url, model, images)
            for index, (mode, level) in enumerate(levels):
                total = max(args.requests, 2 * int(level)) if mode == "closed" else args.requests
                per_round = max(int(level) if mode == "closed" else 1, total // args.rounds)
                merged = {
                    config: LevelResult(
                        config, endpoint, mode, level, args.client_processes, args.images_per_request
                    )
                    for config in servers
                }
                for round_index in range(args.rounds):
                    order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
                    for config in order:
                        url, pid = servers[config]
                        seed = 1000 * round_index + index
                        run_round(pool, args, merged[config], url, pid, template, per_round, seed)
                    if engine is not None and index == engine_level:
                        engine.measure(endpoint, per_round * args.images_per_request)
                for result in merged.values():
                    results.append(result)
                    print_level(result)
            if engine is not None:
                print(
                    f"engine only {endpoint}: {statistics.median(engine.rates[endpoint]):.2f} images/s "
                    f"({engine.described}, median of {len(engine.rates[endpoint])}), CPU "
                    f"{statistics.median(engine.cpu_ms[endpoint]):.1f} ms/image",
                    flush=True,
                )
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_kwargs = json.loads(args.model_kwargs)
    images = test_images(16, args.image_size)
    want_engine = not args.no_engine and (not args.url or args.engine)
    engine = EngineOnly(args, model_kwargs, images) if want_engine else None
    if args.url:
        results = measure(args, {"given server": (args.url, None)}, args.model_name, images, engine)
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
            "batching on": (batching_on, None)
        }
        if not args.no_batching_off:
            configurations["batching off"] = ({"max_batch_images": 1, "max_wait_ms": 0}, None)
        if args.variant or args.variant_serve:
            configurations["variant"] = (batching_on, json.loads(args.variant or "{}"))
        results = []
        with tempfile.TemporaryDirectory() as workdir:
            servers = {
                config: ServerProcess(
                    model,
                    {**batch, "max_queue_images": 4096},
                    Path(workdir),
                    config.replace(" ", "_"),
                    args.workers,
                    settings,
                    tuple(shlex.split(args.variant_serve)) if config == "variant" else (),
                )
                for config, (batch, settings) in configurations.items()
            }
            try:
                for server in servers.values():
                    server.wait_ready()
                running: dict[str, tuple[str, int | None]] = {
                    config: (server.url, server.process.pid) for config, server in servers.items()
                }
                results = measure(args, running, "bench", images, engine)
            finally:
                for server in servers.values():
                    server.stop()
                if any(result.errors for result in results):
                    for config, server in servers.items():  # the servers' own account of the errors
                        tail = server.log_path.read_text(errors="replace").splitlines()[-30:]
                        print(f"--- last lines of the {config!r} server's log", *tail, sep="\n")

    report = [
        f"Command: `python benchmarks/load_test.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        f"Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; machine: {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {platform.platform()}; Python {platform.python_version()}",
        f"Model: {args.arch} ({args.weights}, {args.dtype}, kwargs {model_kwargs}); "
        f"{args.images_per_request} image(s) per request, payload {args.payload} "
        f"({args.image_size}x{args.image_size} JPEG source); explain encodings: {args.encodings}; "
        f"{args.rounds} alternating round(s) per level; {args.client_processes} client process(es)",
        "",
        *report_tables(results, args.arrivals),
        *ratio_lines(results, engine, args),
    ]
    text = "\n".join(report)
    print()
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
