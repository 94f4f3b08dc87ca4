"""The micro-batcher with a fake engine: batching by cost, bounds, deadlines, drops, split-and-retry."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from app.config import BatchSettings
from app.engine.results import ImageExplanation
from app.serving.batch import BatchItem
from app.serving.batcher import Batcher
from app.serving.errors import (
    ClientDisconnectedError,
    ComputeFailedError,
    DeadlineExceededError,
    QueueFullError,
    ShuttingDownError,
)
from app.serving.metrics import ServiceMetrics


class FakeEngine:
    """Returns each image's first pixel as its logit, records every batch, and can block or fail."""

    def __init__(self) -> None:
        self.batches: list[list[float]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.poison: set[float] = set()

    def __call__(self, items: Sequence[BatchItem]) -> list[ImageExplanation]:
        values = [float(item.image[0, 0, 0]) for item in items]
        self.batches.append(values)
        self.entered.set()
        self.gate.wait(timeout=10)
        if self.poison.intersection(values):
            raise RuntimeError("injected failure")
        return [ImageExplanation(logits=torch.tensor([value])) for value in values]


def item(value: float) -> BatchItem:
    return BatchItem(image=torch.full((3, 2, 2), value), normalized=True)


@pytest.fixture
def executor():
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown(wait=False, cancel_futures=True)


def make_batcher(engine: FakeEngine, executor, **settings) -> tuple[Batcher, ServiceMetrics]:
    metrics = ServiceMetrics()
    batcher = Batcher("fake", engine, executor, BatchSettings(**settings), metrics)
    batcher.start()
    return batcher, metrics


def values_of(outcome) -> list[float]:
    return [float(result.logits[0]) for result in outcome.results]


async def test_each_job_gets_its_own_results_and_jobs_share_batches(executor):
    engine = FakeEngine()
    batcher, _ = make_batcher(engine, executor, max_batch_images=8, max_wait_ms=200)
    jobs = [[item(10 * j + i) for i in range(j % 3 + 1)] for j in range(6)]
    outcomes = await asyncio.gather(*(batcher.submit(job) for job in jobs))
    for job, outcome in zip(jobs, outcomes, strict=True):
        assert values_of(outcome) == [float(x.image[0, 0, 0]) for x in job]
    # 12 images, at most 8 per batch, jobs never split across batches
    assert sum(len(batch) for batch in engine.batches) == 12
    assert all(len(batch) <= 8 for batch in engine.batches)
    assert max(len(batch) for batch in engine.batches) > 1
    assert outcomes[0].batch_images == len(engine.batches[0])
    await batcher.close(1)


async def test_cost_is_counted_in_images(executor):
    engine = FakeEngine()
    batcher, _ = make_batcher(engine, executor, max_batch_images=4, max_wait_ms=200)
    first = [item(1), item(2), item(3)]
    second = [item(4), item(5)]
    await asyncio.gather(batcher.submit(first), batcher.submit(second))
    # 3 + 2 > 4: the second job waits for the next batch instead of overfilling the first
    assert engine.batches == [[1, 2, 3], [4, 5]]
    await batcher.close(1)


async def test_full_queue_rejects_with_retry_after(executor):
    engine = FakeEngine()
    engine.gate.clear()
    batcher, metrics = make_batcher(engine, executor, max_batch_images=1, max_wait_ms=0, max_queue_images=2)
    running = asyncio.ensure_future(batcher.submit([item(1)]))
    await asyncio.to_thread(engine.entered.wait, 5)  # job 1 is computing, the queue is empty again
    queued = asyncio.ensure_future(batcher.submit([item(2), item(3)]))
    await asyncio.sleep(0)
    with pytest.raises(QueueFullError) as refused:
        await batcher.submit([item(4)])
    assert refused.value.code == "queue_full" and refused.value.retry_after_s == 1
    engine.gate.set()
    assert values_of(await running) == [1]
    assert values_of(await queued) == [2, 3]
    assert metrics.rejections.labels("fake", "queue_full")._value.get() == 1
    await batcher.close(1)


async def test_request_that_cannot_start_in_time_gets_504(executor):
    engine = FakeEngine()
    engine.gate.clear()
    batcher, metrics = make_batcher(
        engine, executor, max_batch_images=1, max_wait_ms=0, request_timeout_s=0.05, retry_after_s=7
    )
    running = asyncio.ensure_future(batcher.submit([item(1)]))
    await asyncio.to_thread(engine.entered.wait, 5)
    with pytest.raises(DeadlineExceededError) as late:
        await batcher.submit([item(2)])
    assert late.value.code == "deadline_exceeded"
    assert late.value.retry_after_s == 7  # overload: the client is told when to come back
    engine.gate.set()
    assert values_of(await running) == [1]  # the one that started finishes, however long it takes
    await asyncio.sleep(0.05)
    assert [2.0] not in engine.batches  # the late job never reached the model
    assert metrics.rejections.labels("fake", "deadline")._value.get() == 1
    await batcher.close(1)


async def test_disconnected_client_is_dropped_before_compute(executor):
    engine = FakeEngine()
    batcher, metrics = make_batcher(engine, executor, max_batch_images=8, max_wait_ms=50)

    async def gone() -> bool:
        return True

    async def present() -> bool:
        return False

    results = await asyncio.gather(
        batcher.submit([item(1)], disconnected=gone),
        batcher.submit([item(2)], disconnected=present),
        return_exceptions=True,
    )
    assert isinstance(results[0], ClientDisconnectedError)
    assert values_of(results[1]) == [2]
    assert all(1.0 not in batch for batch in engine.batches)
    assert metrics.rejections.labels("fake", "client_disconnected")._value.get() == 1
    await batcher.close(1)


async def test_cancelled_caller_is_dropped_before_compute(executor):
    engine = FakeEngine()
    engine.gate.clear()
    batcher, _ = make_batcher(engine, executor, max_batch_images=1, max_wait_ms=0)
    running = asyncio.ensure_future(batcher.submit([item(1)]))
    await asyncio.to_thread(engine.entered.wait, 5)
    abandoned = asyncio.ensure_future(batcher.submit([item(2)]))
    kept = asyncio.ensure_future(batcher.submit([item(3)]))
    await asyncio.sleep(0)
    abandoned.cancel()
    engine.gate.set()
    await running
    assert values_of(await kept) == [3]
    assert [2.0] not in engine.batches
    await batcher.close(1)


async def test_failing_batch_is_split_and_only_the_bad_item_fails(executor):
    engine = FakeEngine()
    engine.poison = {5.0}
    batcher, metrics = make_batcher(engine, executor, max_batch_images=8, max_wait_ms=200)
    jobs = [[item(1)], [item(2), item(3)], [item(4), item(5)], [item(6)], [item(7), item(8)]]
    results = await asyncio.gather(*(batcher.submit(job) for job in jobs), return_exceptions=True)
    assert isinstance(results[2], ComputeFailedError) and results[2].code == "compute_failed"
    assert "injected failure" in results[2].message
    for index in (0, 1, 3, 4):
        assert values_of(results[index]) == [float(x.image[0, 0, 0]) for x in jobs[index]]
    assert metrics.batch_retries.labels("fake")._value.get() >= 1
    assert metrics.item_failures.labels("fake")._value.get() == 1
    # the service keeps going
    assert values_of(await batcher.submit([item(9)])) == [9]
    await batcher.close(1)


async def test_the_running_compute_is_timed_from_its_start(executor):
    """What the shared engine's watchdog reads: when the compute now running began, else None."""
    clock = [100.0]
    engine = FakeEngine()
    engine.gate.clear()
    engine.poison = {2.0}
    metrics = ServiceMetrics()
    settings = BatchSettings(max_batch_images=1, max_wait_ms=0)
    batcher = Batcher("fake", engine, executor, settings, metrics, clock=lambda: clock[0])
    batcher.start()
    assert batcher.computing_since is None
    running = asyncio.ensure_future(batcher.submit([item(1)]))
    await asyncio.to_thread(engine.entered.wait, 5)
    assert batcher.computing_since == 100.0
    clock[0] = 107.0
    engine.gate.set()
    await running
    assert batcher.computing_since is None
    with pytest.raises(ComputeFailedError):  # a failed compute ends its timing too
        await batcher.submit([item(2)])
    assert batcher.computing_since is None
    await batcher.close(1)


async def test_close_drains_queued_work_then_refuses(executor):
    engine = FakeEngine()
    batcher, _ = make_batcher(engine, executor, max_batch_images=2, max_wait_ms=20)
    pending = [asyncio.ensure_future(batcher.submit([item(i)])) for i in range(5)]
    await asyncio.sleep(0)
    await batcher.close(5)
    assert [values_of(job.result()) for job in pending] == [[i] for i in range(5)]
    with pytest.raises(ShuttingDownError):
        await batcher.submit([item(9)])


async def test_engine_batch_call_per_image_options_and_top_k():
    """run_engine_batch passes per-image options and targets, and the largest top_k, in one call."""
    from app.engine.options import CamOptions
    from app.serving.batch import run_engine_batch

    calls = []

    class Recorder:
        def explain(self, images, options, *, targets=None, top_k=None):
            calls.append((images.shape, options, targets, top_k))
            return [ImageExplanation(logits=torch.zeros(3)) for _ in range(images.shape[0])]

    dirac = CamOptions(kernel="dirac")
    items = [
        BatchItem(torch.zeros(3, 4, 4), None, None, 5, normalized=True),
        BatchItem(torch.zeros(3, 4, 4), CamOptions(), None, 2, normalized=True),
        BatchItem(torch.zeros(3, 4, 4), dirac, [1], 1, normalized=True),
    ]
    assert len(run_engine_batch(Recorder(), items)) == 3
    shape, options, targets, top_k = calls[0]
    assert shape == (3, 3, 4, 4)
    assert options == [None, CamOptions(), dirac]
    assert targets == [None, None, [1]]
    assert top_k == 2  # only explained images without explicit targets count


def test_batch_inputs_normalise_uint8_pixels_with_the_batch():
    """uint8 items are normalised in one call and equal their one-by-one normalisation exactly;
    float items pass through; the rows keep the items' order."""
    import numpy as np

    from app.engine.preprocess import DataConfig, Preprocessor
    from app.serving.batch import batch_inputs

    preprocessor = Preprocessor(DataConfig(input_size=(6, 5), mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3)))
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(3)]
    calls: list[tuple[int, ...]] = []

    def normalize(batch: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(batch.shape))
        assert batch.dtype == torch.uint8  # moved to the device as uint8
        return preprocessor.normalize(batch)

    one_by_one = [preprocessor.normalize(p) for p in pixels]
    items = [BatchItem(image=torch.from_numpy(p).permute(2, 0, 1)) for p in pixels]
    inputs = batch_inputs(items, normalize, "cpu")
    assert calls == [(3, 6, 5, 3)]
    assert inputs.shape == (3, 3, 6, 5) and inputs.dtype == torch.float32
    assert torch.equal(inputs, torch.stack(one_by_one))

    given = torch.randn(3, 6, 5)
    mixed = [items[0], BatchItem(image=given, normalized=True), items[2]]
    inputs = batch_inputs(mixed, normalize)
    assert torch.equal(inputs[0], one_by_one[0])
    assert torch.equal(inputs[1], given)
    assert torch.equal(inputs[2], one_by_one[2])

    floats = batch_inputs(
        [BatchItem(image=given, normalized=True), BatchItem(image=given * 2, normalized=True)]
    )
    assert torch.equal(floats, torch.stack([given, given * 2]))
    with pytest.raises(ValueError, match="normalize"):
        batch_inputs(items)


def test_run_engine_batch_refuses_non_finite_results():
    """NaN or infinite logits or maps fail the batch (the batcher then isolates the image) instead
    of reaching the response as null."""
    from app.serving.batch import NonFiniteOutputError, run_engine_batch

    class Engine:
        def __init__(self, logits: torch.Tensor, maps: torch.Tensor | None) -> None:
            self.logits, self.maps = logits, maps

        def explain(self, images, options, targets=None, top_k=1):
            return [ImageExplanation(logits=self.logits, score_maps=self.maps) for _ in range(len(images))]

    items = [BatchItem(image=torch.zeros(3, 2, 2), normalized=True)]
    good = torch.tensor([0.5, -1.0])
    assert run_engine_batch(Engine(good, torch.zeros(1, 2, 2)), items)[0].logits is good
    for logits, maps in (
        (torch.tensor([float("nan"), 1.0]), None),
        (torch.tensor([float("inf"), 1.0]), None),
        (good, torch.tensor([[[0.0, float("nan")], [0.0, 0.0]]])),
    ):
        with pytest.raises(NonFiniteOutputError, match="non-finite"):
            run_engine_batch(Engine(logits, maps), items)
