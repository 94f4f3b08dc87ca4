"""The service's I/O and compute threads carry their names for the OS (app/serving/threads.py)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from app.serving.threads import COMPUTE_THREAD_NAME, IO_THREAD_NAME
from tests.integration.conftest import running_service, tiny_settings

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _comm() -> str:
    return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()


async def test_the_service_names_its_io_and_compute_threads(tiny_weights):
    async with running_service(tiny_settings(tiny_weights)) as client:
        service = client.app.state.service
        assert service.io_pool.submit(_comm).result() == IO_THREAD_NAME
        (executor,) = service.registry._device_threads.values()
        assert executor.submit(_comm).result() == COMPUTE_THREAD_NAME
