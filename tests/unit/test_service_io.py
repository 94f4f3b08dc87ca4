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
