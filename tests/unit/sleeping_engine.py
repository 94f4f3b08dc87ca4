"""``python -m tests.unit.sleeping_engine SOCKET``: a stand-in for the engine process that ignores
SIGTERM, as the engine does, and exits 0 when its standard input ends."""

from __future__ import annotations

import os
import signal
import sys

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(sys.argv[1], "w") as up:  # the engine's socket, here a file naming who is up
        up.write(str(os.getpid()))
    sys.stdin.buffer.read()
    sys.exit(0)
