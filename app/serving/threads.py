"""Names of the service's own threads as the operating system shows them (``top -H``, ``ps -L``,
``/proc/<pid>/task/*/comm``), so that an operator, and the load test, can tell the model's CPU from
the rest. Threads that torch starts from a compute thread inherit its name."""

from __future__ import annotations

import contextlib
import ctypes
import sys

COMPUTE_THREAD_NAME = "rc-compute"
IO_THREAD_NAME = "rc-io"
_PR_SET_NAME = 15


def name_this_thread(name: str) -> None:
    """Give the calling thread ``name`` (at most 15 bytes) for the OS; a no-op off Linux."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # no prctl: the name is only a convenience
        ctypes.CDLL(None).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
