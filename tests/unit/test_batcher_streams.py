"""Several batches computing at once, and the batch that waits on the compute threads."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from app.config import BatchSettings
from app.serving.batch import batch_limit
from app.serving.batcher import Batcher
from app.serving.errors import DeadlineExceededError
from app.serving.metrics import ServiceMetrics
from app.serving.registry import compute_streams, stream_threads
from tests.unit.test_batcher import FakeEngine, item, values_of


def make(engine: FakeEngine, streams: int, **settings) -> tuple[Batcher, ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=streams)
    batcher = Batcher("fake", engine, pool, BatchSettings(**settings), ServiceMetrics(), streams=streams)
    batcher.start()
    return batcher, pool


async def one_stream_held(**settings) -> tuple[FakeEngine, Batcher, ThreadPoolExecutor, asyncio.Future]:
    """A one-stream batcher whose engine is computing image 1 and holds it until ``engine.gate`` opens."""
    engine = FakeEngine()
    engine.gate.clear()
    batcher, pool = make(engine, 1, max_wait_ms=0, **settings)
    first = asyncio.ensure_future(batcher.submit([item(1)]))
    await asyncio.to_thread(engine.entered.wait, 5)
    return engine, batcher, pool, first


class CountingEngine(FakeEngine):
    """A FakeEngine that records how many batches were inside it at the same time."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = 0
        self.most_inside = 0
        self.lock = threading.Lock()

    def __call__(self, items):
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            return super().__call__(items)
        finally:
            with self.lock:
                self.inside -= 1


async def test_two_streams_compute_two_batches_at_once_and_keep_results_apart():
    engine = CountingEngine()
    engine.gate.clear()
    batcher, pool = make(engine, 2, max_batch_images=2, max_wait_ms=0)
    jobs = [asyncio.ensure_future(batcher.submit([item(2 * j), item(2 * j + 1)])) for j in range(4)]
    deadline = time.monotonic() + 5
    while engine.most_inside < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert engine.most_inside == 2  # the second batch did not wait for the first
    assert batcher.computing_since is not None
    engine.gate.set()
    outcomes = await asyncio.gather(*jobs)
    assert [values_of(outcome) for outcome in outcomes] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert engine.most_inside == 2  # never more than the streams
    await batcher.close(1)
    pool.shutdown()


async def test_one_stream_never_computes_two_batches_at_once():
    engine = CountingEngine()
    batcher, pool = make(engine, 1, max_batch_images=1, max_wait_ms=0)
    outcomes = await asyncio.gather(*(batcher.submit([item(i)]) for i in range(6)))
    assert [values_of(outcome) for outcome in outcomes] == [[i] for i in range(6)]
    assert engine.most_inside == 1
    await batcher.close(1)
    pool.shutdown()


async def test_the_next_batch_starts_while_the_event_loop_is_busy():
    """While the one stream computes, a half-full queue is formed into a batch that waits on the compute
    thread: it starts when the running batch ends, even if the event loop is then busy elsewhere."""
    engine, batcher, pool, first = await one_stream_held(max_batch_images=4)
    second = [asyncio.ensure_future(batcher.submit([item(v)])) for v in (2, 3)]  # half of 4
    for _ in range(20):  # let the loop form the waiting batch
        await asyncio.sleep(0)
    engine.gate.set()
    time.sleep(0.5)  # the event loop is blocked: only the compute thread can start the next batch
    assert engine.batches == [[1.0], [2.0, 3.0]]
    assert values_of(await first) == [1]
    assert [values_of(await job) for job in second] == [[2], [3]]
    await batcher.close(1)
    pool.shutdown()


async def test_less_than_half_a_batch_waits_for_a_free_stream():
    engine, batcher, pool, first = await one_stream_held(max_batch_images=4)
    early = asyncio.ensure_future(batcher.submit([item(2)]))  # a quarter: not formed yet
    for _ in range(20):
        await asyncio.sleep(0)
    late = asyncio.ensure_future(batcher.submit([item(3)]))
    await asyncio.sleep(0)
    engine.gate.set()
    await asyncio.gather(first, early, late)
    assert engine.batches == [[1.0], [2.0, 3.0]]  # both went into the batch formed when the stream freed
    await batcher.close(1)
    pool.shutdown()


def test_a_batch_formed_while_another_computes_leaves_half_a_batch_queued():
    assert batch_limit(32, 32, staggered=False) == 32
    assert batch_limit(32, 32, staggered=True) == 16
    assert batch_limit(32, 40, staggered=True) == 24  # 16 left for the next stream
    assert batch_limit(32, 100, staggered=True) == 32  # a deep queue: full batches
    assert batch_limit(32, 5, staggered=True) == 16  # takes what there is
    assert batch_limit(1, 1, staggered=True) == 1
    assert batch_limit(5, 5, staggered=True) == 3


async def test_a_burst_is_split_between_the_free_stream_and_the_next_batch():
    """One stream computes; eight images arrive together (as the answers of a batch go out under a
    steady load, their clients' next requests do). The free stream takes half a batch, and the other
    half is formed to wait on the compute threads: no stream is left waiting for more requests."""
    engine = CountingEngine()
    engine.gate.clear()
    batcher, pool = make(engine, 2, max_batch_images=8, max_wait_ms=0)
    first = asyncio.ensure_future(batcher.submit([item(1)]))
    await asyncio.to_thread(engine.entered.wait, 5)
    burst = [asyncio.ensure_future(batcher.submit([item(v)])) for v in range(2, 10)]
    deadline = time.monotonic() + 5
    while engine.most_inside < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    for _ in range(20):  # let the loop form the waiting batch
        await asyncio.sleep(0)
    engine.gate.set()
    await asyncio.gather(first, *burst)
    assert engine.batches == [[1.0], [2.0, 3.0, 4.0, 5.0], [6.0, 7.0, 8.0, 9.0]]
    assert [values_of(await job) for job in burst] == [[v] for v in range(2, 10)]
    await batcher.close(1)
    pool.shutdown()


