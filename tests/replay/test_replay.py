"""The recorded requests get the recorded answers (request ids and timings aside)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app.main import create_app
from tests.integration.conftest import serving
from tests.replay.replay import RECORDING, THREADS, answer, replay_settings, same_pictures
from tests.shared_engine import engine_thread

ENTRIES = json.loads(RECORDING.read_text())


def test_recording_covers_both_protocols_and_errors() -> None:
    paths = [entry["request"]["path"] for entry in ENTRIES]
    statuses = [entry["response"]["status"] for entry in ENTRIES]
    assert len(ENTRIES) >= 60
    assert sum(path.startswith("/v1/") for path in paths) >= 30
    assert sum(path.startswith("/v2") for path in paths) >= 20
    assert sum(status >= 400 for status in statuses) >= 20


def test_pictures_compare_by_their_pixels_not_their_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    import numpy as np

    from app.serving import png

    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
    fast = base64.b64encode(png.encode_png(pixels)).decode()
    monkeypatch.setattr(png, "_isal", None)
    by_zlib = base64.b64encode(png.encode_png(pixels, compress_level=9)).decode()
    pixels[3, 4] += 1
    changed = base64.b64encode(png.encode_png(pixels)).decode()
    assert fast != by_zlib and same_pictures({"png": [fast]}) == same_pictures({"png": [by_zlib]})
    assert same_pictures({"png": [fast]}) != same_pictures({"png": [changed]})


@pytest.fixture
def recorded_threads() -> Iterator[None]:
    """Other tests (and services started with ``torch_threads``) may leave another thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


async def test_replayed_answers_equal_the_recording(tmp_path: Path, recorded_threads: None) -> None:
    settings, tiny = replay_settings(tmp_path)
    differences = []
    async with serving(create_app(settings)) as client:
        for entry in ENTRIES:
            got = await answer(client, entry["request"], tiny)
            if same_pictures(got) != same_pictures(entry["response"]):
                differences.append(entry["request"]["name"])
    assert not differences, f"answers changed: {differences}"


async def test_a_shared_engine_gives_the_recorded_answers(
    tmp_path: Path, recorded_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same requests through an HTTP worker of a shared-engine server (``serve --workers N``):
    the engine computes in another event loop, the worker decodes and renders."""
    settings, tiny = replay_settings(tmp_path)
    differences = []
    with engine_thread(settings, tmp_path, monkeypatch):
        async with serving(create_app(settings)) as client:
            for entry in ENTRIES:
                got = await answer(client, entry["request"], tiny)
                if same_pictures(got) != same_pictures(entry["response"]):
                    differences.append((entry["request"]["name"], got, entry["response"]))
    assert not differences, f"answers changed: {[name for name, *_ in differences]}\n{differences[:1]}"
