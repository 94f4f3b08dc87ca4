"""A burst of concurrent uploads against small limits: does every client get its HTTP answer, and what
do the refusals cost the server?

The script starts ``python -m app serve`` (one worker) on 127.0.0.1 with one tiny model with random
weights, a small model queue (``--queue``) and a small ``limits.max_concurrent_requests``
(``--concurrent``), then sends ``--clients`` multipart uploads of one JPEG of about ``--jpeg-kb`` KB
at once, each on its own connection (httpx writes a multipart body in pieces after its head, so the
server sees each request before all of its body, as over a slower network). It prints how many clients got which answer (200, 503 or 429 with or
without Retry-After, or a connection error), the server's CPU seconds during the burst (user + system,
its whole process tree) and its resident memory (before, sampled peak during, after). Afterwards the
server must still answer /readyz and a prediction. With ``--url`` it drives a running server (or a
load balancer in front of one) instead, and reports only the answers.

Example:
    python benchmarks/refusal_burst.py --clients 1000 --queue 16 --concurrent 64 --jpeg-kb 55
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import ServerProcess, process_tree_cpu_seconds

MODEL = {
    "name": "tiny",
    "arch": "deit_tiny_patch16_224",
    "weights": "random:0",
    "model_kwargs": {"img_size": 64},
}


def jpeg_of_about(kilobytes: float, seed: int = 0) -> bytes:
    """A noisy JPEG of at least ``kilobytes`` KB (noise keeps JPEG from compressing it away)."""
    rng = np.random.default_rng(seed)
    side = 64
    while True:
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
        if buffer.tell() >= kilobytes * 1000:
            return buffer.getvalue()
        side += 8


@dataclass
class BurstResult:
    """What each client got: ``"200"``, ``"503 overloaded"``, ``"503 queue_full"`` ... (status and
    error code; ``" no Retry-After"`` appended to a 503/429 without one; ``" not JSON"`` to a refusal
    that is not the service's JSON error), or the name of the connection error it got instead."""

    answers: collections.Counter[str] = field(default_factory=collections.Counter)
    seconds: float = 0.0

    @property
    def connection_errors(self) -> int:
        return sum(n for kind, n in self.answers.items() if not kind[:3].isdigit())

    @property
    def answered(self) -> int:
        return sum(n for kind, n in self.answers.items() if kind[:3].isdigit())


def classify(response: httpx.Response) -> str:
    status = response.status_code
    if status == 200:
        return "200"
    kind = str(status)
    try:
        error = response.json()["error"]
        kind += f" {error['code'] if isinstance(error, dict) else 'oip'}"
    except (ValueError, KeyError, TypeError):
        kind += " not JSON"
    if status in (429, 503) and not response.headers.get("retry-after"):
        kind += " no Retry-After"
    return kind


async def burst(
    url: str, clients: int, body: bytes, model: str = "tiny", timeout_s: float = 120
) -> BurstResult:
    """``clients`` uploads of ``body`` at once, each on its own connection."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    result = BurstResult()
    gate = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout_s) as client:

        async def one(index: int) -> None:
            await gate.wait()
            try:
                response = await client.post(
                    f"/v1/models/{model}/predict",
                    files={"file": (f"image-{index}.jpg", body, "image/jpeg")},
                    headers={"x-request-id": f"burst-{index}"},
                )
                result.answers[classify(response)] += 1
            except httpx.TransportError as exc:
                result.answers[type(exc).__name__] += 1

        tasks = [asyncio.ensure_future(one(index)) for index in range(clients)]
        await asyncio.sleep(0)
        started = time.perf_counter()
        gate.set()
        await asyncio.gather(*tasks)
        result.seconds = time.perf_counter() - started
    return result


class MemorySampler:
    """The resident memory of a process tree, sampled every ``interval_s`` in a thread."""

    def __init__(self, pid: int, interval_s: float = 0.01) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        import psutil

        try:
            process = psutil.Process(self.pid)
            return int(
                process.memory_info().rss + sum(c.memory_info().rss for c in process.children(recursive=True))
            )
        except psutil.Error:
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> MemorySampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def still_serving(url: str, body: bytes) -> tuple[int, int]:
    """/readyz and one prediction after the burst: their status codes."""
    with httpx.Client(base_url=url, timeout=60) as client:
        ready = client.get("/readyz").status_code
        predict = client.post(
            "/v1/models/tiny/predict", content=body, headers={"content-type": "image/jpeg"}
        ).status_code
    return ready, predict


def report(result: BurstResult, clients: int, extra: dict[str, Any]) -> dict[str, Any]:
    summary = {
        "clients": clients,
        "answered": result.answered,
        "connection_errors": result.connection_errors,
        "answers": dict(sorted(result.answers.items())),
        "burst_s": round(result.seconds, 2),
        **extra,
    }
    for key, value in summary.items():
        print(f"{key:>22}: {value}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--queue", type=int, default=16, help="batch.max_queue_images")
    parser.add_argument("--concurrent", type=int, default=64, help="limits.max_concurrent_requests")
    parser.add_argument("--jpeg-kb", type=float, default=55.0)
    parser.add_argument(
        "--rounds", type=int, default=1, help="bursts in a row (the figures are the last one's)"
    )
    parser.add_argument("--url", help="drive this running server instead of starting one")
    parser.add_argument(
        "--settings",
        default="{}",
        help='extra server settings as JSON, e.g. {"limits": {"body_timeout_s": 5}}',
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    body = jpeg_of_about(args.jpeg_kb)
    print(
        f"{args.clients} clients x {len(body)} B JPEG; queue {args.queue}, max concurrent {args.concurrent}"
    )

    if args.url:
        for _ in range(args.rounds):
            result = asyncio.run(burst(args.url, args.clients, body))
        ready, predict = still_serving(args.url, body)
        summary = report(result, args.clients, {"readyz_after": ready, "predict_after": predict})
    else:
        settings = json.loads(args.settings)
        limits = {"max_concurrent_requests": args.concurrent, **settings.pop("limits", {})}
        batch = {"max_queue_images": args.queue, "max_wait_ms": 2}
        with tempfile.TemporaryDirectory() as workdir:
            server = ServerProcess(
                MODEL, batch, Path(workdir), "burst", settings={"limits": limits, **settings}
            )
            try:
                server.wait_ready()
                sampler = MemorySampler(server.process.pid)
                for _ in range(args.rounds):
                    rss_before = sampler.rss()
                    cpu_before = process_tree_cpu_seconds(server.process.pid) or 0.0
                    with sampler:
                        result = asyncio.run(burst(server.url, args.clients, body))
                    cpu = (process_tree_cpu_seconds(server.process.pid) or 0.0) - cpu_before
                rss_after = sampler.rss()
                ready, predict = still_serving(server.url, body)
                summary = report(
                    result,
                    args.clients,
                    {
                        "server_cpu_s": round(cpu, 2),
                        "rss_before_mib": round(rss_before / 2**20, 1),
                        "rss_peak_mib": round(sampler.peak / 2**20, 1),
                        "rss_after_mib": round(rss_after / 2**20, 1),
                        "readyz_after": ready,
                        "predict_after": predict,
                    },
                )
            finally:
                server.stop()
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0 if summary["connection_errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
