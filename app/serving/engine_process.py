"""The engine process of a shared-engine server (``serve --workers N``): it holds every model once
and one batcher per model, and computes for all HTTP workers, which connect to its Unix socket
(:mod:`app.serving.remote`). Batches therefore form across workers. Run by
:mod:`app.serving.supervisor` as ``python -m app.serving.engine_process SOCKET`` with a pipe as its
standard input: it stops (draining) when the pipe closes, and exits at once when it hangs
(:mod:`app.serving.watchdog`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import logging.config
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import torch

from app.config import Settings, load_settings
from app.serving import ipc
from app.serving.batch import BatchItem
from app.serving.errors import ServiceError
from app.serving.logs import logging_config
from app.serving.metrics import ServiceMetrics
from app.serving.model_card import ModelCard
from app.serving.registry import ModelRegistry
from app.serving.watchdog import Watchdog, exit_hung

logger = logging.getLogger("app.engine_process")
STATUS_POLL_S = 0.05


class EngineServer:
    def __init__(
        self, settings: Settings, address: str, *, on_hung: Callable[[str], None] = exit_hung
    ) -> None:
        self.settings = settings
        self.address = address
        self.on_hung = on_hung
        self.metrics = ServiceMetrics()
        self.registry = ModelRegistry(settings, self.metrics)
        self.arenas = ipc.ArenaReader()
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._ids = itertools.count(1)
        self._jobs: set[asyncio.Task[None]] = set()
        self._connections: set[asyncio.Task[Any]] = set()
        self._statuses: dict[str, tuple[str, str | None, Any]] = {}

    async def serve(self, stop: asyncio.Event) -> None:
        """Load the models and compute for the workers until ``stop`` is set, then drain."""
        if self.settings.torch_threads is not None:
            torch.set_num_threads(self.settings.torch_threads)
        self.metrics.engine_starts.inc()
        self.registry.start_loading()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)
        server = await asyncio.start_unix_server(self._connection, path=self.address)
        loop = asyncio.get_running_loop()
        watcher = loop.create_task(self._watch_statuses(), name="model-statuses")
        watchdog = Watchdog(
            self.registry.batchers.values, self.settings.batch.compute_timeout_s, on_hung=self.on_hung
        )
        heartbeat = loop.create_task(watchdog.heartbeat(), name="heartbeat")
        watchdog.start()
        logger.info("engine process %d serving on %s", os.getpid(), self.address)
        await stop.wait()
        logger.info("engine process stopping: finishing queued work")
        await self.registry.close(self.settings.drain_timeout_s)
        if self._jobs:
            await asyncio.wait(self._jobs, timeout=1.0)
        watcher.cancel()
        heartbeat.cancel()
        watchdog.stop()
        server.close()
        for writer in list(self._writers.values()):
            writer.close()
        connections = list(self._connections)
        for connection in connections:
            connection.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        self.metrics.process_exited()

    # ------------------------------------------------------------ model statuses
    def _snapshot(self) -> dict[str, tuple[str, str | None, Any]]:
        snapshot: dict[str, tuple[str, str | None, Any]] = {}
        for name, entry in self.registry.entries.items():
            loaded = self.registry.resident.get(name)
            card = ModelCard.of(loaded) if loaded is not None and entry.status == "ready" else None
            snapshot[name] = (entry.status, entry.reason, card)
        return snapshot

    async def _watch_statuses(self) -> None:
        while True:
            current = {name: (e.status, e.reason) for name, e in self.registry.entries.items()}
            if current != {name: value[:2] for name, value in self._statuses.items()}:
                self._statuses = self._snapshot()
                for writer in list(self._writers.values()):
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await ipc.send(writer, ("models", self._statuses))
            await asyncio.sleep(STATUS_POLL_S)

    # ------------------------------------------------------------ one worker's connection
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = next(self._ids)
        self._writers[source] = writer
        this = asyncio.current_task()
        if this is not None:
            self._connections.add(this)
            this.add_done_callback(self._connections.discard)
        cancelled: set[int] = set()
        arenas: set[str] = set()
        try:
            await ipc.send(writer, ("models", self._statuses or self._snapshot()))
            while True:
                message = await ipc.receive(reader)
                if message[0] == "submit":
                    _, job_id, model, wire = message
                    arenas.update(ref.arena for ref, *_ in wire if ref.arena is not None)
                    job = asyncio.get_running_loop().create_task(
                        self._job(writer, source, job_id, model, wire, cancelled)
                    )
                    self._jobs.add(job)
                    job.add_done_callback(self._jobs.discard)
                elif message[0] == "cancel":
                    cancelled.add(message[1])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:  # the engine is stopping: the worker sees the connection end
            pass
        finally:
            del self._writers[source]  # its queued jobs are dropped before compute
            writer.close()
            for name in arenas:
                self.arenas.forget(name)

    async def _job(
        self,
        writer: asyncio.StreamWriter,
        source: int,
        job_id: int,
        model: str,
        wire: list[tuple[Any, ...]],
        cancelled: set[int],
    ) -> None:
        async def gone() -> bool:
            return job_id in cancelled or source not in self._writers

        try:
            # read first: a CUDA input is released by the worker only once it was opened here
            items = [
                BatchItem(
                    image=self.arenas.tensor(ref),
                    options=options,
                    targets=targets,
                    top_k=top_k,
                    normalized=normalized,
                )
                for ref, options, targets, top_k, normalized in wire
            ]
            self.registry.require_ready(model)
            batcher = self.registry.batchers[model]
            outcome = await batcher.submit(items, disconnected=gone, source=source)
            answer: tuple[Any, ...] = (
                "done",
                job_id,
                model,
                [ipc.explanation_to_wire(result) for result in outcome.results],
                outcome.queue_ms,
                outcome.compute_ms,
                outcome.batch_images,
                batcher.queued_images,
            )
        except ServiceError as exc:
            answer = ("failed", job_id, model, exc.code, exc.message, exc.retry_after_s, self._queued(model))
        except Exception as exc:  # never leave a worker waiting
            logger.exception("job %d of model %s failed", job_id, model)
            text = f"{type(exc).__name__}: {exc}"
            answer = ("failed", job_id, model, "compute_failed", text, None, self._queued(model))
        # answered even when cancelled: the worker frees the job's shared memory on the answer
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ipc.send(writer, answer)
        cancelled.discard(job_id)
        ipc.release_unviewed()

    def _queued(self, model: str) -> int:
        batcher = self.registry.batchers.get(model)
        return batcher.queued_images if batcher is not None else 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m app.serving.engine_process SOCKET", file=sys.stderr)
        return 2
    settings = load_settings()
    logging.config.dictConfig(logging_config(settings.log_level.lower(), settings.log_format))
    asyncio.run(_serve_until_stopped(EngineServer(settings, args[0])))
    return 0


async def _serve_until_stopped(server: EngineServer) -> None:
    """Serve until standard input ends: the server process closes it after its workers have drained,
    and it ends by itself when the server process dies. Signals meant for the whole process group
    (Ctrl-C, a container's or service manager's SIGTERM) are left to the server, which drains its
    workers first."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_input() -> None:
        if not os.read(0, 4096):
            loop.remove_reader(0)
            stop.set()

    loop.add_reader(0, on_input)
    await server.serve(stop)


if __name__ == "__main__":
    raise SystemExit(main())
