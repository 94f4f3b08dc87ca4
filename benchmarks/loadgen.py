"""The load test's client side: ready request bodies, and client processes that send them.

A :class:`ClientPool` starts its processes once (``spawn``, so they hold nothing of the parent's
threads or model) and reuses them for every level. Each process runs its own event loop (uvloop when
installed) and a lean keep-alive HTTP/1.1 client (``rawhttp.py``: the load generator shares the
machine with the server, so its CPU is kept small) with its share of the load. Two ways to load the
server:

* **closed loop**: a fixed number of requests in flight; each answer sends the next request.
* **open loop**: requests sent at a fixed rate (uniform or Poisson arrivals) whatever the answers;
  latency counts from the scheduled send time, so a client that falls behind its schedule adds to
  the latency instead of hiding it.

Requests are encoded once, before the level, so the clients spend their CPU on HTTP, not on
building multipart bodies. Every process measures its own CPU time (user + system) over the
measured part of the level.
"""

from __future__ import annotations

import asyncio
import io
import json
import multiprocessing
import multiprocessing.synchronize
import queue
import random
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import numpy as np
import orjson
from PIL import Image

from benchmarks.rawhttp import RawClient, RawResponse, TransportError, request_bytes

Api = Literal["v1", "v2"]
# a process that finishes no level within this time has hung (a server that never answers)
LEVEL_TIMEOUT_S = 3600.0
# an open-loop process refuses to send past this many requests in flight (counted as an error)
CAP_ERROR = "client: in-flight cap reached, not sent"
BOUNDARY = "reciprocam-load-test-boundary-7f3a9c"


@dataclass
class RequestTemplate:
    """Ready bodies for one endpoint; request ``i`` sends ``bodies[i % len(bodies)]``."""

    api: Api
    path: str
    headers: dict[str, str]
    bodies: list[bytes]


@dataclass
class LevelSpec:
    """One process's share of one level."""

    url: str
    template: RequestTemplate
    requests: int
    concurrency: int  # closed loop: requests in flight; open loop: the cap on them
    rate: float | None = None  # open loop: this process's requests per second
    arrivals: Literal["uniform", "poisson"] = "poisson"
    seed: int = 0
    warmup: int = 2


@dataclass
class ClientResult:
    """What one process saw during the measured part of a level."""

    sent: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    batch_images: list[int] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)
    started: float = 0.0  # time.monotonic(), one clock for every process on the machine
    finished: float = 0.0
    last_send: float = 0.0
    cpu_s: float = 0.0  # user + system CPU seconds of this process
    send_lags_ms: list[float] = field(default_factory=list)  # open loop: sent after its scheduled time
    max_in_flight: int = 0

    @property
    def errors(self) -> int:
        return sum(self.error_kinds.values())

    @property
    def core_share(self) -> float:
        """CPU seconds per wall second: 1.0 is one core kept busy."""
        wall = self.finished - self.started
        return self.cpu_s / wall if wall > 0 else 0.0


# --------------------------------------------------------------------------- bodies
def v1_template(
    model: str,
    endpoint: str,
    images: list[bytes],
    per_request: int,
    fields: dict[str, str],
    api_key: str | None,
) -> RequestTemplate:
    """Multipart posts of JPEG files to ``/v1/models/{model}/{endpoint}``, encoded by httpx once."""
    # one boundary for every body, so that one Content-Type header serves them all
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    bodies = []
    for start in range(len(images)):
        files = [
            ("files", (f"{k}.jpg", images[(start + k) % len(images)], "image/jpeg"))
            for k in range(per_request)
        ]
        request = httpx.Request(
            "POST", "http://client/", files=files, data=fields, headers={"Content-Type": content_type}
        )
        bodies.append(request.read())
    return RequestTemplate("v1", f"/v1/models/{model}/{endpoint}", _headers(api_key, content_type), bodies)


