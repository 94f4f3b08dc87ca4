"""The host's own CPU per request: the service with its model's compute replaced by canned results.

The app is built in this process (one model, random weights) and called through ASGI, with
``--concurrency`` requests in flight (no sockets and no HTTP parsing: uvicorn's share is not in the
figure). After one real batch, the model's compute answers every batch at once, each image with
that batch's first result (the same tensors: rendering only reads them), so what the process spends
is the host's work around the model: routing, parsing, decoding and preprocessing, queueing,
rendering and the answer. The machine's noise moves the model's compute by far more than this work
costs, which is why it is measured apart.

Each configuration (the defaults, then each ``--variant``, settings as JSON) is measured in turn,
round after round; the script prints, per configuration, the median over rounds of the process's
CPU milliseconds per request and the event loop thread's, the stage histogram's milliseconds per
image, and each variant's CPU as a ratio of the defaults'.

Example:
    python benchmarks/host_cost.py --arch deit_small_patch16_224 --model-kwargs '{"img_size": 112}' \\
        --variant '{"inline_io_max_pixels": 0}' --variant '{"inline_io_max_pixels": 0, "io_workers": 1}'
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.config import ModelSettings, Settings
from app.main import create_app
from benchmarks.load_test import test_images

STAGES = ("parse", "decode", "preprocess", "render", "encode")


def request_body(image: bytes, encodings: str) -> tuple[bytes, bytes]:
    """One image posted as a multipart file with its encodings: the body and its content type."""
    request = httpx.Request(
        "POST",
        "http://host/",
        files=[("files", ("0.jpg", image, "image/jpeg"))],
        data={"encodings": encodings},
    )
    return request.read(), request.headers["content-type"].encode()


async def call(app: Any, path: str, body: bytes, content_type: bytes) -> int:
    """One POST through the app's ASGI interface; its status."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"host"),
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    answered = asyncio.Event()
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    answered.set()
    return status


class Configuration:
    """One configuration's app, with canned compute once started."""

    def __init__(self, name: str, settings: Settings) -> None:
        self.name = name
        self.app = create_app(settings)
        self.rounds: list[dict[str, float]] = []

    async def start(
        self, stack: contextlib.AsyncExitStack, path: str, body: bytes, content_type: bytes
    ) -> None:
        from asgi_lifespan import LifespanManager

        await stack.enter_async_context(LifespanManager(self.app, startup_timeout=300, shutdown_timeout=60))
        service = self.app.state.service
        while not service.registry.settled:
            await asyncio.sleep(0.05)
        batcher = next(iter(service.registry.batchers.values()))
        real = batcher.compute
        captured: list[Any] = []

        def capturing(items: Any) -> Any:
            results = real(items)
            captured.append(results[0])
            return results

        batcher.compute = capturing
        if await call(self.app, path, body, content_type) != 200:  # one real batch
            raise RuntimeError(f"{self.name}: the first request failed")
        template = captured[0]

        def canned(items: Any) -> Any:
            return [template for _ in items]

        batcher.compute = canned

    def stage_sums(self) -> dict[str, float]:
        sums: dict[str, float] = {}
        for metric in self.app.state.service.metrics.stage_seconds.collect():
            for sample in metric.samples:
                if sample.name.endswith("_sum"):
                    stage = sample.labels["stage"]
                    sums[stage] = sums.get(stage, 0.0) + sample.value
        return sums

    async def measure(
        self, path: str, body: bytes, content_type: bytes, requests: int, concurrency: int
    ) -> None:
        before = self.stage_sums()
        started, cpu, loop_cpu = time.perf_counter(), time.process_time(), time.thread_time()

        async def client(count: int) -> None:
            for _ in range(count):
                if await call(self.app, path, body, content_type) != 200:
                    raise RuntimeError(f"{self.name}: a request failed")

        await asyncio.gather(*(client(requests // concurrency) for _ in range(concurrency)))
        done = (requests // concurrency) * concurrency
        figures = {
            "cpu": 1000 * (time.process_time() - cpu) / done,
            "loop": 1000 * (time.thread_time() - loop_cpu) / done,
            "rate": done / (time.perf_counter() - started),
        }
        after = self.stage_sums()
        for stage in STAGES:
            figures[stage] = 1000 * (after.get(stage, 0.0) - before.get(stage, 0.0)) / done
        self.rounds.append(figures)

    def median(self, key: str) -> float:
        return statistics.median(figures[key] for figures in self.rounds)


async def run(args: argparse.Namespace) -> list[Configuration]:
    base: dict[str, Any] = {
        "models": [
            ModelSettings(
                name="m", arch=args.arch, weights="random:0", model_kwargs=json.loads(args.model_kwargs)
            )
        ],
        "log_level": "warning",
    }
    configurations = [Configuration("defaults", Settings(**base))]
    for text in args.variant:
        configurations.append(Configuration(text, Settings(**{**base, **json.loads(text)})))
    body, content_type = request_body(test_images(1, args.image_size)[0], args.encodings)
    path = "/v1/models/m/explain"
    async with contextlib.AsyncExitStack() as stack:
        for configuration in configurations:
            await configuration.start(stack, path, body, content_type)
        for configuration in configurations:  # warm-up
            await configuration.measure(path, body, content_type, args.concurrency * 4, args.concurrency)
            configuration.rounds.clear()
        for _ in range(args.rounds):
            for configuration in configurations:
                await configuration.measure(path, body, content_type, args.requests, args.concurrency)
    return configurations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="deit_small_patch16_224")
    parser.add_argument(
        "--model-kwargs", default='{"img_size": 112}', help="JSON kwargs for timm.create_model"
    )
    parser.add_argument("--image-size", type=int, default=320, help="side of the posted JPEG")
    parser.add_argument("--encodings", default="heatmap")
    parser.add_argument("--requests", type=int, default=400, help="requests per configuration and round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variant", action="append", default=[], help="settings as JSON; repeatable")
    args = parser.parse_args(argv)
    configurations = asyncio.run(run(args))
    print(
        f"{args.arch} {args.model_kwargs}, one {args.image_size}x{args.image_size} JPEG per request, "
        f"explain with {args.encodings}, {args.concurrency} in flight, {args.requests} requests per round, "
        f"medians of {args.rounds} rounds (configurations in turn)"
    )
    defaults = configurations[0].median("cpu")
    for configuration in configurations[1:]:
        ratio = configuration.median("cpu") / defaults
        print(f"- {configuration.name} / defaults: CPU per request {ratio:.2f}x")
    print()
    print(
        "| configuration | CPU ms/request | by round | event loop thread ms | "
        + " | ".join(STAGES)
        + " | requests/s |"
    )
    print("|---|---:|---|---:|" + "---:|" * len(STAGES) + "---:|")
    for configuration in configurations:
        by_round = " ".join(f"{figures['cpu']:.2f}" for figures in configuration.rounds)
        stages = " | ".join(f"{configuration.median(stage):.3f}" for stage in STAGES)
        print(
            f"| {configuration.name} | {configuration.median('cpu'):.3f} | {by_round} | "
            f"{configuration.median('loop'):.3f} | {stages} | {configuration.median('rate'):.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
