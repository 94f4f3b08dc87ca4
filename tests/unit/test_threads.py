"""The service names its compute and I/O threads for the OS, where operators and the load test see them."""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app.serving.threads import COMPUTE_THREAD_NAME, name_this_thread

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _comm() -> str:
    return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()


def test_pool_threads_carry_the_name_and_others_do_not():
    with ThreadPoolExecutor(1, initializer=name_this_thread, initargs=(COMPUTE_THREAD_NAME,)) as pool:
        assert pool.submit(_comm).result() == COMPUTE_THREAD_NAME
    assert _comm() != COMPUTE_THREAD_NAME
    with ThreadPoolExecutor(1, initializer=name_this_thread, initargs=("a-name-longer-than-15",)) as pool:
        assert pool.submit(_comm).result() == "a-name-longer-t"  # the kernel keeps 15 bytes
