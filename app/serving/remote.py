"""An HTTP worker's side of a shared-engine server: the models as the engine process reports them,
and a batch queue that submits to the engine's batchers (see :mod:`app.serving.engine_process`).

The worker decodes and renders; the engine only computes. When the engine process goes away, every
request waiting on it is answered 503 ``model_loading`` with Retry-After, the models read as
loading (so readiness fails), and the worker reconnects to the restarted engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, cast

from app.config import Settings
from app.serving import ipc
from app.serving.batch import BatchItem
from app.serving.batcher import BatchOutcome, DisconnectCheck, client_gone
from app.serving.errors import (
    ClientDisconnectedError,
    EngineUnresponsiveError,
    QueueFullError,
    ServiceError,
    ShuttingDownError,
)
from app.serving.registry import Models, ModelStatus

logger = logging.getLogger(__name__)

RESTARTING = "the engine process is restarting"
RECONNECT_S = 0.1
DISCONNECT_POLL_S = 0.5  # how often a waiting request checks that its client is still there
QUEUE_FIGURE_S = 1.0  # how long the engine's last reported queue depth is trusted
# beyond the longest a job may take (its deadline to start, then one batch's compute): time for the
# engine's watchdog to notice a hang and for the link to see the process go
ANSWER_GRACE_S = 10.0


@dataclass(eq=False)
class _Pending:
    future: asyncio.Future[Any]
    refs: list[ipc.TensorRef]
    items: list[BatchItem] = field(default_factory=list)  # CUDA inputs stay alive until answered


class EngineLink:
    """One connection to the engine process, remade whenever the engine restarts."""

    def __init__(self, address: str, models: RemoteModels) -> None:
        self.address = address
        self.models = models
        self.arena = ipc.Arena()
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.queued: dict[str, tuple[int, float]] = {}  # model -> (images queued, when reported)

    @property
    def connected(self) -> bool:
        return self._writer is not None

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-link")
        return self._task

    async def _run(self) -> None:
        while not self._closing:
            try:
                reader, writer = await asyncio.open_unix_connection(self.address)
            except OSError:
                await asyncio.sleep(RECONNECT_S)
                continue
            self._writer = writer
            logger.info("connected to the engine process")
            try:
                while True:
                    self._dispatch(await ipc.receive(reader))
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            except Exception:  # an unreadable message: drop this link and make a new one
                logger.exception("unexpected message from the engine process; reconnecting")
            finally:
                self._writer = None
                writer.close()
                self._lost()
            if not self._closing:
                logger.warning("the engine process went away; waiting for it to restart")

    def _lost(self) -> None:
        """Answer every job still waiting. The engine may still be reading their inputs (when only the
        link broke), so their arena is retired, not reused: later jobs get a fresh one."""
        if self._closing:
            error: ServiceError = ShuttingDownError()
        else:
            error = self._restarting()
            if self._pending:
                retired, self.arena = self.arena, ipc.Arena()
                retired.close()  # unlinked; an engine that still maps it keeps its pages
        for job_id in list(self._pending):
            self._finish(job_id, error)
        self.models.engine_gone()

    def _restarting(self) -> ServiceError:
        retry = self.models.settings.batch.retry_after_s
        return ServiceError("model_loading", f"{RESTARTING}; retry", retry_after_s=retry)

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "models":
            self.models.update(message[1])
        elif kind == "done":
            _, job_id, model, results, queue_ms, compute_ms, batch_images, queued = message
            self.queued[model] = (queued, time.monotonic())
            outcome = BatchOutcome(
                results=[ipc.explanation_from_wire(result) for result in results],
                queue_ms=queue_ms,
                compute_ms=compute_ms,
                batch_images=batch_images,
            )
            self._finish(job_id, outcome)
        elif kind == "failed":
            _, job_id, model, code, text, retry_after_s, queued = message
            self.queued[model] = (queued, time.monotonic())
            self._finish(job_id, ServiceError(code, text, retry_after_s=retry_after_s))

    def _finish(self, job_id: int, outcome: BatchOutcome | ServiceError) -> None:
        pending = self._pending.pop(job_id, None)
        if pending is None:
            return
        for ref in pending.refs:
            self.arena.free(ref)
        if pending.future.done():
            return
        if isinstance(outcome, ServiceError):
            pending.future.set_exception(outcome)
        else:
            pending.future.set_result(outcome)

    async def submit(
        self, model: str, items: list[BatchItem], disconnected: DisconnectCheck | None
    ) -> BatchOutcome:
        writer = self._writer
        if writer is None:
            raise self._restarting()
        job_id = next(self._ids)
        refs: list[ipc.TensorRef] = []
        try:
            for item in items:
                refs.append(self.arena.put(item.image))
        except BaseException:
            for ref in refs:
                self.arena.free(ref)
            raise
        wire = [
            (ref, item.options, item.targets, item.top_k, item.normalized)
            for ref, item in zip(refs, items, strict=True)
        ]
        pending = _Pending(asyncio.get_running_loop().create_future(), refs, items)
        self._pending[job_id] = pending
        try:
            await ipc.send(writer, ("submit", job_id, model, wire))
        except (ConnectionError, RuntimeError):
            pass  # the reader sees the connection end and answers every pending job
        except BaseException:  # not sent: nobody will answer it
            self._pending.pop(job_id, None)
            for ref in refs:
                self.arena.free(ref)
            raise
        batch = self.models.settings.batch
        longest = batch.request_timeout_s + batch.compute_timeout_s + ANSWER_GRACE_S
        deadline = time.monotonic() + longest
        try:
            while True:
                left = deadline - time.monotonic()
                done, _ = await asyncio.wait({pending.future}, timeout=min(DISCONNECT_POLL_S, max(0.0, left)))
                if done:
                    outcome: BatchOutcome = pending.future.result()
                    return outcome
                if left <= 0:  # the engine's watchdog should have ended it: do not wait for good
                    logger.error("the engine process has not answered job %d within %g s", job_id, longest)
                    await self._cancel(job_id, pending)
                    raise EngineUnresponsiveError(longest, batch.retry_after_s)
                if disconnected is not None and await client_gone(disconnected):
                    await self._cancel(job_id, pending)
                    raise ClientDisconnectedError()
        except asyncio.CancelledError:
            await self._cancel(job_id, pending)
            raise

    async def _cancel(self, job_id: int, pending: _Pending) -> None:
        """Ask the engine to drop the job; its slots are freed when the engine answers for it (an
        answer nobody reads then)."""
        pending.future.cancel()
        writer = self._writer
        if writer is not None and job_id in self._pending:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ipc.send(writer, ("cancel", job_id))

    async def close(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) for the jobs in flight, then disconnect."""
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._closing = True
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job_id in list(self._pending):  # without a link (it never connected)
            self._finish(job_id, ShuttingDownError())
        self.arena.close()


