"""The HTTP API in process: endpoints, encodings, options, status, request ids, OpenAPI."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from app.api.v1.schemas import ExplainResponse, ModelInfo, PredictResponse
from app.engine.maps import normalize_maps
from app.engine.options import CamOptions
from app.serving.prepare import PreparedImage, prepare_image
from app.serving.render import colormap_lut
from tests.helpers import jpeg_bytes, photo_like
from tests.integration.conftest import (
    LABELS,
    assert_error,
    image_bytes,
    running_service,
    tiny_settings,
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def prepared_as_served(client, data: bytes) -> PreparedImage:
    """``data`` decoded and preprocessed in this process with the running service's own settings."""
    service = client.app.state.service
    settings = service.settings
    return prepare_image(
        data,
        service.registry.entries["tiny"].loaded.preprocessor,
        max_pixels=10**8,
        allowed_formats=frozenset({"PNG", "JPEG"}),
        keep_original=False,
        reduced_jpeg_decode=settings.reduced_jpeg_decode,
        two_step_resize=settings.two_step_resize,
        window_resize=settings.window_resize,
        tensor_resize=settings.tensor_resize,
    )


def engine_alone(client, data: bytes, options: CamOptions | None, **kwargs):
    """The same image through the engine alone (batch of one), as a reference."""
    loaded = client.app.state.service.registry.entries["tiny"].loaded
    (result,) = loaded.engine.explain(prepared_as_served(client, data).tensor[None], options, **kwargs)
    return result


async def test_health_and_models(client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "models": [{"name": "tiny", "status": "ready", "reason": None}],
    }
    listing = (await client.get("/v1/models")).json()["models"]
    assert [model["name"] for model in listing] == ["tiny"]
    info = ModelInfo.model_validate((await client.get("/v1/models/tiny")).json())
    assert info.status == "ready" and info.arch == "deit_tiny_patch16_224"
    assert info.input_size == [32, 32] and info.grid == [4, 4] and info.num_classes == 7
    assert info.labels == LABELS and info.path in ("reduced", "reference")
    assert_error(await client.get("/v1/models/nope"), 404, "model_not_found")


async def test_predict_same_answer_from_multipart_json_and_raw_body(client):
    data = image_bytes(1)
    multipart = await client.post(
        "/v1/models/tiny/predict", files={"file": ("a.png", data, "image/png")}, data={"top_k": "3"}
    )
    as_json = await client.post("/v1/models/tiny/predict", json={"images": [{"data": b64(data)}], "top_k": 3})
    data_url = await client.post(
        "/v1/models/tiny/predict",
        json={"images": [{"data": "data:image/png;base64," + b64(data)}], "top_k": 3},
    )
    raw = await client.post(
        "/v1/models/tiny/predict?top_k=3", content=data, headers={"content-type": "image/png"}
    )
    bodies = [PredictResponse.model_validate(r.json()) for r in (multipart, as_json, data_url, raw)]
    reference = engine_alone(client, data, None)
    expected = reference.logits.topk(3).indices.tolist()
    for body in bodies:
        predictions = body.images[0].predictions
        assert [p.class_id for p in predictions] == expected
        assert [p.label for p in predictions] == [LABELS[i] for i in expected]
        np.testing.assert_allclose(
            [p.probability for p in predictions],
            reference.probabilities[expected].numpy(),
            rtol=1e-4,
            atol=1e-6,
        )
        assert body.images[0].explanations is None
        assert body.model == "tiny" and body.images[0].width == 48 and body.images[0].height == 40
    assert bodies[0].request_id == multipart.headers["x-request-id"]
    assert bodies[0].timing.total_ms >= bodies[0].timing.compute_ms >= 0


