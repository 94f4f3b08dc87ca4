"""The Open Inference Protocol through KServe's published REST client, ``kserve.InferenceRESTClient``
with protocol v2, used as it is, against a real uvicorn process: health, readiness, inference with
BYTES and FP32 inputs, as JSON and as binary data. Results are compared with the engine run in this
process. KServe's client has no metadata call; the metadata is read over plain HTTP.

kserve pulls in a large dependency tree (gRPC, Kubernetes, pandas) and pins psutil and protobuf below
the versions of the ``test`` extra, so it is an extra of its own: ``pip install -e '.[kserve]'``.
Without it these tests are skipped."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import torch

from app.engine.models import LoadedModel, load_model
from app.engine.options import CamOptions
from tests.e2e.live_server import LABELS, MODEL, LiveServer, colourful_png, preprocessed

kserve = pytest.importorskip("kserve")
from kserve.protocol.infer_type import RequestedOutput  # noqa: E402

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


async def _with_client(url: str, call: str, *args: Any, **kwargs: Any) -> Any:
    """One call of a fresh client (each test runs its own event loop)."""
    async with kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", timeout=60)) as client:
        return await getattr(client, call)(url, *args, **kwargs)


def call(url: str, name: str, *args: Any, **kwargs: Any) -> Any:
    return run(_with_client(url, name, *args, **kwargs))


@pytest.fixture(scope="module")
def engine_model(live_server: LiveServer) -> LoadedModel:
    return load_model(None, str(live_server.weights), device="cpu", warmup=False)


def image_input(files: list[bytes], binary: bool) -> Any:
    """The files as a BYTES input: raw with the binary extension, base64 text in JSON (KServe's
    client sends JSON strings as UTF-8 text, which image files are not)."""
    tensor = kserve.InferInput("image", [len(files)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(files, dtype=np.object_), binary_data=True)
    else:
        encoded = [base64.b64encode(data).decode() for data in files]
        tensor.set_data_from_numpy(np.array(encoded, dtype=np.object_), binary_data=False)
    return tensor


def outputs(*names: str, binary: bool, **parameters: Any) -> list[Any]:
    return [RequestedOutput(name, parameters={"binary_data": binary, **parameters}) for name in names]


def test_health_readiness_and_metadata(live_server: LiveServer) -> None:
    assert call(live_server.url, "is_server_live") is True
    assert call(live_server.url, "is_server_ready") is True
    assert call(live_server.url, "is_model_ready", MODEL) is True
    assert call(live_server.url, "is_model_ready", "no_such_model") is False
    metadata = httpx.get(f"{live_server.url}/v2/models/{MODEL}", timeout=30).json()
    assert metadata["name"] == MODEL and metadata["versions"] == ["1"]
    assert {tensor["name"] for tensor in metadata["inputs"]} == {"image", "pixel_values"}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_bytes_input_gives_the_engines_logits_and_maps(
    live_server: LiveServer, engine_model: LoadedModel, binary: bool
) -> None:
    files = [colourful_png(64, 48, seed=11), colourful_png(40, 56, seed=12)]
    request = kserve.InferRequest(
        model_name=MODEL,
        infer_inputs=[image_input(files, binary)],
        request_id="kserve-1",
        parameters={"top_k": 2},
        request_outputs=outputs("logits", "maps", "targets", binary=binary),
    )
    result = call(live_server.url, "infer", request, model_name=MODEL)
    assert result.model_name == MODEL and result.id == "kserve-1"
    images = torch.stack([preprocessed(engine_model, data) for data in files])
    expected = engine_model.engine.explain(images, CamOptions(), top_k=2)
    got = {output.name: output.as_numpy() for output in result.outputs}
    np.testing.assert_allclose(
        got["logits"], torch.stack([item.logits for item in expected]).numpy(), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        got["maps"], torch.stack([item.score_maps for item in expected]).numpy(), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_array_equal(got["targets"], torch.stack([item.targets for item in expected]).numpy())


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fp32_input_and_classification(
    live_server: LiveServer, engine_model: LoadedModel, binary: bool
) -> None:
    data = colourful_png(50, 50, seed=13)
    pixels = preprocessed(engine_model, data)[None].numpy().astype(np.float32)
    tensor = kserve.InferInput("pixel_values", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    request = kserve.InferRequest(
        model_name=MODEL,
        infer_inputs=[tensor],
        request_outputs=[
            *outputs("logits", binary=binary),
            *outputs("probabilities", binary=binary, classification=3),
        ],
    )
    result = call(live_server.url, "infer", request, model_name=MODEL)
    got = {output.name: output.as_numpy() for output in result.outputs}
    want = engine_model.engine.predict(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(got["logits"], want, rtol=1e-4, atol=1e-4)
    order = np.argsort(-want[0])[:3]
    texts = [entry.decode() if isinstance(entry, bytes) else str(entry) for entry in got["probabilities"][0]]
    assert [int(text.split(":")[1]) for text in texts] == order.tolist()
    assert [text.split(":", 2)[2] for text in texts] == [LABELS[index] for index in order]


def test_a_request_for_another_model_is_refused(live_server: LiveServer) -> None:
    """The model named in the body must be the one in the path: a clear 400."""
    request = kserve.InferRequest(
        model_name="other_model", infer_inputs=[image_input([colourful_png(seed=14)], binary=True)]
    )
    with pytest.raises(httpx.HTTPStatusError) as refused:
        call(live_server.url, "infer", request, model_name=MODEL)
    assert refused.value.response.status_code == 400
    assert "other_model" in refused.value.response.json()["error"]
