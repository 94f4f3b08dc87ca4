"""``python -m tests.e2e.engine SOCKET``: the shared engine process of ``tests.e2e.server``, slowed
by the same delay file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from app.serving.engine_process import main
from tests.e2e.server import DELAY_FILE_ENV, install_delay

if __name__ == "__main__":
    delay_file = os.environ.get(DELAY_FILE_ENV)
    if delay_file:
        install_delay(Path(delay_file))
    sys.exit(main(sys.argv[1:]))