async def test_explain_maps_match_the_engine_in_every_encoding(client):
    data = image_bytes(2, size=(50, 30))
    response = await client.post(
        "/v1/models/tiny/explain",
        files={"file": ("a.png", data, "image/png")},
        data={"top_k": "2", "encodings": ["png", "heatmap", "overlay", "json"], "map_size": "grid"},
    )
    assert response.status_code == 200, response.text
    body = ExplainResponse.model_validate(response.json())
    reference = engine_alone(client, data, CamOptions(), top_k=2)
    expected_maps = normalize_maps(reference.score_maps)
    explanations = body.images[0].explanations
    assert [e.class_id for e in explanations] == reference.targets.tolist()
    assert [p.class_id for p in body.images[0].predictions] == reference.targets.tolist()
    for position, explanation in enumerate(explanations):
        assert explanation.grid == [4, 4] and explanation.size == [4, 4]
        raw = reference.score_maps[position]
        np.testing.assert_allclose(explanation.score_range, [raw.min(), raw.max()], rtol=1e-4, atol=1e-5)
        values = np.asarray(explanation.map_values)
        np.testing.assert_allclose(values, expected_maps[position].numpy(), atol=1e-4)
        gray = np.asarray(Image.open(io.BytesIO(base64.b64decode(explanation.png))))
        assert gray.shape == (4, 4) and gray.dtype == np.uint8
        assert int(gray.max()) == 255 and int(gray.min()) == 0
        heat = Image.open(io.BytesIO(base64.b64decode(explanation.heatmap)))
        # a palette PNG: the indices are the grayscale map, the palette the colour map
        assert heat.mode == "P" and heat.size == (4, 4)
        np.testing.assert_array_equal(np.asarray(heat), gray)
        np.testing.assert_array_equal(np.asarray(heat.convert("RGB")), colormap_lut("jet")[gray])
        overlay = Image.open(io.BytesIO(base64.b64decode(explanation.overlay)))
        assert overlay.mode == "RGB" and overlay.size == (32, 32)  # grid overlays are drawn on the input


async def test_map_sizes_and_explicit_targets(client):
    data = image_bytes(3, size=(60, 45))
    for map_size, expected_size in (("input", [32, 32]), ("original", [45, 60])):
        response = await client.post(
            "/v1/models/tiny/explain",
            json={
                "images": [{"data": b64(data)}],
                "targets": [6, 0, 3],
                "map_size": map_size,
                "encodings": ["json", "overlay"],
                "colormap": "viridis",
                "opacity": 0.3,
            },
        )
        assert response.status_code == 200, response.text
        body = ExplainResponse.model_validate(response.json())
        explanations = body.images[0].explanations
        assert [e.class_id for e in explanations] == [6, 0, 3]
        assert [e.label for e in explanations] == ["class_6", "class_0", "class_3"]
        assert len(body.images[0].predictions) == 1  # top_k defaults to 1
        for explanation in explanations:
            assert explanation.size == expected_size
            values = np.asarray(explanation.map_values)
            assert values.shape == tuple(expected_size)
            assert values.min() >= 0.0 and values.max() <= 1.0
            np.testing.assert_array_equal(values, values.round(6))  # six decimals at most
            overlay = Image.open(io.BytesIO(base64.b64decode(explanation.overlay)))
            assert overlay.size == (expected_size[1], expected_size[0])
            assert explanation.heatmap is None and explanation.png is None


async def test_explain_options_change_the_maps(client):
    data = image_bytes(4)

    async def grid_map(**options):
        response = await client.post(
            "/v1/models/tiny/explain",
            json={
                "images": [{"data": b64(data)}],
                "targets": [2],
                "encodings": ["json"],
                "map_size": "grid",
                **options,
            },
        )
        assert response.status_code == 200, response.text
        return response.json()["images"][0]["explanations"][0]

    default = await grid_map()
    for options, cam in (
        ({"kernel": "dirac"}, CamOptions(kernel="dirac")),
        ({"keep_prefix": False}, CamOptions(keep_prefix=False)),
        ({"score": "probability"}, CamOptions(score="probability")),
        ({"target_block": 1}, CamOptions(target_block=1)),
    ):
        explained = await grid_map(**options)
        reference = engine_alone(client, data, cam, targets=[[2]])
        np.testing.assert_allclose(
            explained["json"], normalize_maps(reference.score_maps)[0].numpy(), atol=1e-4
        )
        assert explained["score_range"] != default["score_range"], options


