"""Exported models in ONNX Runtime (CPU) and the OpenVINO runtime against the torch engine: logits
and maps within 1e-4 at batch sizes 1, 3 and 8, for both signatures (top-k and explicit targets);
the embedded metadata, metadata.json and the Triton config (parsed with Triton's own schema)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.engine.models import LoadedModel, load_model
from app.engine.options import CamOptions
from app.export.writer import RT_INFO_SECTION, ExportedModel, export_model
from tests.helpers import save_self_describing

ort = pytest.importorskip("onnxruntime")
ov = pytest.importorskip("openvino")

TOL = 1e-4  # max |difference| over max(1, max |engine value|)
BATCHES = (1, 3, 8)
LABELS = ["zero", "one", "two", "three", "four", "five", "six"]


Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def onnx_runner(path: Path) -> Runner:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # tiny graphs; one thread avoids contention on a busy machine
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(None, feeds), strict=True))


def openvino_runner(path: Path) -> Runner:
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": 1})

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = compiled(feeds)
        return {output.get_any_name(): result[output] for output in compiled.outputs}

    return run


RUNNERS = {"onnx": onnx_runner, "openvino": openvino_runner}


def _close(actual: np.ndarray, expected: torch.Tensor) -> float:
    reference = expected.double().numpy()
    return float(np.abs(actual - reference).max() / max(1.0, float(np.abs(reference).max())))


def check_against_engine(
    loaded: LoadedModel, exported: list[ExportedModel], fmt: str, options: CamOptions, top_k: int
) -> None:
    top, with_targets = exported
    height, width = loaded.data_config.input_size
    classes = loaded.num_classes
    run_top, run_targets = RUNNERS[fmt](top.model_file), RUNNERS[fmt](with_targets.model_file)
    for batch in BATCHES:
        generator = torch.Generator().manual_seed(batch)
        images = torch.randn(batch, 3, height, width, generator=generator)
        wanted = torch.randint(0, classes, (batch, 2), generator=generator)
        results = loaded.engine.explain(images, options, top_k=top_k)
        chosen = loaded.engine.explain(images, options, targets=wanted.tolist())
        outputs = run_top({"pixel_values": images.numpy()})
        assert outputs["logits"].shape == (batch, classes)
        assert _close(outputs["logits"], torch.stack([r.logits for r in results])) <= TOL
        assert np.array_equal(outputs["targets"], torch.stack([r.targets for r in results]).numpy())  # type: ignore[misc]
        assert outputs["maps"].shape == (batch, top_k, *loaded.anatomy.grid_size)
        assert _close(outputs["maps"], torch.stack([r.score_maps for r in results])) <= TOL  # type: ignore[misc]
        feeds = {"pixel_values": images.numpy(), "targets": wanted.numpy()}
        outputs = run_targets(feeds)
        assert set(outputs) == {"logits", "maps"}
        assert _close(outputs["logits"], torch.stack([r.logits for r in chosen])) <= TOL
        assert _close(outputs["maps"], torch.stack([r.score_maps for r in chosen])) <= TOL  # type: ignore[misc]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    folder = tmp_path_factory.mktemp("weights")
    models = {}
    for name in ("deit_tiny", "deit_tiny_distilled", "vit_registers", "vit_avgpool_regs"):
        path = save_self_describing(folder / f"{name}.safetensors", name, seed=5, labels=LABELS)
        models[name] = load_model(None, str(path), name=name, device="cpu", warmup=False)
    return models


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
@pytest.mark.parametrize("name", ["deit_tiny", "deit_tiny_distilled", "vit_registers", "vit_avgpool_regs"])
def test_runtime_equals_engine(
    tiny_models: dict[str, LoadedModel], tmp_path: Path, name: str, fmt: str
) -> None:
    loaded = tiny_models[name]
    exported = export_model(loaded, fmt, tmp_path, options=CamOptions(), top_k=2)
    check_against_engine(loaded, exported, fmt, CamOptions(), top_k=2)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_options_are_fixed_at_export(tiny_models: dict[str, LoadedModel], tmp_path: Path, fmt: str) -> None:
    loaded = tiny_models["deit_tiny_distilled"]
    for index, options in enumerate(
        [
            CamOptions(kernel="dirac", keep_prefix=False, score="probability"),
            CamOptions(keep_prefix=False, target_block=1),
        ]
    ):
        exported = export_model(loaded, fmt, tmp_path / str(index), options=options, top_k=3)
        check_against_engine(loaded, exported, fmt, options, top_k=3)
        assert exported[0].metadata["explanation"]["kernel"] == options.kernel  # type: ignore[index]


def _triton_schema() -> Any:
    """Triton's ModelConfig message (from tritonclient's generated module; it needs only protobuf)."""
    import tritonclient

    source = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ModelConfig


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_metadata_and_triton_repository(
    tiny_models: dict[str, LoadedModel], tmp_path: Path, fmt: str
) -> None:
    from google.protobuf import text_format

    loaded = tiny_models["vit_registers"]
    exported = export_model(loaded, fmt, tmp_path, name="reg vit", top_k=2, max_batch_size=16)
    assert [e.name for e in exported] == ["reg_vit", "reg_vit_targets"]
    schema = _triton_schema()
    for item in exported:
        assert item.folder == tmp_path / item.name
        assert all(path.is_file() and path.parent == item.folder / "1" for path in item.files)
        written = json.loads((item.folder / "metadata.json").read_text())
        assert written == item.metadata
        assert written["labels"] == LABELS
        prep = written["preprocessing"]
        assert prep["input_size"] == [32, 32] and prep["mean"] == list(loaded.data_config.mean)
        assert {"std", "crop_pct", "interpolation"} <= set(prep)
        assert written["explanation"]["target_block"] == 2 and written["explanation"]["grid"] == [4, 4]
        if fmt == "onnx":
            import onnx

            props = {p.key: p.value for p in onnx.load(str(item.model_file)).metadata_props}
        else:
            model = ov.Core().read_model(str(item.model_file))
            props = {key: model.get_rt_info([RT_INFO_SECTION, key]).astype(str) for key in written}
        assert json.loads(props["labels"]) == LABELS
        assert json.loads(props["preprocessing"]) == prep
        assert props["name"] == item.name

        config = text_format.Parse((item.folder / "config.pbtxt").read_text(), schema())
        assert config.name == item.name and config.max_batch_size == 16
        assert config.backend == {"onnx": "onnxruntime", "openvino": "openvino"}[fmt]
        assert config.HasField("dynamic_batching")
        declared_in = {t.name: list(t.dims) for t in config.input}
        declared_out = {t.name: list(t.dims) for t in config.output}
        assert declared_in == {k: v["shape"][1:] for k, v in written["inputs"].items()}
        assert declared_out == {k: v["shape"][1:] for k, v in written["outputs"].items()}
        # the names the config declares are the graph's own
        if fmt == "onnx":
            session = ort.InferenceSession(str(item.model_file), providers=["CPUExecutionProvider"])
            graph_in = {i.name for i in session.get_inputs()}
            graph_out = {o.name for o in session.get_outputs()}
        else:
            model = ov.Core().read_model(str(item.model_file))
            graph_in = {i.get_any_name() for i in model.inputs}
            graph_out = {o.get_any_name() for o in model.outputs}
        assert graph_in == set(declared_in) and graph_out == set(declared_out)


@pytest.mark.slow
def test_dynamo_exporter(tiny_models: dict[str, LoadedModel], tmp_path: Path) -> None:
    """torch.export-based exporter (about 20x slower to export than the TorchScript one)."""
    pytest.importorskip("onnxscript")
    loaded = tiny_models["deit_tiny"]
    exported = export_model(loaded, "onnx", tmp_path, exporter="dynamo", top_k=2)
    check_against_engine(loaded, exported, "onnx", CamOptions(), top_k=2)