def v2_tensor_template(
    model: str,
    endpoint: str,
    tensors: list[np.ndarray],
    per_request: int,
    api_key: str | None,
) -> RequestTemplate:
    """Binary ``pixel_values`` (FP32, ``[N, 3, H, W]``) posts to ``/v2/models/{model}/infer``;
    explain asks for every output (maps included), predict for the probabilities only, all binary."""
    bodies = []
    for start in range(len(tensors)):
        batch = np.stack([tensors[(start + k) % len(tensors)] for k in range(per_request)]).astype("<f4")
        raw = batch.tobytes()
        header: dict[str, Any] = {
            "inputs": [
                {
                    "name": "pixel_values",
                    "datatype": "FP32",
                    "shape": list(batch.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
        if endpoint == "predict":
            header["outputs"] = [{"name": "probabilities", "parameters": {"binary_data": True}}]
        encoded = json.dumps(header).encode()
        bodies.append(encoded + raw)
        length = len(encoded)  # the same for every body: the same shape and sizes
    headers = _headers(api_key, "application/octet-stream")
    headers["Inference-Header-Content-Length"] = str(length)
    return RequestTemplate("v2", f"/v2/models/{model}/infer", headers, bodies)


def pixel_values(images: list[bytes], data_config: dict[str, Any]) -> list[np.ndarray]:
    """Images resized to the model's input and normalised with its mean and std, as (3, H, W) float32
    (a plain resize: the server only checks the shape and the range of the values)."""
    height, width = (int(v) for v in data_config["input_size"][-2:])
    mean = np.asarray(data_config.get("mean", (0.485, 0.456, 0.406)), dtype=np.float32)[:, None, None]
    std = np.asarray(data_config.get("std", (0.229, 0.224, 0.225)), dtype=np.float32)[:, None, None]
    tensors = []
    for data in images:
        image = Image.open(io.BytesIO(data)).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        tensors.append((array - mean) / std)
    return tensors


def _headers(api_key: str | None, content_type: str) -> dict[str, str]:
    headers = {"Content-Type": content_type}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


# --------------------------------------------------------------------------- one process
def error_kind(response: RawResponse) -> str:
    """A failed response's kind: its status with the service's error code and message (``/v1``: the
    body without its per-request id; ``/v2``: the message), or the start of any other body."""
    try:
        error = response.json()["error"]
        if isinstance(error, str):
            return f"{response.status_code} {error}"
        return f"{response.status_code} {error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} {response.text[:120]}"


def batch_images(response: RawResponse, api: Api) -> int:
    """The size of the batch the request joined, from the answer's timings."""
    if api == "v1":
        return int(orjson.loads(response.content)["timing"]["batch_images"])
    length = response.headers.get("inference-header-content-length")
    header = response.content[: int(length)] if length else response.content
    return int(orjson.loads(header)["parameters"]["batch_images"])


async def run_client(spec: LevelSpec, between: Callable[[], None] | None = None) -> ClientResult:
    """One process's share of a level: warm-up requests (not counted), ``between()`` (the pool's
    synchronisation), then the measured requests."""
    template = spec.template
    result = ClientResult()
    errors: Counter[str] = Counter()
    in_flight = 0
    client = RawClient(spec.url)
    requests = [
        request_bytes(template.path, template.headers, body, client.authority) for body in template.bodies
    ]
    try:

        async def one(index: int, scheduled: float) -> None:
            nonlocal in_flight
            in_flight += 1
            result.max_in_flight = max(result.max_in_flight, in_flight)
            try:
                response = await client.send(requests[index % len(requests)])
            except TransportError as exc:  # connection dropped or refused: count it, go on
                errors[str(exc).partition(":")[0]] += 1
                return
            finally:
                in_flight -= 1
            elapsed_ms = (time.monotonic() - scheduled) * 1000
            if response.status_code != 200:
                errors[error_kind(response)] += 1
                return
            try:
                batch = batch_images(response, template.api)
            except (ValueError, KeyError, TypeError):  # a 200 without the service's timings
                errors[f"200 unreadable answer: {response.content[:80]!r}"] += 1
                return
            result.latencies_ms.append(elapsed_ms)
            result.batch_images.append(batch)

        warmup = min(spec.warmup, spec.requests)
        await asyncio.gather(*(one(i, time.monotonic()) for i in range(warmup)))
        result.latencies_ms.clear()
        result.batch_images.clear()
        result.max_in_flight = 0
        errors.clear()
        if between is not None:
            between()
        cpu_before = time.process_time()
        result.started = time.monotonic()
        if spec.rate is None:
            await _closed_loop(spec, one, result)
        else:
            await _open_loop(spec, one, result, errors)
        result.finished = time.monotonic()
        result.cpu_s = time.process_time() - cpu_before
    finally:
        await client.aclose()
    result.error_kinds = dict(errors)
    return result


async def _closed_loop(spec: LevelSpec, one: Callable[[int, float], Any], result: ClientResult) -> None:
    counter = iter(range(spec.requests))

    async def worker() -> None:
        for index in counter:
            result.sent += 1
            result.last_send = time.monotonic()
            await one(index, result.last_send)

    await asyncio.gather(*(worker() for _ in range(min(spec.concurrency, spec.requests))))


async def _open_loop(
    spec: LevelSpec,
    one: Callable[[int, float], Any],
    result: ClientResult,
    errors: Counter[str],
) -> None:
    if spec.rate is None or spec.requests == 0:
        return
    rng = random.Random(spec.seed)
    gap = 1.0 / spec.rate
    tasks: set[asyncio.Task[Any]] = set()
    # uniform arrivals start at a random phase, so that several processes do not send in step
    scheduled = result.started + (rng.random() * gap if spec.arrivals == "uniform" else 0.0)
    for index in range(spec.requests):
        scheduled += rng.expovariate(spec.rate) if spec.arrivals == "poisson" else (gap if index else 0.0)
        # behind schedule, still yield once: the answers of the requests in flight need the loop
        await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
        now = time.monotonic()
        result.send_lags_ms.append(max(0.0, now - scheduled) * 1000)
        result.sent += 1
        result.last_send = now
        if len(tasks) >= spec.concurrency:  # tasks, not requests: a task starts its request later
            errors[CAP_ERROR] += 1
            continue
        task = asyncio.create_task(one(index, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*list(tasks))


def _process_main(
    inbox: multiprocessing.Queue[LevelSpec | None],
    outbox: multiprocessing.Queue[tuple[int, ClientResult | str]],
    barrier: multiprocessing.synchronize.Barrier,
    number: int,
) -> None:
    """A client process: one level per message until None."""
    while True:
        spec = inbox.get()
        if spec is None:
            return

        def between() -> None:
            barrier.wait(LEVEL_TIMEOUT_S)  # every process warmed up; the parent reads the server
            barrier.wait(LEVEL_TIMEOUT_S)  # go

        try:
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                outbox.put((number, runner.run(run_client(spec, between))))
        except BaseException:
            barrier.abort()
            outbox.put((number, traceback.format_exc()))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


# --------------------------------------------------------------------------- the pool
class ClientPool:
    """``processes`` client processes, started once, reused for every level."""

    def __init__(self, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.processes = processes
        self.barrier = context.Barrier(processes + 1)
        self.outbox: multiprocessing.Queue[tuple[int, ClientResult | str]] = context.Queue()
        self.inboxes: list[multiprocessing.Queue[LevelSpec | None]] = []
        self.workers = []
        for number in range(processes):
            inbox: multiprocessing.Queue[LevelSpec | None] = context.Queue()
            worker = context.Process(
                target=_process_main, args=(inbox, self.outbox, self.barrier, number), daemon=True
            )
            worker.start()
            self.inboxes.append(inbox)
            self.workers.append(worker)

    def run(self, specs: list[LevelSpec], at_start: Callable[[], None] | None = None) -> list[ClientResult]:
        """One level, one spec per process. ``at_start`` runs once every process has warmed up and
        before any measured request is sent (to read the server's CPU time and metrics)."""
        if len(specs) != self.processes:
            raise ValueError(f"{len(specs)} specs for {self.processes} client processes")
        for inbox, spec in zip(self.inboxes, specs, strict=True):
            inbox.put(spec)
        failures: list[str] = []
        try:
            self.barrier.wait(LEVEL_TIMEOUT_S)
            if at_start is not None:
                at_start()
            self.barrier.wait(LEVEL_TIMEOUT_S)
        except Exception:  # a client failed (it broke the barrier): collect its account below
            self.barrier.reset()
        results: list[ClientResult] = []
        deadline = time.monotonic() + LEVEL_TIMEOUT_S
        while len(results) + len(failures) < self.processes:
            try:
                _, answer = self.outbox.get(timeout=1.0)
            except queue.Empty:
                if not all(worker.is_alive() for worker in self.workers) or time.monotonic() > deadline:
                    raise RuntimeError("a client process ended or hung during the level") from None
                continue
            if isinstance(answer, str):
                failures.append(answer)
            else:
                results.append(answer)
        if failures:
            raise RuntimeError("client process failed:\n" + "\n".join(failures))
        return results

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for worker in self.workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.terminate()
                worker.join()

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` shares as equal as possible, the larger first."""
    return [total // parts + (1 if k < total % parts else 0) for k in range(parts)]


def level_specs(
    url: str,
    template: RequestTemplate,
    processes: int,
    requests: int,
    concurrency: int,
    rate: float | None = None,
    arrivals: Literal["uniform", "poisson"] = "poisson",
    seed: int = 0,
) -> list[LevelSpec]:
    """A level's specs, one per process. Closed loop: the concurrency is split over the processes
    and the requests follow the same shares. Open loop: requests, rate and the in-flight cap are
    split evenly."""
    if rate is None:
        shares = split(concurrency, processes)
        counts = [requests * share // concurrency for share in shares]
        counts[0] += requests - sum(counts)
        return [
            LevelSpec(url, template, count, share, None, arrivals, seed + k, warmup=min(share, 4))
            for k, (count, share) in enumerate(zip(counts, shares, strict=True))
        ]
    counts = split(requests, processes)
    caps = split(max(concurrency, processes), processes)
    return [
        LevelSpec(url, template, count, cap, rate * count / requests, arrivals, seed + k, warmup=2)
        for k, (count, cap) in enumerate(zip(counts, caps, strict=True))
    ]
