"""Small requests for a model on the CPU are decoded and rendered on the event loop's thread; larger
ones, and every request with ``inline_io_max_pixels: 0``, in the I/O threads. Either way the answer
is the same, errors included."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

import app.serving.pipeline as pipeline_module
import app.serving.service as service_module
from app.config import DEFAULT_INLINE_IO_PIXELS, Settings
from app.serving.service import Service
from tests.integration.conftest import image_bytes, running_service, tiny_settings

IMAGE = (48, 40)  # the posted images' (width, height)
INPUT = 32 * 32  # the tiny model's input: its maps at map_size=input


@pytest.fixture
def threads_of(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """The thread each header read, decode and render ran on."""
    seen: dict[str, list[int]] = {"headers": [], "decode": [], "render": []}

    def recording(name: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            seen[name].append(threading.get_ident())
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(pipeline_module, "read_headers", recording("headers", pipeline_module.read_headers))
    monkeypatch.setattr(service_module, "prepare_image", recording("decode", service_module.prepare_image))
    monkeypatch.setattr(pipeline_module, "render_image", recording("render", pipeline_module.render_image))
    return seen


async def _explain(client: Any, images: list[bytes], **fields: str) -> Any:
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return await client.post(
        "/v1/models/tiny/explain", files=files, data={"encodings": "heatmap,png", "top_k": "2", **fields}
    )


def _without_timings(body: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in body.items() if key not in ("timing", "request_id")}


def test_the_rule_follows_the_model_device_and_the_setting():
    service = Service(Settings(models=[]))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert service.inline_io(cpu, DEFAULT_INLINE_IO_PIXELS)
    assert not service.inline_io(cpu, DEFAULT_INLINE_IO_PIXELS + 1)
    assert not service.inline_io(cuda, 1)  # the host's cores are free: decode in parallel threads
    assert Service(Settings(models=[], inline_io_max_pixels=0)).inline_io(cpu, 0) is False
    explicit = Service(Settings(models=[], inline_io_max_pixels=500))
    assert explicit.inline_io(cuda, 500) and not explicit.inline_io(cuda, 501)
    service.io_pool.shutdown()
    explicit.io_pool.shutdown()


async def test_a_small_request_stays_on_the_event_loop(tiny_weights, threads_of):
    loop_thread = threading.get_ident()
    async with running_service(tiny_settings(tiny_weights)) as client:
        response = await _explain(client, [image_bytes(1, IMAGE), image_bytes(2, IMAGE)], map_size="original")
        assert response.status_code == 200, response.text
    assert threads_of["headers"] == [loop_thread]
    assert threads_of["decode"] == [loop_thread] * 2
    assert threads_of["render"] == [loop_thread] * 2


@pytest.mark.parametrize("map_size, map_pixels", [("original", IMAGE[0] * IMAGE[1]), ("input", INPUT)])
async def test_the_limit_counts_image_and_map_pixels(tiny_weights, threads_of, map_size, map_pixels):
    """Two images and two explained classes each: 2 x image + 2 x 2 x map pixels."""
    pixels = 2 * IMAGE[0] * IMAGE[1] + 2 * 2 * map_pixels
    loop_thread = threading.get_ident()
    images = [image_bytes(3, IMAGE), image_bytes(4, IMAGE)]
    for limit, inline in ((pixels, True), (pixels - 1, False)):
        for seen in threads_of.values():
            seen.clear()
        async with running_service(tiny_settings(tiny_weights, inline_io_max_pixels=limit)) as client:
            response = await _explain(client, images, map_size=map_size)
            assert response.status_code == 200, response.text
        ran_here = [ident == loop_thread for ident in threads_of["decode"] + threads_of["render"]]
        assert ran_here == [inline] * 4, (limit, threads_of)
        # headers are read here when the files are no more bytes than the limit
        headers_here = sum(len(data) for data in images) <= limit
        assert [ident == loop_thread for ident in threads_of["headers"]] == [headers_here]


async def test_answers_and_errors_are_the_same_on_either_thread(tiny_weights, threads_of):
    images = [image_bytes(5, IMAGE, fmt="JPEG"), image_bytes(6, (64, 20))]
    corrupt = image_bytes(7, IMAGE)[:60]
    answers = []
    for limit in (None, 0):
        async with running_service(tiny_settings(tiny_weights, inline_io_max_pixels=limit)) as client:
            ok = await _explain(client, images, map_size="original")
            grid = await _explain(client, images, map_size="grid", encodings="json")
            bad = await _explain(client, [images[0], corrupt])
            predicted = await client.post(
                "/v1/models/tiny/predict", files={"file": ("a.png", images[1], "image/png")}
            )
        assert ok.status_code == grid.status_code == predicted.status_code == 200
        assert bad.status_code == 400
        answers.append(
            (
                _without_timings(ok.json()),
                _without_timings(grid.json()),
                bad.json()["error"]["code"],
                bad.json()["error"]["message"],
                _without_timings(predicted.json()),
            )
        )
    loop_thread = threading.get_ident()
    assert loop_thread in threads_of["decode"] and any(i != loop_thread for i in threads_of["decode"])
    assert answers[0] == answers[1]
    assert answers[0][3].startswith("image 1: "), answers[0][3]  # the failing image is named


@pytest.mark.parametrize("limit", [None, 0])
async def test_each_header_is_read_once(tiny_weights, monkeypatch, limit):
    """The header read to size a request is the one the decode stage uses: one read per image, on
    either thread."""
    import app.serving.device_decode as decode_module
    import app.serving.prepare as prepare_module

    reads: list[int] = []
    real = decode_module.read_header

    def counting(data: bytes, **kwargs: Any) -> Any:
        reads.append(len(data))
        return real(data, **kwargs)

    monkeypatch.setattr(prepare_module, "read_header", counting)
    monkeypatch.setattr(decode_module, "read_header", counting)
    images = [image_bytes(8, IMAGE, fmt="JPEG"), image_bytes(9, (64, 20))]
    async with running_service(tiny_settings(tiny_weights, inline_io_max_pixels=limit)) as client:
        response = await _explain(client, images, map_size="original")
        assert response.status_code == 200, response.text
    assert sorted(reads) == sorted(len(data) for data in images)
