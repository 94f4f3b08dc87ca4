"""``python -m tests.unit.sleeping_engine SOCKET``: a stand-in for the engine process that waits for
SIGTERM and exits 0."""

from __future__ import annotations

import signal
import sys
import time

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    while True:
        time.sleep(0.1)
