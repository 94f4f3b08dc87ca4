"""Micro-batching: one queue per model, batches formed by cost in images.

A request (a *job*) of N images costs N. The batcher waits at most ``max_wait_ms`` after the FIRST
queued job for more work, then computes up to ``max_batch_images`` images in one engine call on the
model's device threads, so the trunk runs once for everybody in the batch. Up to ``streams`` batches
compute at once (on a CPU, two single-threaded batches keep both cores busy without torch's threads
waiting for each other when HTTP work preempts one of them); while every stream computes, a batch at
least half full is formed and waits on the compute threads, to start the moment one frees rather
than when the event loop next gets its turn, and a batch formed while another computes leaves half a
batch queued where it can (:func:`app.serving.batch.batch_limit`). The queue is bounded in images
(503 + Retry-After when full); a job that cannot start before its deadline gets 504; a job whose
client has gone, or whose caller was cancelled, is dropped before compute. When a batch fails, it is
split in halves and each half retried, down to single images: one bad image fails only its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch

from app.config import BatchSettings
from app.engine.results import ImageExplanation
from app.serving.batch import BatchItem, batch_limit
from app.serving.errors import (
    ClientDisconnectedError,
    DeadlineExceededError,
    QueueFullError,
    ShuttingDownError,
    compute_error,
    is_out_of_memory,
)
from app.serving.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

DisconnectCheck = Callable[[], Awaitable[bool]]
_T = TypeVar("_T")


async def client_gone(check: DisconnectCheck) -> bool:
    """Whether the client has gone, by ``check``; a broken check must not drop the request."""
    try:
        return bool(await check())
    except Exception:
        return False


@dataclass(frozen=True)
class BatchOutcome:
    """Results for one job, in the order of its items, and how long it waited and computed."""

    results: list[ImageExplanation]
    queue_ms: float
    compute_ms: float
    batch_images: int


class BatchQueue(Protocol):
    """What the pipeline submits to: a :class:`Batcher` in this process, or the shared engine's."""

    def check_room(self, cost: int) -> None: ...

    async def submit(
        self, items: list[BatchItem], *, disconnected: DisconnectCheck | None = None
    ) -> BatchOutcome: ...

    async def close(self, timeout_s: float) -> None: ...


@dataclass(eq=False)
class _Job:
    items: list[BatchItem]
    future: asyncio.Future[BatchOutcome]
    enqueued: float
    deadline: float
    disconnected: DisconnectCheck | None
    source: int | None = None  # the front-end process it came from (shared-engine servers)
    # Set under the batcher's claim lock: by a compute thread taking the job up, or by its caller
    # giving up on it (deadline, cancellation) before that; whichever comes first wins.
    started: bool = field(default=False)
    abandoned: bool = field(default=False)

    @property
    def cost(self) -> int:
        return len(self.items)


