"""Many concurrent requests share batches, and every answer reaches the request it belongs to."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import torch
from PIL import Image

from app.engine.maps import normalize_maps
from app.engine.options import CamOptions
from app.serving.prepare import prepare_image
from tests.bad_inputs import encode
from tests.integration.conftest import assert_error, image_bytes, running_service, tiny_settings


def reference(loaded, data: bytes, options: CamOptions | None, top_k: int, settings):
    """The image alone through the engine, prepared as the service with ``settings`` prepares it."""
    prepared = prepare_image(
        data,
        loaded.preprocessor,
        max_pixels=10**8,
        allowed_formats=frozenset({"PNG"}),
        keep_original=False,
        tensor_resize=settings.tensor_resize,
    )
    (result,) = loaded.engine.explain(prepared.tensor[None], options, top_k=top_k)
    return result


def histogram(metrics: str, name: str, model: str) -> dict[str, float]:
    buckets = {}
    for le, value in re.findall(rf'{name}_bucket{{le="([^"]+)",model="{model}"}} ([0-9.e+]+)', metrics):
        buckets[le] = float(value)
    return buckets


async def test_64_concurrent_requests_each_get_their_own_result(tiny_weights):
    settings = tiny_settings(tiny_weights, batch={"max_batch_images": 16, "max_wait_ms": 30})
    async with running_service(settings) as client:
        loaded = client.app.state.service.registry.entries["tiny"].loaded
        requests = []
        for index in range(64):
            data = image_bytes(1000 + index, size=(32 + index % 7, 32 + index % 5))
            kind = "predict" if index % 4 == 0 else "explain"
            options = {"top_k": str(1 + index % 3)}
            if kind == "explain":
                options.update(
                    encodings="json",
                    map_size="grid",
                    kernel="dirac" if index % 3 == 0 else "gaussian",
                    keep_prefix="false" if index % 5 == 0 else "true",
                )
            requests.append((index, data, kind, options))

        async def post(index, data, kind, options):
            response = await client.post(
                f"/v1/models/tiny/{kind}",
                files={"file": (f"{index}.png", data, "image/png")},
                data=options,
                headers={"X-Request-ID": f"req-{index}"},
            )
            return response

        responses = await asyncio.gather(*(post(*request) for request in requests))
        batch_sizes = []
        for (index, data, kind, options), response in zip(requests, responses, strict=True):
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["request_id"] == f"req-{index}" == response.headers["x-request-id"]
            top_k = int(options["top_k"])
            cam = None
            if kind == "explain":
                cam = CamOptions(kernel=options["kernel"], keep_prefix=options["keep_prefix"] == "true")
            alone = reference(loaded, data, cam, top_k, settings)
            image = body["images"][0]
            expected = alone.logits.topk(top_k).indices.tolist()
            assert [p["class_id"] for p in image["predictions"]] == expected, index
            np.testing.assert_allclose(
                [p["logit"] for p in image["predictions"]],
                alone.logits[expected].numpy(),
                rtol=1e-4,
                atol=1e-5,
            )
            if kind == "explain":
                assert [e["class_id"] for e in image["explanations"]] == alone.targets.tolist()
                maps = np.asarray([e["json"] for e in image["explanations"]])
                np.testing.assert_allclose(maps, normalize_maps(alone.score_maps).numpy(), atol=1e-4)
                ranges = np.asarray([e["score_range"] for e in image["explanations"]])
                raw = alone.score_maps.flatten(1)
                np.testing.assert_allclose(ranges[:, 0], raw.min(1).values.numpy(), rtol=1e-4, atol=1e-5)
            else:
                assert "explanations" not in image
            batch_sizes.append(body["timing"]["batch_images"])
        assert max(batch_sizes) > 1

        metrics = (await client.get("/metrics")).text
        buckets = histogram(metrics, "reciprocam_batch_size_images", "tiny")
        batches = buckets["+Inf"]
        assert buckets["1.0"] < batches, "every batch held a single image"
        count = re.search(r'reciprocam_batch_size_images_sum{model="tiny"} ([0-9.e+]+)', metrics)
        assert count is not None and float(count.group(1)) == 64.0  # every image computed exactly once
        assert batches < 64


async def test_injected_failure_fails_only_its_own_request(tiny_weights):
    """The engine fails on any batch holding a white image: that request gets 500, the others their
    correct results, and the service goes on serving."""
    settings = tiny_settings(tiny_weights, batch={"max_batch_images": 16, "max_wait_ms": 50})
    async with running_service(settings) as client:
        loaded = client.app.state.service.registry.entries["tiny"].loaded
        engine = loaded.engine
        real_explain = engine.explain

        def flaky_explain(images, *args, **kwargs):
            if bool((images.flatten(1).min(dim=1).values > 2.0).any()):
                raise RuntimeError("injected failure: poisoned image in batch")
            return real_explain(images, *args, **kwargs)

        engine.explain = flaky_explain  # instance attribute: the batch loop calls it
        try:
            poison = encode(Image.new("RGB", (40, 40), (255, 255, 255)), "PNG")
            datas = [image_bytes(2000 + i) for i in range(12)]
            datas.insert(5, poison)

            async def post(data):
                return await client.post(
                    "/v1/models/tiny/explain",
                    files={"file": ("x.png", data, "image/png")},
                    data={"encodings": "json", "map_size": "grid"},
                )

            responses = await asyncio.gather(*(post(data) for data in datas))
            for position, (data, response) in enumerate(zip(datas, responses, strict=True)):
                if position == 5:
                    error = assert_error(response, 500, "compute_failed")
                    assert "injected failure" in error["message"]
                    continue
                assert response.status_code == 200, response.text
                alone = reference(loaded, data, CamOptions(), 1, settings)
                explanation = response.json()["images"][0]["explanations"][0]
                assert explanation["class_id"] == int(alone.targets[0])
                np.testing.assert_allclose(
                    explanation["json"], normalize_maps(alone.score_maps)[0].numpy(), atol=1e-4
                )
            metrics = (await client.get("/metrics")).text
            assert re.search(r'reciprocam_batch_splits_total{model="tiny"} [1-9]', metrics)
            assert 'reciprocam_image_failures_total{model="tiny"} 1.0' in metrics
            after = await post(image_bytes(3000))
            assert after.status_code == 200
        finally:
            engine.explain = real_explain
        assert torch.is_inference_mode_enabled() is False


async def test_full_queue_answers_503_with_retry_after_and_accepted_requests_succeed(tiny_weights):
    import threading

    # one stream, and one image is under half a batch: it stays in the queue while the first computes
    settings = tiny_settings(
        tiny_weights,
        batch={"max_batch_images": 4, "max_wait_ms": 0, "max_queue_images": 1, "compute_streams": 1},
    )
    async with running_service(settings) as client:
        engine = client.app.state.service.registry.entries["tiny"].loaded.engine
        real_explain = engine.explain
        gate, entered = threading.Event(), threading.Event()

        def gated_explain(*args, **kwargs):
            entered.set()
            gate.wait(timeout=30)
            return real_explain(*args, **kwargs)

        engine.explain = gated_explain
        try:

            async def post(seed):
                return await client.post(
                    "/v1/models/tiny/predict",
                    content=image_bytes(seed),
                    headers={"content-type": "image/png"},
                )

            computing = asyncio.ensure_future(post(1))
            await asyncio.to_thread(entered.wait, 10)
            queued = asyncio.ensure_future(post(2))
            service = client.app.state.service
            batcher = service.registry.entries["tiny"].batcher
            for _ in range(500):
                if batcher.queued_images == 1:
                    break
                await asyncio.sleep(0.01)
            refused = await post(3)
            assert_error(refused, 503, "queue_full")
            assert refused.headers["retry-after"] == "1"
            gate.set()
            assert (await computing).status_code == 200
            assert (await queued).status_code == 200
            assert (await post(4)).status_code == 200
        finally:
            gate.set()
            engine.explain = real_explain
        metrics = (await client.get("/metrics")).text
        assert 'reciprocam_rejections_total{model="tiny",reason="queue_full"} 1.0' in metrics


async def test_out_of_memory_batches_are_split_until_they_fit(tiny_weights):
    """A simulated CUDA out-of-memory error for any batch of more than 2 images: the batches are
    split and retried, every request gets its correct result, and the metrics count the splits.
    An image that runs out of memory even alone gets 503 + Retry-After; the others are unaffected."""
    settings = tiny_settings(tiny_weights, batch={"max_batch_images": 16, "max_wait_ms": 50})
    async with running_service(settings) as client:
        loaded = client.app.state.service.registry.entries["tiny"].loaded
        engine = loaded.engine
        real_explain = engine.explain
        calls: list[int] = []
        raised: list[int] = []

        def tight_memory(images, *args, **kwargs):
            calls.append(images.shape[0])
            if images.shape[0] > 2 or bool((images.flatten(1).min(dim=1).values > 2.0).any()):
                raised.append(images.shape[0])
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            return real_explain(images, *args, **kwargs)

        engine.explain = tight_memory
        try:
            huge = encode(Image.new("RGB", (40, 40), (255, 255, 255)), "PNG")
            datas = [image_bytes(4000 + i) for i in range(11)]
            datas.insert(3, huge)

            async def post(data):
                return await client.post(
                    "/v1/models/tiny/predict",
                    files={"file": ("x.png", data, "image/png")},
                    data={"top_k": "2"},
                )

            responses = await asyncio.gather(*(post(data) for data in datas))
            assert max(calls) > 2, "no batch was large enough to fail"
            for position, (data, response) in enumerate(zip(datas, responses, strict=True)):
                if position == 3:
                    error = assert_error(response, 503, "out_of_memory")
                    assert response.headers["retry-after"] == "1"
                    assert "out of memory" in error["message"]
                    continue
                assert response.status_code == 200, response.text
                alone = reference(loaded, data, None, 2, settings)
                predictions = response.json()["images"][0]["predictions"]
                assert [p["class_id"] for p in predictions] == alone.logits.topk(2).indices.tolist()
                assert response.json()["timing"]["batch_images"] > 1  # they were batched, then split
            metrics = (await client.get("/metrics")).text
            splits = re.search(r'reciprocam_batch_splits_total{model="tiny"} ([0-9.]+)', metrics)
            ooms = re.search(r'reciprocam_out_of_memory_total{model="tiny"} ([0-9.]+)', metrics)
            assert splits is not None and float(splits.group(1)) >= 1
            assert ooms is not None and float(ooms.group(1)) == len(raised)
            assert raised.count(1) == 1  # the huge image, alone
            assert 'reciprocam_image_failures_total{model="tiny"} 1.0' in metrics
            assert (await post(image_bytes(4100))).status_code == 200
        finally:
            engine.explain = real_explain
