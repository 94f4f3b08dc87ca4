"""The Open Inference Protocol through NVIDIA's published client, ``tritonclient.http``, used as it is,
against a real uvicorn process. Results are compared with the engine run in this process."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch

from app.engine.models import LoadedModel, load_model
from app.engine.options import CamOptions
from tests.e2e.live_server import LABELS, MODEL, LiveServer, colourful_png, preprocessed

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

CLASSES = len(LABELS)


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> Iterator[object]:
    with httpclient.InferenceServerClient(url=live_server.url.removeprefix("http://")) as triton:
        yield triton


@pytest.fixture(scope="module")
def engine_model(live_server: LiveServer) -> LoadedModel:
    """The same weights, loaded here: the reference for what the server returns."""
    return load_model(None, str(live_server.weights), device="cpu", warmup=False)


def bytes_input(*files: bytes) -> object:
    tensor = httpclient.InferInput("image", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(list(files), dtype=np.object_))
    return tensor


def test_server_and_model_metadata(client: object, engine_model: LoadedModel) -> None:
    server = client.get_server_metadata()
    assert server["name"] == "vit-reciprocam-service"
    assert server["version"]
    assert {"classification", "binary_tensor_data"} <= set(server["extensions"])

    metadata = client.get_model_metadata(MODEL)
    assert metadata["name"] == MODEL
    assert metadata["versions"] == ["1"]
    height, width = engine_model.data_config.input_size[-2:]
    grid_h, grid_w = engine_model.anatomy.grid_size
    inputs = {tensor["name"]: tensor for tensor in metadata["inputs"]}
    assert inputs["image"] == {"name": "image", "datatype": "BYTES", "shape": [-1]}
    assert inputs["pixel_values"] == {
        "name": "pixel_values",
        "datatype": "FP32",
        "shape": [-1, 3, height, width],
    }
    outputs = {tensor["name"]: (tensor["datatype"], tensor["shape"]) for tensor in metadata["outputs"]}
    assert outputs == {
        "logits": ("FP32", [-1, CLASSES]),
        "probabilities": ("FP32", [-1, CLASSES]),
        "maps": ("FP32", [-1, -1, grid_h, grid_w]),
        "targets": ("INT64", [-1, -1]),
    }
    assert client.get_model_metadata(MODEL, model_version="1")["name"] == MODEL

    with pytest.raises(InferenceServerException) as missing:
        client.get_model_metadata("no_such_model")
    assert missing.value.status() == "404"
    assert "no_such_model" in missing.value.message()


def test_readiness(client: object) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, model_version="1")
    assert not client.is_model_ready("no_such_model")
    assert not client.is_model_ready(MODEL, model_version="7")


def test_bytes_input_gives_the_engines_logits_and_maps(client: object, engine_model: LoadedModel) -> None:
    files = [colourful_png(64, 48, seed=1), colourful_png(40, 56, seed=2)]
    outputs = [
        httpclient.InferRequestedOutput("logits"),
        httpclient.InferRequestedOutput("probabilities", binary_data=False),
        httpclient.InferRequestedOutput("maps"),
        httpclient.InferRequestedOutput("targets"),
    ]
    result = client.infer(
        MODEL, [bytes_input(*files)], outputs=outputs, request_id="req-1", parameters={"top_k": 2}
    )
    response = result.get_response()
    assert response["model_name"] == MODEL
    assert response["id"] == "req-1"

    images = torch.stack([preprocessed(engine_model, data) for data in files])
    expected = engine_model.engine.explain(images, CamOptions(), top_k=2)
    logits = result.as_numpy("logits")
    assert logits.dtype == np.float32 and logits.shape == (2, CLASSES)
    want_logits = torch.stack([item.logits for item in expected]).numpy()
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), torch.softmax(torch.from_numpy(want_logits), -1).numpy(), atol=1e-5
    )
    grid_h, grid_w = engine_model.anatomy.grid_size
    maps = result.as_numpy("maps")
    assert maps.shape == (2, 2, grid_h, grid_w)
    np.testing.assert_allclose(
        maps, torch.stack([item.score_maps for item in expected]).numpy(), rtol=1e-4, atol=1e-4
    )
    targets = result.as_numpy("targets")
    assert targets.dtype == np.int64
    np.testing.assert_array_equal(targets, torch.stack([item.targets for item in expected]).numpy())
    np.testing.assert_array_equal(targets, np.argsort(-want_logits, axis=1)[:, :2])


def test_fp32_input_matches_bytes_input(client: object, engine_model: LoadedModel) -> None:
    data = colourful_png(50, 50, seed=3)
    pixels = preprocessed(engine_model, data)[None].numpy().astype(np.float32)
    tensor = httpclient.InferInput("pixel_values", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    from_tensor = client.infer(MODEL, [tensor], outputs=[httpclient.InferRequestedOutput("logits")])
    from_file = client.infer(MODEL, [bytes_input(data)], outputs=[httpclient.InferRequestedOutput("logits")])
    assert [out["name"] for out in from_tensor.get_response()["outputs"]] == ["logits"]
    np.testing.assert_allclose(from_tensor.as_numpy("logits"), from_file.as_numpy("logits"), atol=1e-5)
    want = engine_model.engine.predict(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(from_tensor.as_numpy("logits"), want, rtol=1e-4, atol=1e-4)

    # The same tensor as JSON numbers (no binary data) and explicit target classes.
    as_json = httpclient.InferInput("pixel_values", list(pixels.shape), "FP32")
    as_json.set_data_from_numpy(pixels, binary_data=False)
    explained = client.infer(
        MODEL,
        [as_json],
        outputs=[httpclient.InferRequestedOutput("maps"), httpclient.InferRequestedOutput("targets")],
        parameters={"targets": "5,0", "kernel": "dirac"},
    )
    np.testing.assert_array_equal(explained.as_numpy("targets"), [[5, 0]])
    reference = engine_model.engine.explain(
        torch.from_numpy(pixels), CamOptions(kernel="dirac"), targets=[[5, 0]]
    )[0]
    np.testing.assert_allclose(
        explained.as_numpy("maps")[0], reference.score_maps.numpy(), rtol=1e-4, atol=1e-4
    )


def test_fp32_input_matches_the_v1_endpoint(
    client: object, engine_model: LoadedModel, live_server: LiveServer
) -> None:
    data = colourful_png(72, 60, seed=4)
    pixels = preprocessed(engine_model, data)[None].numpy()
    tensor = httpclient.InferInput("pixel_values", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    logits = client.infer(MODEL, [tensor], outputs=[httpclient.InferRequestedOutput("logits")]).as_numpy(
        "logits"
    )[0]
    v1 = httpx.post(
        f"{live_server.url}/v1/models/{MODEL}/predict",
        files={"file": ("image.png", data, "image/png")},
        data={"top_k": str(CLASSES)},
        timeout=60,
    )
    assert v1.status_code == 200, v1.text
    for prediction in v1.json()["images"][0]["predictions"]:
        assert prediction["logit"] == pytest.approx(float(logits[prediction["class_id"]]), abs=1e-4)


@pytest.mark.parametrize("binary", [True, False])
def test_classification_extension(client: object, engine_model: LoadedModel, binary: bool) -> None:
    data = colourful_png(64, 64, seed=5)
    result = client.infer(
        MODEL,
        [bytes_input(data)],
        outputs=[
            httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=3),
            httpclient.InferRequestedOutput("logits", binary_data=binary),
        ],
    )
    classes = result.as_numpy("probabilities")
    assert classes.shape == (1, 3)
    logits = result.as_numpy("logits")[0]
    probabilities = torch.softmax(torch.from_numpy(logits.copy()), -1).numpy()
    order = np.argsort(-probabilities)[:3]
    for entry, index in zip(classes[0], order, strict=True):
        text = entry.decode() if isinstance(entry, bytes) else str(entry)
        score, class_id, label = text.split(":", 2)
        assert int(class_id) == index
        assert label == LABELS[index]
        assert float(score) == pytest.approx(float(probabilities[index]), abs=1e-5)


def test_client_sees_protocol_errors(client: object, engine_model: LoadedModel) -> None:
    wrong = np.zeros((1, 3, 8, 8), dtype=np.float32)
    tensor = httpclient.InferInput("pixel_values", list(wrong.shape), "FP32")
    tensor.set_data_from_numpy(wrong)
    with pytest.raises(InferenceServerException) as shape_error:
        client.infer(MODEL, [tensor])
    assert shape_error.value.status() == "400"
    assert "shape" in shape_error.value.message()

    with pytest.raises(InferenceServerException) as not_an_image:
        client.infer(MODEL, [bytes_input(b"this is not an image")])
    assert not_an_image.value.status() == "400"
    assert "image 0" in not_an_image.value.message()

    with pytest.raises(InferenceServerException) as unknown:
        client.infer("no_such_model", [bytes_input(colourful_png(seed=6))])
    assert unknown.value.status() == "404"
    # The server is still serving after the bad requests.
    assert client.is_model_ready(MODEL)


def test_without_requested_outputs_every_output_comes_back_binary(client: object) -> None:
    result = client.infer(MODEL, [bytes_input(colourful_png(seed=7))])
    outputs = result.get_response()["outputs"]
    assert [out["name"] for out in outputs] == ["logits", "probabilities", "maps", "targets"]
    assert all("binary_data_size" in out["parameters"] for out in outputs)
    assert result.as_numpy("maps").shape[:2] == (1, 1)
    assert int(result.as_numpy("targets")[0, 0]) == int(np.argmax(result.as_numpy("logits")[0]))
