"""Record the service's answers to the cases: `python -m tests.replay.record` (from the repository root).

Run it only to change the recorded behaviour on purpose; the replay test compares against it.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

import torch

from app.main import create_app
from tests.integration.conftest import serving
from tests.replay.cases import build_cases
from tests.replay.replay import RECORDING, THREADS, answer, replay_settings


async def record() -> None:
    cases = build_cases()
    with tempfile.TemporaryDirectory() as tmp:
        settings, tiny = replay_settings(Path(tmp))
        async with serving(create_app(settings)) as client:
            entries = [{"request": case, "response": await answer(client, case, tiny)} for case in cases]
    RECORDING.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(entries)} requests in {RECORDING}")


if __name__ == "__main__":
    torch.set_num_threads(THREADS)
    asyncio.run(record())
