"""Micro-batching: one queue per model, batches formed by cost in images.

A request (a *job*) of N images costs N. The batcher waits at most ``max_wait_ms`` after the FIRST
queued job for more work, then computes up to ``max_batch_images`` images in one engine call on the
model's device thread, so the trunk runs once for everybody in the batch. The queue is bounded in
images (503 + Retry-After when full); a job that cannot start before its deadline gets 504; a job
whose client has gone, or whose caller was cancelled, is dropped before compute. When a batch fails,
it is split in halves and each half retried, down to single images, so one bad image only fails its
own request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from app.config import BatchSettings
from app.engine.options import CamOptions
from app.engine.reciprocam import ReciproCAM
from app.engine.results import ImageExplanation
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


async def client_gone(check: DisconnectCheck) -> bool:
    """Whether the client has gone, by ``check``; a broken check must not drop the request."""
    try:
        return bool(await check())
    except Exception:
        return False


@dataclass
class BatchItem:
    """One image and what to compute for it.

    ``image`` is the model input (3, H, W): uint8 pixels, normalised with the batch on the model's
    device, or with ``normalized`` a float tensor the client already normalised. ``options`` None
    means prediction only. ``targets`` are explicit class ids to explain; otherwise the ``top_k``
    most probable classes are explained.
    """

    image: torch.Tensor
    options: CamOptions | None = None
    targets: list[int] | None = None
    top_k: int = 1
    normalized: bool = False


@dataclass(frozen=True)
class BatchOutcome:
    """Results for one job, in the order of its items, and how long it waited and computed."""

    results: list[ImageExplanation]
    queue_ms: float
    compute_ms: float
    batch_images: int


def batch_inputs(
    items: Sequence[BatchItem],
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The batch's model inputs (B, 3, H, W) in item order, on ``device``.

    uint8 pixels are stacked and moved as uint8 (a quarter of the bytes of float32), then
    normalised in one call of ``normalize`` (which takes (..., H, W, 3) pixels) on the device;
    normalised items are taken as they are.
    """
    pixel_rows = [row for row, item in enumerate(items) if not item.normalized]
    tensor_rows = [row for row, item in enumerate(items) if item.normalized]
    if not pixel_rows:
        stacked = torch.stack([item.image for item in items])
        return stacked if device is None else stacked.to(device)
    if normalize is None:
        raise ValueError("uint8 images need a normalize function")
    # stacked as (B, H, W, 3), the layout of decoded pixels: copied once, moved as one block
    pixels = torch.stack([items[row].image.movedim(0, -1) for row in pixel_rows])
    normalized = normalize(pixels if device is None else pixels.to(device))
    if not tensor_rows:
        return normalized
    inputs = torch.empty(
        (len(items), *normalized.shape[1:]), dtype=normalized.dtype, device=normalized.device
    )
    inputs[pixel_rows] = normalized
    inputs[tensor_rows] = torch.stack([items[row].image for row in tensor_rows]).to(inputs)
    return inputs


def run_engine_batch(
    engine: ReciproCAM,
    items: Sequence[BatchItem],
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
) -> list[ImageExplanation]:
    """One ``ReciproCAM.explain`` call for a batch of items (called on the device thread); uint8
    items are normalised here, with the batch, on ``device`` (see :func:`batch_inputs`)."""
    images = batch_inputs(items, normalize, device)
    options = [item.options for item in items]
    targets = [item.targets for item in items] if any(item.targets is not None for item in items) else None
    top_ks = [item.top_k for item in items if item.options is not None and item.targets is None]
    results = engine.explain(images, options, targets=targets, top_k=max(top_ks, default=1))
    for result in results:
        # A NaN or an infinity (an fp16 overflow, broken weights) would reach clients as null where
        # a number is promised: fail the batch, so that splitting isolates the image it came from.
        if not _finite(result.logits) or (result.score_maps is not None and not _finite(result.score_maps)):
            raise NonFiniteOutputError(
                "the model produced non-finite values (NaN or infinity) for this image; with fp16 or bf16 "
                "weights this can be an overflow"
            )
    return results