class Batcher:
    """Per-model queue and batch loop. ``compute`` runs on ``executor``, which has ``streams`` threads."""

    def __init__(
        self,
        model_name: str,
        compute: Callable[[Sequence[BatchItem]], list[ImageExplanation]],
        executor: Executor,
        settings: BatchSettings,
        metrics: ServiceMetrics,
        *,
        streams: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if streams < 1:
            raise ValueError("a batcher needs at least one stream")
        self.model_name = model_name
        self.streams = streams
        self.compute = compute
        self.executor = executor
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self._queue: deque[_Job] = deque()
        self._queued_images = 0
        self._arrival = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._running: dict[asyncio.Task[None], list[_Job]] = {}
        self._claim_lock = threading.Lock()
        self._computing: dict[object, float] = {}  # when each compute now running started (clock)
        metrics.queue_depth.labels(model_name).set(0)

    # ------------------------------------------------------------------ public
    @property
    def queued_images(self) -> int:
        return self._queued_images

    @property
    def computing_since(self) -> float | None:
        """When the oldest compute now running started (clock), None when none runs."""
        return min(tuple(self._computing.values()), default=None)  # tuple(): one step, as threads add

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"batcher-{self.model_name}"
            )

    def check_room(self, cost: int) -> None:
        """Refuse at once (503) when ``cost`` more images would overflow the queue, or when closing.

        Called before decoding too, so that a burst is turned away before it costs memory and CPU.
        An empty queue always takes a request, whatever its size."""
        if self._closing:
            self._reject("shutting_down")
            raise ShuttingDownError()
        if self._queued_images > 0 and self._queued_images + cost > self.settings.max_queue_images:
            self._reject("queue_full")
            raise QueueFullError(self.model_name, self.settings.retry_after_s)

    async def submit(
        self,
        items: list[BatchItem],
        *,
        disconnected: DisconnectCheck | None = None,
        source: int | None = None,
    ) -> BatchOutcome:
        """Queue one request's images and wait for their results."""
        if not items:
            raise ValueError("a job needs at least one image")
        cost, now = len(items), self.clock()
        self.check_room(cost)
        job = _Job(
            items=items,
            future=asyncio.get_running_loop().create_future(),
            enqueued=now,
            deadline=now + self.settings.request_timeout_s,
            disconnected=disconnected,
            source=source,
        )
        self._queue.append(job)
        self._queued_images += cost
        self._idle.clear()
        self.metrics.queue_depth.labels(self.model_name).set(self._queued_images)
        self._arrival.set()
        try:
            done, _ = await asyncio.wait({job.future}, timeout=max(0.0, job.deadline - self.clock()))
            if not done and self._abandon(job):
                job.future.cancel()
                self._reject("deadline")
                raise DeadlineExceededError(
                    self.model_name, self.settings.request_timeout_s, self.settings.retry_after_s
                )
            return await job.future
        except asyncio.CancelledError:
            self._abandon(job)
            job.future.cancel()
            raise

    def _abandon(self, job: _Job) -> bool:
        """Give up on ``job`` unless a compute thread has taken it up; whether it was given up."""
        with self._claim_lock:
            if not job.started:
                job.abandoned = True
            return job.abandoned

    async def close(self, timeout_s: float) -> None:
        """Stop taking work, let queued and running work finish (at most ``timeout_s``), then stop."""
        self._closing = True
        self._arrival.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=timeout_s)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task, jobs in list(self._running.items()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(ShuttingDownError())
        self._running.clear()
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(ShuttingDownError())
        self._queued_images = 0
        self.metrics.queue_depth.labels(self.model_name).set(0)

    # ------------------------------------------------------------------ loop
    async def _run(self) -> None:
        while True:
            self._arrival.clear()  # set again by an arrival, a finished batch or close()
            if not self._queue:
                if not self._running:
                    self._idle.set()
                await self._arrival.wait()
                continue
            if not self._may_dispatch():
                await self._arrival.wait()
                continue
            try:
                batch = await self._collect()
                if batch:
                    task = asyncio.get_running_loop().create_task(
                        self._execute(batch), name=f"batch-{self.model_name}"
                    )
                    self._running[task] = batch
                    task.add_done_callback(self._batch_done)
            except asyncio.CancelledError:
                raise
            except Exception:  # pragma: no cover - the loop must survive anything
                logger.exception("batch loop error for model %s", self.model_name)

    def _may_dispatch(self) -> bool:
        """Whether to form a batch now: a stream is free, or all compute and half a batch is queued."""
        running = len(self._running)
        if running < self.streams:
            return True
        return running == self.streams and 2 * self._queued_images >= self.settings.max_batch_images

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        if not task.cancelled() and task.exception() is not None:  # pragma: no cover - a bug
            logger.error("batch error for model %s", self.model_name, exc_info=task.exception())
        if not self._queue and not self._running:
            self._idle.set()
        self._arrival.set()

    async def _collect(self) -> list[_Job]:
        """Wait for the window of the oldest job, then take jobs that fit into one batch."""
        staggered, limit = self.streams > 1 and bool(self._running), self.settings.max_batch_images
        window_end = self._queue[0].enqueued + self.settings.max_wait_ms / 1000.0
        while self._queued_images < batch_limit(limit, limit, staggered) and not self._closing:
            remaining = window_end - self.clock()
            if remaining <= 0:
                break
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), timeout=remaining)
            except asyncio.TimeoutError:
                break
        max_images = batch_limit(limit, self._queued_images, staggered)
        batch: list[_Job] = []
        cost = 0
        while self._queue:
            job = self._queue[0]
            if batch and cost + job.cost > max_images:
                break
            self._queue.popleft()
            self._queued_images -= job.cost
            if job.future.done():  # cancelled by its caller (deadline, disconnect, shutdown)
                continue
            batch.append(job)
            cost += job.cost
        self.metrics.queue_depth.labels(self.model_name).set(self._queued_images)
        return batch

    async def _execute(self, batch: list[_Job]) -> None:
        live = [job for job in batch if await self._admissible(job)]
        if not live:
            return
        started: list[float] = []  # when a compute thread took the batch up (it may wait for one)
        claimed, computed = await self._run_in_executor(self._claim_and_compute, live, started)
        if not claimed:
            return
        items = [item for job in claimed for item in job.items]
        outputs: list[ImageExplanation | BaseException]
        if isinstance(computed, Exception):  # split the batch, to isolate the failing image
            outputs = await self._split(items, computed, started)
        else:
            outputs = list(computed)
        finished = self.clock()
        begun = started[0]
        compute_ms = (finished - begun) * 1000.0
        self.metrics.compute_time.labels(self.model_name).observe(finished - begun)
        position = 0
        for job in claimed:
            results = outputs[position : position + job.cost]
            position += job.cost
            if job.future.done():
                continue
            failure = next((r for r in results if isinstance(r, BaseException)), None)
            if failure is not None:
                job.future.set_exception(compute_error(self.model_name, failure, self.settings.retry_after_s))
                continue
            job.future.set_result(
                BatchOutcome(
                    results=[r for r in results if isinstance(r, ImageExplanation)],
                    queue_ms=(begun - job.enqueued) * 1000.0,
                    compute_ms=compute_ms,
                    batch_images=len(items),
                )
            )

    async def _admissible(self, job: _Job) -> bool:
        """Whether ``job`` is still worth computing; answers it when not (late, or its client gone)."""
        if job.future.done():
            return False
        if self.clock() > job.deadline:
            self._reject("deadline")
            job.future.set_exception(
                DeadlineExceededError(
                    self.model_name, self.settings.request_timeout_s, self.settings.retry_after_s
                )
            )
            return False
        if job.disconnected is not None and await client_gone(job.disconnected):
            self._reject("client_disconnected")
            job.future.set_exception(ClientDisconnectedError())
            return False
        return True

    def _claim_and_compute(
        self, jobs: list[_Job], started: list[float]
    ) -> tuple[list[_Job], list[ImageExplanation] | Exception]:
        """On a compute thread: take up the jobs not given up since they were batched, and compute
        them; a failure is returned, for the event loop to split the batch."""
        with self._claim_lock:
            claimed = [job for job in jobs if not job.abandoned]
            for job in claimed:
                job.started = True
        if not claimed:
            return claimed, []
        items = [item for job in claimed for item in job.items]
        now = self.clock()
        for job in claimed:
            self.metrics.queue_wait.labels(self.model_name).observe(now - job.enqueued)
        self.metrics.batch_size.labels(self.model_name).observe(len(items))
        sources = {job.source for job in claimed if job.source is not None}
        if sources:
            self.metrics.batch_sources.labels(self.model_name).observe(len(sources))
        try:
            return claimed, self._compute_chunked(items, started)
        except Exception as exc:
            return claimed, exc

    async def _compute_split(
        self, items: list[BatchItem], started: list[float]
    ) -> list[ImageExplanation | BaseException]:
        """Compute ``items``; a failing group is split in halves and retried, down to single images."""
        try:
            return list(await self._run_in_executor(self._compute_chunked, items, started))
        except Exception as exc:
            return await self._split(items, exc, started)

    async def _split(
        self, items: list[BatchItem], exc: Exception, started: list[float]
    ) -> list[ImageExplanation | BaseException]:
        """After ``items`` failed together with ``exc``: each half again, down to single images."""
        if is_out_of_memory(exc):
            self.metrics.out_of_memory.labels(self.model_name).inc()
        if len(items) == 1:
            self.metrics.item_failures.labels(self.model_name).inc()
            logger.warning(
                "model %s failed on a single image: %s: %s", self.model_name, type(exc).__name__, exc
            )
            return [exc]
        self.metrics.batch_retries.labels(self.model_name).inc()
        logger.warning(
            "model %s failed on a batch of %d images (%s: %s); splitting and retrying",
            self.model_name,
            len(items),
            type(exc).__name__,
            exc,
        )
        _release_accelerator_memory()
        middle = len(items) // 2
        first = await self._compute_split(items[:middle], started)
        second = await self._compute_split(items[middle:], started)
        return first + second

    async def _run_in_executor(self, function: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    def _compute_chunked(self, items: list[BatchItem], started: list[float]) -> list[ImageExplanation]:
        """On a compute thread: ``items`` in chunks of at most ``max_batch_images``; appends its start
        to ``started`` and is timed by the watchdog while it runs."""
        token = object()
        started.append(self.clock())
        self._computing[token] = started[-1]
        try:
            return self._chunks(items)
        finally:
            self._computing.pop(token, None)

    def _chunks(self, items: list[BatchItem]) -> list[ImageExplanation]:
        size = self.settings.max_batch_images
        results: list[ImageExplanation] = []
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            chunk_results = self.compute(chunk)
            if len(chunk_results) != len(chunk):
                raise RuntimeError(
                    f"the engine returned {len(chunk_results)} results for {len(chunk)} images"
                )
            results.extend(chunk_results)
        return results

    def _reject(self, reason: str) -> None:
        self.metrics.rejections.labels(self.model_name, reason).inc()


def _release_accelerator_memory() -> None:
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