async def test_several_images_in_one_request(client):
    images = [image_bytes(10 + i, size=(30 + 5 * i, 40)) for i in range(3)]
    response = await client.post(
        "/v1/models/tiny/explain",
        files=[("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)],
        data={"encodings": "json", "map_size": "grid"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [image["index"] for image in body["images"]] == [0, 1, 2]
    assert [image["width"] for image in body["images"]] == [30, 35, 40]
    for data, image in zip(images, body["images"], strict=True):
        reference = engine_alone(client, data, CamOptions(), top_k=1)
        assert image["predictions"][0]["class_id"] == int(reference.targets[0])
        np.testing.assert_allclose(
            image["explanations"][0]["json"], normalize_maps(reference.score_maps)[0].numpy(), atol=1e-4
        )
    assert body["timing"]["batch_images"] >= 3


async def test_request_id_is_accepted_generated_and_returned(client):
    given = await client.get("/healthz", headers={"X-Request-ID": "client-id.42"})
    assert given.headers["x-request-id"] == "client-id.42"
    generated = await client.get("/healthz")
    assert len(generated.headers["x-request-id"]) >= 16
    hostile = await client.get("/healthz", headers={"X-Request-ID": "x" * 500})
    assert hostile.headers["x-request-id"] != "x" * 500
    error = assert_error(await client.get("/v1/models/none", headers={"X-Request-ID": "abc-123"}), 404)
    assert error["request_id"] == "abc-123"
    explained = await client.post(
        "/v1/models/tiny/predict",
        content=image_bytes(5),
        headers={"content-type": "image/png", "X-Request-ID": "req-7"},
    )
    assert explained.json()["request_id"] == "req-7" == explained.headers["x-request-id"]


async def test_metrics_report_requests_batches_and_queue(client):
    await client.post(
        "/v1/models/tiny/predict", content=image_bytes(6), headers={"content-type": "image/png"}
    )
    await client.get("/v1/models/unknown")
    text = (await client.get("/metrics")).text
    assert (
        'reciprocam_http_requests_total{method="POST",route="/v1/models/{name}/predict",status="200"} 1.0'
        in text
    )
    assert 'reciprocam_http_requests_total{method="GET",route="/v1/models/{name}",status="404"} 1.0' in text
    assert 'reciprocam_batch_size_images_count{model="tiny"}' in text
    assert 'reciprocam_queue_wait_seconds_count{model="tiny"}' in text
    assert 'reciprocam_queue_depth_images{model="tiny"} 0.0' in text
    assert 'reciprocam_images_total{kind="predict",model="tiny"} 1.0' in text
    assert 'reciprocam_model_ready{model="tiny"} 1.0' in text
    assert "reciprocam_http_request_duration_seconds_bucket" in text


async def test_draining_turns_readiness_off_but_keeps_serving(client):
    service = client.app.state.service
    service.begin_drain()
    ready = await client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert (await client.get("/healthz")).status_code == 200
    response = await client.post(
        "/v1/models/tiny/predict", content=image_bytes(7), headers={"content-type": "image/png"}
    )
    assert response.status_code == 200


async def test_unavailable_model_is_reported_and_others_serve(tiny_weights, tmp_path):
    settings = tiny_settings(
        tiny_weights,
        models=[
            {"name": "tiny", "weights": str(tiny_weights)},
            {"name": "missing", "weights": str(tmp_path / "absent.safetensors")},
            {"name": "broken", "arch": "not_a_timm_model", "weights": "random:0"},
            {"name": "off", "weights": str(tiny_weights), "enabled": False},
        ],
    )
    async with running_service(settings) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        statuses = {m["name"]: m["status"] for m in ready.json()["models"]}
        assert statuses == {
            "tiny": "ready",
            "missing": "unavailable",
            "broken": "unavailable",
            "off": "disabled",
        }
        listing = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
        assert "does not exist" in listing["missing"]["reason"]
        assert "not_a_timm_model" in listing["broken"]["reason"]
        for name in ("missing", "broken", "off"):
            error = assert_error(
                await client.post(
                    f"/v1/models/{name}/explain",
                    content=image_bytes(1),
                    headers={"content-type": "image/png"},
                ),
                503,
                "model_unavailable",
            )
            assert listing[name]["reason"] in error["message"]
        good = await client.post(
            "/v1/models/tiny/explain", content=image_bytes(1), headers={"content-type": "image/png"}
        )
        assert good.status_code == 200
        assert 'reciprocam_model_ready{model="missing"} 0.0' in (await client.get("/metrics")).text


async def test_no_loadable_model_means_not_ready(tmp_path):
    settings = tiny_settings(tmp_path, models=[{"name": "missing", "weights": str(tmp_path / "none.pth")}])
    async with running_service(settings) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
        assert (await client.get("/healthz")).status_code == 200


async def test_readiness_waits_for_loading(tiny_weights, monkeypatch):
    import threading

    from app.serving.registry import ModelRegistry

    release = threading.Event()
    original = ModelRegistry._load_blocking

    def slow_load(self, model_settings):
        release.wait(timeout=30)
        return original(self, model_settings)

    monkeypatch.setattr(ModelRegistry, "_load_blocking", slow_load)
    async with running_service(tiny_settings(tiny_weights), wait_ready=False) as client:
        loading = await client.get("/readyz")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        busy = assert_error(
            await client.post(
                "/v1/models/tiny/predict", content=image_bytes(1), headers={"content-type": "image/png"}
            ),
            503,
            "model_loading",
        )
        assert busy
        release.set()
        from tests.integration.conftest import wait_until_settled

        assert (await wait_until_settled(client)).status_code == 200


async def test_openapi_documents_both_bodies_and_error_shape(client):
    schema = (await client.get("/openapi.json")).json()
    explain = schema["paths"]["/v1/models/{name}/explain"]["post"]
    content = explain["requestBody"]["content"]
    assert {"multipart/form-data", "application/json", "image/*"} <= set(content)
    form = content["multipart/form-data"]["schema"]["properties"]
    assert {"files", "top_k", "targets", "kernel", "encodings", "map_size", "colormap", "opacity"} <= set(
        form
    )
    components = schema["components"]["schemas"]
    assert "ExplainJsonRequest" in components and "ImageData" in components
    assert components["ExplainJsonRequest"]["examples"]
    assert "ExplainResponse" in components and components["ExplainResponse"]["examples"]
    assert explain["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "ErrorResponse"
    )
    assert "json" in components["Explanation"]["properties"]


def test_tiny_png_example_decodes():
    from app.api.v1.schemas import _TINY_PNG
    from app.serving.images import decode_image

    assert decode_image(base64.b64decode(_TINY_PNG)).size == (1, 1)


def test_prepare_image_keeps_input_pixels():
    from app.engine.preprocess import DataConfig, Preprocessor

    prepared = prepare_image(
        image_bytes(9, size=(64, 48)),
        Preprocessor(DataConfig(input_size=(32, 32))),
        max_pixels=10**6,
        allowed_formats=frozenset({"PNG"}),
        keep_original=True,
    )
    assert prepared.tensor.shape == (3, 32, 32) and prepared.input_pixels.shape == (32, 32, 3)
    assert prepared.original.shape == (48, 64, 3) and prepared.original_size == (64, 48)
    assert torch.isfinite(prepared.tensor).all()


async def test_camera_sized_jpeg_is_decoded_reduced_and_answered_at_its_full_size(tiny_weights):
    """With reduced JPEG decoding, two-step resizing and window resizing (the defaults) a large photo
    is explained from a reduced decode, yet sizes and maps refer to the full image; with any of them
    switched off, the service follows that setting, as the in-process reference with the same flags
    shows."""
    data = jpeg_bytes(photo_like(1280, 960, seed=7, cell=40, noise=20))
    logits = {}
    for reduced, two_step, window in (
        (True, True, True),
        (False, False, False),
        (False, True, False),
        (False, False, True),
    ):
        settings = tiny_settings(
            tiny_weights,
            reduced_jpeg_decode=reduced,
            two_step_resize=two_step,
            window_resize=window,
            tensor_resize=False,  # the shortcuts of Pillow's resize
        )
        async with running_service(settings) as client:
            reference = engine_alone(client, data, CamOptions(), targets=[[2]])
            response = await client.post(
                "/v1/models/tiny/explain",
                files={"files": ("photo.jpg", data, "image/jpeg")},
                data={"targets": "2", "encodings": "json,png", "map_size": "original"},
            )
            assert response.status_code == 200, response.text
            image = response.json()["images"][0]
            assert (image["width"], image["height"]) == (1280, 960)
            explanation = image["explanations"][0]
            assert explanation["size"] == [960, 1280]
            assert Image.open(io.BytesIO(base64.b64decode(explanation["png"]))).size == (1280, 960)
            assert explanation["score_range"] == pytest.approx(
                [float(reference.score_maps.min()), float(reference.score_maps.max())], abs=1e-5
            )
            served = {p["class_id"]: p["logit"] for p in image["predictions"]}
            for class_id, logit in served.items():
                assert logit == pytest.approx(float(reference.logits[class_id]), abs=1e-5)
            logits[reduced, two_step, window] = served
    # each shortcut gives (slightly) different inputs from the exact decode and resize
    exact = logits[False, False, False]
    assert all(served != exact for flags, served in logits.items() if any(flags[:2])), logits


async def _predicted_as_served(settings, data: bytes) -> tuple[dict[int, float], torch.Tensor]:
    """The service's logits for ``data`` (each checked against the in-process reference prepared
    with the same settings), and that reference's model input."""
    async with running_service(settings) as client:
        loaded = client.app.state.service.registry.entries["tiny"].loaded
        prepared = prepared_as_served(client, data)
        reference = loaded.engine.predict(prepared.tensor[None])[0]
        response = await client.post(
            "/v1/models/tiny/predict",
            files={"files": ("photo.png", data, "image/png")},
            data={"top_k": str(len(LABELS))},
        )
        assert response.status_code == 200, response.text
        predictions = response.json()["images"][0]["predictions"]
        served = {p["class_id"]: p["logit"] for p in predictions}
        for class_id, logit in served.items():
            assert logit == pytest.approx(float(reference[class_id]), abs=1e-5)
        return served, prepared.pixels


def _portrait_png() -> bytes:
    buffer = io.BytesIO()
    photo_like(45, 60, seed=1, cell=8, noise=20).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_window_resize_setting_picks_how_the_service_resizes(tiny_weights):
    """A portrait photo whose window resize differs from resizing it whole: with `window_resize` on
    (and Pillow resizing: `tensor_resize` off) the service's logits are those of the window path,
    with it off those of timm's exact resize-then-crop, each as the in-process reference with the
    same flag computes them."""
    data = _portrait_png()
    window, _ = await _predicted_as_served(
        tiny_settings(tiny_weights, window_resize=True, tensor_resize=False), data
    )
    whole, _ = await _predicted_as_served(
        tiny_settings(tiny_weights, window_resize=False, tensor_resize=False), data
    )
    assert window != whole


async def test_tensor_resize_setting_picks_how_the_service_resizes(tiny_weights):
    """With `tensor_resize` on, the service resizes with torch's kernels: its logits are those of the
    in-process reference with the same flag, and differ from Pillow's exact resize (a few of this
    image's pixels differ by a level)."""
    data = _portrait_png()
    torch_resized, torch_input = await _predicted_as_served(
        tiny_settings(tiny_weights, tensor_resize=True), data
    )
    pillow_resized, pillow_input = await _predicted_as_served(
        tiny_settings(tiny_weights, tensor_resize=False), data
    )
    difference = (torch_input.int() - pillow_input.int()).abs()
    assert int(difference.max()) == 1 and int((difference > 0).sum()) > 0
    assert torch_resized != pillow_resized


async def test_exif_rotated_image_is_answered_upright_with_an_overlay_on_the_original(client):
    """Stored landscape, EXIF says portrait: sizes, the original-size map and the overlay on the
    posted image are all upright (the overlay path keeps the original and decodes it whole)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=exif)
    response = await client.post(
        "/v1/models/tiny/explain",
        files={"files": ("turned.png", buffer.getvalue(), "image/png")},
        data={"encodings": "overlay,json", "map_size": "original"},
    )
    assert response.status_code == 200, response.text
    image = response.json()["images"][0]
    assert (image["width"], image["height"]) == (40, 60)
    explanation = image["explanations"][0]
    assert explanation["size"] == [60, 40]
    overlay = Image.open(io.BytesIO(base64.b64decode(explanation["overlay"])))
    assert overlay.size == (40, 60)


async def test_maps_beyond_the_pixel_limit_are_refused_before_compute(tiny_weights):
    """images x classes x map pixels above limits.max_map_pixels: 422 maps_too_large, nothing
    computed; within the limit (or on the grid, or predictions) the same images are served."""
    settings = tiny_settings(tiny_weights, limits={"max_map_pixels": 2000})
    data = image_bytes(5, size=(60, 45))  # 2,700 pixels; the model input is 32x32 = 1,024
    async with running_service(settings) as client:
        metrics = client.app.state.service.metrics
        cases = [
            ({"map_size": "original"}, 422),  # 1 x 2,700
            ({"map_size": "input", "top_k": "2"}, 422),  # 2 x 1,024
            ({"map_size": "input", "targets": "1,2"}, 422),
            ({"map_size": "input"}, 200),  # 1,024
            ({"map_size": "grid", "top_k": "5"}, 200),  # grid maps are not counted
        ]

        def computed_images() -> float:
            value = metrics.registry.get_sample_value("reciprocam_batch_size_images_sum", {"model": "tiny"})
            return value or 0.0

        for options, status in cases:
            before = computed_images()
            response = await client.post(
                "/v1/models/tiny/explain",
                files={"file": ("a.png", data, "image/png")},
                data={"encodings": "json", **options},
            )
            assert response.status_code == status, (options, response.text)
            if status == 422:
                error = response.json()["error"]
                assert error["code"] == "maps_too_large" and "more than the limit of 2000" in error["message"]
                assert computed_images() == before  # refused before any batch
            else:
                assert computed_images() == before + 1
        # two images at input size: 2 x 1,024
        response = await client.post(
            "/v1/models/tiny/explain",
            files=[("files", ("a.png", data, "image/png")), ("files", ("b.png", data, "image/png"))],
            data={"map_size": "input"},
        )
        assert response.status_code == 422 and response.json()["error"]["code"] == "maps_too_large"
        predicted = await client.post("/v1/models/tiny/predict", files={"file": ("a.png", data, "image/png")})
        assert predicted.status_code == 200


async def test_original_size_maps_are_counted_from_the_headers_before_decoding(tiny_weights, monkeypatch):
    """A small file that decodes to a large image (here 3000x3000, a few kB) asks for original-size
    maps over the limit: refused from its header, without decoding it; an image over the per-image
    pixel limit stays a 413."""
    import app.serving.service as service_module

    decoded: list[int] = []
    real_prepare = service_module.prepare_image

    def counting_prepare(data, *args, **kwargs):
        decoded.append(len(data))
        return real_prepare(data, *args, **kwargs)

    monkeypatch.setattr(service_module, "prepare_image", counting_prepare)
    buffer = io.BytesIO()
    Image.new("RGB", (3000, 3000), (90, 140, 200)).save(buffer, format="PNG")
    large = buffer.getvalue()
    assert len(large) < 100_000
    settings = tiny_settings(tiny_weights, limits={"max_map_pixels": 20_000_000, "max_pixels": 10**8})
    async with running_service(settings) as client:
        response = await client.post(
            "/v1/models/tiny/explain",
            files={"file": ("large.png", large, "image/png")},
            data={"map_size": "original", "top_k": "3", "encodings": "png"},
        )
        assert response.status_code == 422 and response.json()["error"]["code"] == "maps_too_large"
        assert "27000000 map pixels" in response.json()["error"]["message"]
        assert decoded == []
        # 2 classes: 18 M map pixels, within the limit: decoded and answered at the original size
        response = await client.post(
            "/v1/models/tiny/explain",
            files={"file": ("large.png", large, "image/png")},
            data={"map_size": "original", "top_k": "2", "encodings": "png"},
        )
        assert response.status_code == 200, response.text
        assert decoded == [len(large)]
        assert response.json()["images"][0]["explanations"][0]["size"] == [3000, 3000]
    # an image over limits.max_pixels is a 413 whatever map size is asked for, never maps_too_large
    settings = tiny_settings(tiny_weights, limits={"max_map_pixels": 1_000_000, "max_pixels": 5_000_000})
    async with running_service(settings) as client:
        for map_size in ("original", "input"):
            response = await client.post(
                "/v1/models/tiny/explain",
                files={"file": ("large.png", large, "image/png")},
                data={"map_size": map_size, "encodings": "png"},
            )
            assert response.status_code == 413, (map_size, response.text)
            assert response.json()["error"]["code"] == "too_many_pixels"


async def test_originals_kept_for_overlays_share_a_budget_over_requests_in_flight(tiny_weights, monkeypatch):
    """While one request holds its decoded original for an overlay, another that would push the
    pixels held past limits.max_original_pixels_in_flight gets 503 overloaded with Retry-After;
    requests without such overlays are not affected; the budget is released when a request ends,
    also when it fails."""
    import asyncio
    import threading

    import app.serving.registry as registry_module

    gate, entered = threading.Event(), threading.Event()
    real_run = registry_module.run_engine_batch

    def gated(*args, **kwargs):
        entered.set()
        gate.wait(timeout=30)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(registry_module, "run_engine_batch", gated)
    settings = tiny_settings(tiny_weights, limits={"max_original_pixels_in_flight": 100_000})
    data = image_bytes(6, size=(300, 300))  # 90,000 pixels
    overlay = {"map_size": "original", "encodings": "overlay"}

    async with running_service(settings) as client:
        service = client.app.state.service

        async def post(options, payload=data):
            return await client.post(
                "/v1/models/tiny/explain", files={"file": ("a.png", payload, "image/png")}, data=options
            )

        first = asyncio.create_task(post(overlay))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        assert service.original_pixels_held == 90_000
        refused = await post(overlay)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert (
            refused.json()["error"]["code"] == "overloaded"
            and "overlays" in refused.json()["error"]["message"]
        )
        other = asyncio.create_task(post({"map_size": "original", "encodings": "png"}))  # keeps no original
        await asyncio.sleep(0.05)
        gate.set()
        assert (await first).status_code == 200
        assert (await other).status_code == 200
        assert service.original_pixels_held == 0
        assert (await post(overlay)).status_code == 200
        truncated = data[: len(data) // 2]  # the header reads, the pixels do not
        assert (await post(overlay, truncated)).status_code == 400
        assert service.original_pixels_held == 0
        rejected = service.metrics.rejections.labels("tiny", "originals_in_flight")._value.get()
        assert rejected == 1


async def test_non_finite_model_output_is_an_error_not_null(client, monkeypatch):
    """A model that returns NaN (an fp16 overflow, broken weights) gets a 500 compute error for that
    image, never a 200 with null where the schema promises numbers."""
    engine = client.app.state.service.registry.entries["tiny"].loaded.engine
    real_explain = engine.explain

    def poisoned(*args, **kwargs):
        results = real_explain(*args, **kwargs)
        for result in results:
            result.logits = result.logits.clone()
            result.logits[0] = float("nan")
        return results

    monkeypatch.setattr(engine, "explain", poisoned)
    response = await client.post(
        "/v1/models/tiny/predict", files={"file": ("a.png", image_bytes(8), "image/png")}
    )
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["code"] == "compute_failed" and "non-finite" in error["message"]
