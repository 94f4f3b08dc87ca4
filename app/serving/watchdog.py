"""The shared engine process's watchdog. A batch that computes for longer than
``batch.compute_timeout_s``, or an event loop that stops turning for as long, means the engine hangs
(a stuck device, a deadlock): the process then exits, its supervisor starts a new one, and the
workers answer the waiting requests 503 ``model_loading`` instead of leaving them waiting for good.

It watches from its own thread, so it still acts when the event loop is the part that hangs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

logger = logging.getLogger(__name__)

EXIT_HUNG = 70  # the exit status of an engine process stopped by its watchdog (EX_SOFTWARE)
# The event loop only dispatches; but while a model loads (Python code holding the interpreter) on a
# busy machine it may wait seconds for its turn: a stalled loop counts as a hang only past this.
MIN_LOOP_STALL_S = 60.0


class Computing(Protocol):
    @property
    def model_name(self) -> str: ...

    @property
    def computing_since(self) -> float | None: ...


def exit_hung(reason: str) -> None:
    logger.critical("the engine process hangs (%s); exiting so that it is restarted", reason)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(EXIT_HUNG)


class Watchdog:
    """Calls ``on_hung`` (once) when a batcher of ``batchers()`` has computed one batch for longer than
    ``timeout_s``, or when :meth:`heartbeat` has not run for ``loop_timeout_s`` (by default
    ``timeout_s``, at least ``MIN_LOOP_STALL_S``)."""

    def __init__(
        self,
        batchers: Callable[[], Iterable[Computing]],
        timeout_s: float,
        *,
        loop_timeout_s: float | None = None,
        on_hung: Callable[[str], None] = exit_hung,
        period_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.batchers = batchers
        self.timeout_s = timeout_s
        self.loop_timeout_s = max(timeout_s, MIN_LOOP_STALL_S) if loop_timeout_s is None else loop_timeout_s
        self.on_hung = on_hung
        self.period_s = period_s
        self.clock = clock
        self._beat = clock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def hung(self) -> str | None:
        """Why the engine hangs, or None."""
        now = self.clock()
        for batcher in list(self.batchers()):
            since = batcher.computing_since
            if since is not None and now - since > self.timeout_s:
                return f"a batch of model {batcher.model_name!r} has computed for {now - since:.0f} s"
        if now - self._beat > self.loop_timeout_s:
            return f"its event loop has not turned for {now - self._beat:.0f} s"
        return None

    async def heartbeat(self) -> None:
        """Run on the event loop: each turn shows the loop is alive."""
        while True:
            self._beat = self.clock()
            await asyncio.sleep(self.period_s)

    def start(self) -> None:
        self._beat = self.clock()
        self._thread = threading.Thread(target=self._watch, name="engine-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        while not self._stopped.wait(self.period_s):
            reason = self.hung()
            if reason is not None:
                self.on_hung(reason)
                return
