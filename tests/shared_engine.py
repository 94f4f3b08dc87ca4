"""The shared engine process's server, run in a thread of the test process: HTTP workers created with
``RECIPROCAM_ENGINE_SOCKET`` pointing at it compute there, as in ``serve --workers N``."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import Settings
from app.config_errors import ENGINE_SOCKET_ENV
from app.serving.engine_process import EngineServer


class EngineThread:
    def __init__(self, settings: Settings, address: str) -> None:
        self.hangs: list[str] = []  # what the watchdog reported (in a real engine process: its exit)
        self.server = EngineServer(settings, address, on_hung=self.hangs.append)
        self.address = address
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._stop = asyncio.Event()
            self._started.set()
            await self.server.serve(self._stop)

        self._loop.run_until_complete(main())

    def start(self) -> None:
        self._thread.start()
        self._started.wait(30)

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)


@contextlib.contextmanager
def engine_thread(
    settings: Settings, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[EngineThread]:
    """An engine serving ``settings``' models; apps created inside use it."""
    engine = EngineThread(settings, str(directory / "engine.sock"))
    engine.start()
    monkeypatch.setenv(ENGINE_SOCKET_ENV, engine.address)
    try:
        yield engine
    finally:
        monkeypatch.delenv(ENGINE_SOCKET_ENV)
        engine.stop()
