"""``python -m tests.e2e.server [serve options]``: the real ``serve`` command, with a model that can be
slowed down so that tests can hold work in the queue.

``RECIPROCAM_TEST_DELAY_FILE`` names a file holding a number of seconds; every batch sleeps that long
on the device thread before it computes. The file is read for each batch, so a test can change the
delay while the server runs.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.cli import main
from app.serving import registry, supervisor
from app.serving.batch import BatchItem, run_engine_batch

DELAY_FILE_ENV = "RECIPROCAM_TEST_DELAY_FILE"


def _delay_s(path: Path) -> float:
    try:
        return max(0.0, float(path.read_text().strip() or 0))
    except (OSError, ValueError):
        return 0.0


def install_delay(path: Path) -> None:
    def slowed(engine: object, items: Sequence[BatchItem], *args: Any) -> list:  # type: ignore[type-arg]
        time.sleep(_delay_s(path))
        return run_engine_batch(engine, items, *args)

    registry.run_engine_batch = slowed  # type: ignore[assignment]


if __name__ == "__main__":
    delay_file = os.environ.get(DELAY_FILE_ENV)
    if delay_file:
        install_delay(Path(delay_file))
        supervisor.ENGINE_MODULE = "tests.e2e.engine"  # the shared engine process is slowed too
    sys.exit(main(["serve", *sys.argv[1:]]))