async def test_a_job_waiting_on_the_compute_thread_still_gets_its_deadline():
    engine, batcher, pool, running = await one_stream_held(max_batch_images=1, request_timeout_s=0.1)
    with pytest.raises(DeadlineExceededError):
        await batcher.submit([item(2)])  # a full batch at once: it waits on the thread, then times out
    engine.gate.set()
    assert values_of(await running) == [1]
    assert values_of(await batcher.submit([item(3)])) == [3]
    assert [2.0] not in engine.batches  # given up before the thread took it: never computed
    await batcher.close(1)
    pool.shutdown()


async def test_close_answers_the_jobs_of_every_running_batch():
    engine = FakeEngine()
    engine.gate.clear()
    batcher, pool = make(engine, 2, max_batch_images=1, max_wait_ms=0)
    jobs = [asyncio.ensure_future(batcher.submit([item(i)])) for i in range(3)]
    await asyncio.to_thread(engine.entered.wait, 5)
    await batcher.close(0.1)  # the batches hang: the drain times out
    results = await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), timeout=5)
    assert all(isinstance(result, Exception) for result in results)
    engine.gate.set()
    pool.shutdown()


def test_default_streams_two_on_a_multicore_cpu_one_elsewhere():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert compute_streams(None, cpu, threads=2) == 2
    assert compute_streams(None, cpu, threads=16) == 2
    assert compute_streams(None, cpu, threads=1) == 1
    assert compute_streams(None, cuda, threads=16) == 1
    assert compute_streams(3, cuda, threads=1) == 3  # a configured count wins
    # each stream's torch threads: a CPU's shared out (never none), an accelerator's host threads kept
    assert [stream_threads(t, 2, cpu) for t in (1, 2, 3, 16)] == [1, 1, 1, 8]
    assert stream_threads(16, 2, cuda) == 16


@pytest.mark.parametrize("name", ["deit_tiny_distilled", "vit_registers"])
def test_the_engine_computes_two_batches_at_once_as_it_does_one_by_one(name):
    """The streams share one engine: it keeps no state between calls, so concurrent batches get exactly
    what each gets alone."""
    from app.engine.options import CamOptions
    from app.engine.reciprocam import ReciproCAM
    from tests.helpers import make_tiny

    engine = ReciproCAM(make_tiny(name, seed=1))
    height, width = (8 * side for side in engine.anatomy.grid_size)  # patches of 8 pixels
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(3 + k, 3, height, width, generator=generator) for k in range(4)]
    alone = [engine.explain(batch, CamOptions(), top_k=2) for batch in batches]
    together: list = [None] * len(batches)
    start = threading.Barrier(2)

    def worker(indices: list[int]) -> None:
        start.wait()
        for _ in range(3):
            for index in indices:
                together[index] = engine.explain(batches[index], CamOptions(), top_k=2)

    threads = [
        threading.Thread(target=worker, args=([0, 2],)),
        threading.Thread(target=worker, args=([1, 3],)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for expected, got in zip(alone, together, strict=True):
        assert len(expected) == len(got)
        for one, other in zip(expected, got, strict=True):
            assert torch.equal(one.logits, other.logits)
            assert torch.equal(one.score_maps, other.score_maps)


async def test_many_jobs_with_cancellations_failures_and_deadlines_each_get_their_own_answer():
    """A storm on two streams: every job that is not cancelled gets exactly its own results, or the
    error of its own poisoned image, or 504; nothing hangs and the batcher ends idle."""
    import random

    engine = FakeEngine()
    engine.poison = {13.0, 57.0}
    batcher, pool = make(engine, 2, max_batch_images=6, max_wait_ms=1, request_timeout_s=5)
    rng = random.Random(0)
    tasks = []
    for j in range(120):
        values = [float(j * 10 + k) for k in range(rng.randint(1, 3))]
        tasks.append((values, asyncio.ensure_future(batcher.submit([item(v) for v in values]))))
        if rng.random() < 0.3:
            await asyncio.sleep(0)
    cancelled = {index for index in range(len(tasks)) if rng.random() < 0.15}
    for index in cancelled:
        tasks[index][1].cancel()
    results = await asyncio.wait_for(asyncio.gather(*(t for _, t in tasks), return_exceptions=True), 30)
    for index, ((values, _), result) in enumerate(zip(tasks, results, strict=True)):
        if isinstance(result, asyncio.CancelledError):
            assert index in cancelled
        elif isinstance(result, Exception):
            assert engine.poison.intersection(values), (values, result)
        else:
            assert values_of(result) == values
    computed = [value for batch in engine.batches for value in batch]
    cancelled_values = {v for index in cancelled for v in tasks[index][0]}
    assert set(computed) >= {v for values, _ in tasks for v in values} - cancelled_values
    # an image is computed again only when a batch it was in failed and was split
    failed_with = {v for batch in engine.batches if engine.poison.intersection(batch) for v in batch}
    assert all(computed.count(v) == 1 for v in set(computed) - failed_with)
    await asyncio.wait_for(batcher.close(5), 10)
    assert batcher.queued_images == 0 and batcher.computing_since is None
    pool.shutdown()
