"""The shared engine process's watchdog: a batch computing too long, or a stalled event loop, is a
hang; anything shorter is not."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

from app.serving.watchdog import Watchdog


@dataclass
class Computing:
    model_name: str
    computing_since: float | None = None


def test_a_batch_computing_past_the_timeout_is_a_hang():
    now = [1000.0]
    batchers = [Computing("a"), Computing("b")]
    watchdog = Watchdog(lambda: batchers, 60.0, clock=lambda: now[0])
    watchdog._beat = 1000.0
    assert watchdog.hung() is None  # idle
    batchers[1].computing_since = 990.0
    now[0] = 1049.0
    watchdog._beat = 1049.0
    assert watchdog.hung() is None  # computing for 59 s
    now[0] = 1051.0
    watchdog._beat = 1051.0
    reason = watchdog.hung()
    assert reason is not None and "'b'" in reason and "61 s" in reason


def test_an_event_loop_that_stops_turning_is_a_hang():
    now = [0.0]
    watchdog = Watchdog(list, 5.0, clock=lambda: now[0])
    assert watchdog.loop_timeout_s == 60.0  # a start-up on a busy machine may hold the loop for seconds
    watchdog._beat = 0.0
    now[0] = 59.0
    assert watchdog.hung() is None
    now[0] = 61.0
    reason = watchdog.hung()
    assert reason is not None and "event loop" in reason
    assert Watchdog(list, 300.0).loop_timeout_s == 300.0


def test_the_heartbeat_keeps_a_turning_loop_alive_and_a_stopped_one_is_seen():
    offset = [0.0]  # time passed on top of the real clock, so the test need not wait for it
    watchdog = Watchdog(
        list, 5.0, loop_timeout_s=5.0, period_s=0.01, clock=lambda: time.monotonic() + offset[0]
    )

    async def turning() -> None:
        beating = asyncio.create_task(watchdog.heartbeat())
        await asyncio.sleep(0.1)
        offset[0] += 6.0  # the loop keeps turning: the next beat is at the new time
        await asyncio.sleep(0.1)
        assert watchdog.hung() is None
        beating.cancel()

    asyncio.run(turning())
    offset[0] += 6.0  # and now it does not
    reason = watchdog.hung()
    assert reason is not None and "event loop" in reason


def test_its_thread_reports_a_hang_once_and_stops():
    reports: list[str] = []
    reported = threading.Event()

    def on_hung(reason: str) -> None:
        reports.append(reason)
        reported.set()

    batcher = Computing("m", computing_since=time.monotonic())
    watchdog = Watchdog(lambda: [batcher], 0.1, on_hung=on_hung, period_s=0.02)
    watchdog._beat = float("inf")  # only the batch can be the hang here
    watchdog.start()
    watchdog._beat = float("inf")
    assert reported.wait(5)
    time.sleep(0.1)
    watchdog.stop()
    assert len(reports) == 1 and "'m'" in reports[0]


def test_its_thread_stops_without_a_report_when_nothing_hangs():
    reports: list[str] = []
    watchdog = Watchdog(lambda: [Computing("m")], 60.0, on_hung=reports.append, period_s=0.01)
    watchdog.start()
    time.sleep(0.1)
    watchdog.stop()
    assert reports == []