class NonFiniteOutputError(ValueError):
    """The model's logits or score maps for an image hold NaN or infinity."""


def _finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


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
    started: bool = field(default=False)

    @property
    def cost(self) -> int:
        return len(self.items)


class Batcher:
    """Per-model queue and batch loop. ``compute`` runs on ``executor`` (one thread per device)."""

    def __init__(
        self,
        model_name: str,
        compute: Callable[[Sequence[BatchItem]], list[ImageExplanation]],
        executor: Executor,
        settings: BatchSettings,
        metrics: ServiceMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model_name = model_name
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
        self.computing_since: float | None = None  # when the compute now running started (clock)
        metrics.queue_depth.labels(model_name).set(0)

    # ------------------------------------------------------------------ public
    @property
    def queued_images(self) -> int:
        return self._queued_images

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
        cost = len(items)
        self.check_room(cost)
        now = self.clock()
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
            if not done and not job.started:
                job.future.cancel()
                self._reject("deadline")
                raise DeadlineExceededError(
                    self.model_name, self.settings.request_timeout_s, self.settings.retry_after_s
                )
            return await job.future
        except asyncio.CancelledError:
            job.future.cancel()
            raise

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
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(ShuttingDownError())
        self._queued_images = 0
        self.metrics.queue_depth.labels(self.model_name).set(0)

    # ------------------------------------------------------------------ loop
    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._arrival.clear()
                await self._arrival.wait()
                continue
            try:
                batch = await self._collect()
                if batch:
                    await self._execute(batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # pragma: no cover - the loop must survive anything
                logger.exception("batch loop error for model %s", self.model_name)

    async def _collect(self) -> list[_Job]:
        """Wait for the window of the oldest job, then take jobs that fit into one batch."""
        max_images = self.settings.max_batch_images
        window_end = self._queue[0].enqueued + self.settings.max_wait_ms / 1000.0
        while self._queued_images < max_images and not self._closing:
            remaining = window_end - self.clock()
            if remaining <= 0:
                break
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), timeout=remaining)
            except asyncio.TimeoutError:
                break
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
        now = self.clock()
        live: list[_Job] = []
        for job in batch:
            if job.future.done():
                continue
            if now > job.deadline:
                self._reject("deadline")
                job.future.set_exception(
                    DeadlineExceededError(
                        self.model_name, self.settings.request_timeout_s, self.settings.retry_after_s
                    )
                )
                continue
            if job.disconnected is not None and await client_gone(job.disconnected):
                self._reject("client_disconnected")
                job.future.set_exception(ClientDisconnectedError())
                continue
            live.append(job)
        if not live:
            return
        started = self.clock()
        for job in live:
            job.started = True
            self.metrics.queue_wait.labels(self.model_name).observe(started - job.enqueued)
        items = [item for job in live for item in job.items]
        self.metrics.batch_size.labels(self.model_name).observe(len(items))
        sources = {job.source for job in live if job.source is not None}
        if sources:
            self.metrics.batch_sources.labels(self.model_name).observe(len(sources))
        outputs = await self._compute_split(items)
        finished = self.clock()
        compute_ms = (finished - started) * 1000.0
        self.metrics.compute_time.labels(self.model_name).observe(finished - started)
        position = 0
        for job in live:
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
                    queue_ms=(started - job.enqueued) * 1000.0,
                    compute_ms=compute_ms,
                    batch_images=len(items),
                )
            )

    async def _compute_split(self, items: list[BatchItem]) -> list[ImageExplanation | BaseException]:
        """Compute ``items``; a failing group is split in halves and retried, down to single images."""
        try:
            results = await self._in_executor(items)
        except Exception as exc:
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
            first = await self._compute_split(items[:middle])
            second = await self._compute_split(items[middle:])
            return first + second
        return list(results)

    async def _in_executor(self, items: list[BatchItem]) -> list[ImageExplanation]:
        self.computing_since = self.clock()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.executor, self._compute_chunked, items
            )
        finally:
            self.computing_since = None

    def _compute_chunked(self, items: list[BatchItem]) -> list[ImageExplanation]:
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