class RemoteQueue:
    """One model's batch queue in the engine process, as the pipeline sees it."""

    def __init__(self, link: EngineLink, model: str) -> None:
        self.link = link
        self.model = model

    def check_room(self, cost: int) -> None:
        """Refuse early when the engine recently reported a full queue (it checks again itself)."""
        queued, when = self.link.queued.get(self.model, (0, 0.0))
        settings = self.link.models.settings.batch
        fresh = time.monotonic() - when < QUEUE_FIGURE_S
        if fresh and queued > 0 and queued + cost > settings.max_queue_images:
            raise QueueFullError(self.model, settings.retry_after_s)

    async def submit(
        self, items: list[BatchItem], *, disconnected: DisconnectCheck | None = None
    ) -> BatchOutcome:
        return await self.link.submit(self.model, items, disconnected)

    async def close(self, timeout_s: float) -> None:
        return None  # the link closes once for every model


class RemoteModels(Models):
    """The models of the engine process, as this worker last heard of them."""

    def __init__(self, settings: Settings, address: str) -> None:
        super().__init__(settings)
        self.link = EngineLink(address, self)
        self.link_task: asyncio.Task[None] | None = None
        for entry in self.entries.values():
            if entry.status == "loading":
                entry.reason = "waiting for the engine process"

    def start_loading(self) -> asyncio.Task[None]:
        self.link_task = self.link.start()
        return self.link_task

    def update(self, statuses: dict[str, tuple[str, str | None, Any]]) -> None:
        """The engine's models: name -> (status, reason, card or None)."""
        for name, (status, reason, card) in statuses.items():
            entry = self.entries.get(name)
            if entry is None:
                continue
            entry.status, entry.reason = cast(ModelStatus, status), reason
            entry.loaded = card
            entry.batcher = RemoteQueue(self.link, name) if card is not None else None

    def engine_gone(self) -> None:
        for entry in self.entries.values():
            if entry.status in ("ready", "loading"):
                entry.status, entry.reason = "loading", RESTARTING
                entry.loaded = entry.batcher = None

    async def close(self, timeout_s: float) -> None:
        await self.link.close(timeout_s)
