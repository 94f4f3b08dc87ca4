"""The I/O pool: a cancelled caller waits for its running step, and drops one not yet started."""

from __future__ import annotations

import asyncio
import threading

import pytest

from app.config import Settings
from app.serving.service import Service


def _blocking(started: threading.Event, release: threading.Event, ran: list[str], name: str) -> str:
    started.set()
    release.wait(10)
    ran.append(name)
    return name


async def test_cancelling_waits_for_a_running_step_and_drops_a_queued_one():
    service = Service(Settings(models=[], io_workers=1))
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []
    try:
        running = asyncio.create_task(service.run_io(_blocking, started, release, ran, "running"))
        await asyncio.to_thread(started.wait, 10)
        queued = asyncio.create_task(service.run_io(_blocking, threading.Event(), release, ran, "queued"))
        await asyncio.sleep(0.05)
        running.cancel()
        queued.cancel()
        await asyncio.sleep(0.1)
        # the running step still holds its thread (and its memory): its caller has not finished
        assert not running.done()
        assert queued.done() and queued.cancelled()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert ran == ["running"]  # the queued step never ran
    finally:
        release.set()
        service.io_pool.shutdown(wait=True)


async def test_budget_is_held_until_a_cancelled_decode_returns():
    service = Service(Settings(models=[], io_workers=1))
    started, release = threading.Event(), threading.Event()

    async def request() -> None:
        with service.hold_original_pixels(1000, "m"):
            await service.run_io(_blocking, started, release, [], "decode")

    try:
        task = asyncio.create_task(request())
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        await asyncio.sleep(0.1)
        assert service.original_pixels_held == 1000
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert service.original_pixels_held == 0
    finally:
        release.set()
        service.io_pool.shutdown(wait=True)


async def test_results_and_errors_pass_through():
    service = Service(Settings(models=[]))
    try:
        assert await service.run_io(lambda a, b=0: a + b, 2, b=3) == 5
        with pytest.raises(ZeroDivisionError):
            await service.run_io(lambda: 1 / 0)
    finally:
        service.io_pool.shutdown(wait=True)


async def test_gather_all_waits_for_every_running_step_before_it_raises():
    # the render step of a request with several images: cancelled, it must not let the request
    # release its budget while other images' encodes still run
    from app.serving.service import gather_all

    service = Service(Settings(models=[], io_workers=2))
    started = [threading.Event(), threading.Event()]
    release = threading.Event()
    ran: list[str] = []

    async def request() -> None:
        with service.hold_original_pixels(1000, "m"):
            await gather_all(
                [
                    service.run_io(_blocking, started[0], release, ran, "first"),
                    service.run_io(_blocking, started[1], release, ran, "second"),
                    service.run_io(_blocking, threading.Event(), release, ran, "queued"),
                ]
            )

    try:
        task = asyncio.create_task(request())
        for event in started:
            await asyncio.to_thread(event.wait, 10)
        task.cancel()
        await asyncio.sleep(0.1)
        assert not task.done() and service.original_pixels_held == 1000
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert service.original_pixels_held == 0
        assert sorted(ran) == ["first", "second"]
    finally:
        release.set()
        service.io_pool.shutdown(wait=True)


async def test_gather_all_raises_the_first_failure_after_all_have_finished():
    from app.serving.service import gather_all

    finished: list[int] = []

    async def step(index: int, delay: float, fail: bool) -> int:
        await asyncio.sleep(delay)
        finished.append(index)
        if fail:
            raise ValueError(f"step {index}")
        return index

    assert await gather_all([step(0, 0.0, False), step(1, 0.01, False)]) == [0, 1]
    finished.clear()
    with pytest.raises(ValueError, match="step 0"):
        await gather_all([step(0, 0.0, True), step(1, 0.05, False), step(2, 0.01, True)])
    assert sorted(finished) == [0, 1, 2]


def _failing(started: threading.Event, release: threading.Event) -> None:
    started.set()
    release.wait(10)
    raise OSError("decode failed")


async def test_an_abandoned_step_that_fails_is_not_reported_as_unretrieved():
    import gc

    loop = asyncio.get_running_loop()
    reported: list[dict] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    service = Service(Settings(models=[], io_workers=1))
    started, release = threading.Event(), threading.Event()
    try:
        task = asyncio.create_task(service.run_io(_failing, started, release))
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        await asyncio.sleep(0.05)
        task.cancel()  # a second cancellation ends the wait: nobody is left to read the error
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        await asyncio.to_thread(service.io_pool.shutdown, True)
        await asyncio.sleep(0.05)
        del task
        gc.collect()
        await asyncio.sleep(0)
        assert not [c for c in reported if "never retrieved" in str(c.get("message", ""))], reported
    finally:
        release.set()
        loop.set_exception_handler(previous)
        service.io_pool.shutdown(wait=True)
