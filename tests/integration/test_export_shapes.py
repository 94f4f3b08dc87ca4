"""`python -m app export` on the shipped shapes model: the exported ONNX and OpenVINO models classify
synthetic images as the service does, and their maps point at the object as often as the torch
engine's (pointing game, same images, same classes); unsupported models fail with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from app.cli import main
from app.engine.maps import normalize_maps, upsample_maps
from app.engine.models import load_model
from app.engine.reduced_support import reduced_support_reason
from app.eval import metrics, shapes
from tests.helpers import TINY, perturb_

ort = pytest.importorskip("onnxruntime")
ov = pytest.importorskip("openvino")

WEIGHTS = Path(__file__).resolve().parents[2] / "app" / "weights" / "shapes_vit.safetensors"
FRESH_SEED = 31_337  # training uses seeds 0 and 1
IMAGES = 120


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("repository")
    for fmt, name in (("onnx", "shapes_onnx"), ("openvino", "shapes_ov")):
        assert main(["export", str(WEIGHTS), "--format", fmt, "--out", str(out), "--name", name]) == 0
    return out


@pytest.fixture(scope="module")
def fresh() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    data = shapes.generate(FRESH_SEED, IMAGES)
    return shapes.normalize(data.images), torch.from_numpy(data.labels), torch.from_numpy(data.masks)


def _hits(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    size = (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
    return metrics.pointing_hits(upsample_maps(normalize_maps(maps), size), masks, tolerance=4.0)


def _run(repository: Path, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    folder = repository / name
    if (folder / "1" / "model.onnx").is_file():
        session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(None, feeds), strict=True))
    compiled = ov.Core().compile_model(str(folder / "1" / "model.xml"), "CPU", {"INFERENCE_NUM_THREADS": 1})
    result = compiled(feeds)
    return {o.get_any_name(): result[o] for o in compiled.outputs}


def test_repository_layout(repository: Path) -> None:
    for name in ("shapes_onnx", "shapes_onnx_targets", "shapes_ov", "shapes_ov_targets"):
        meta = json.loads((repository / name / "metadata.json").read_text())
        assert meta["labels"] == list(shapes.SHAPE_CLASSES)
        assert meta["preprocessing"]["mean"] == list(shapes.MEAN)
        assert meta["preprocessing"]["std"] == list(shapes.STD)
        assert meta["preprocessing"]["input_size"] == [shapes.IMAGE_SIZE, shapes.IMAGE_SIZE]
        assert meta["preprocessing"]["crop_pct"] == 1.0
        assert f'name: "{name}"' in (repository / name / "config.pbtxt").read_text()


@pytest.mark.parametrize("name", ["shapes_onnx", "shapes_ov"])
def test_exported_maps_point_at_the_object_as_the_services_do(
    repository: Path, fresh: tuple[torch.Tensor, torch.Tensor, torch.Tensor], name: str
) -> None:
    inputs, labels, masks = fresh
    loaded = load_model(None, str(WEIGHTS), device="cpu", warmup=False)
    engine = loaded.engine.explain(inputs, targets=labels[:, None].tolist())
    engine_maps = torch.stack([r.score_maps[0] for r in engine])  # type: ignore[index]
    engine_logits = torch.stack([r.logits for r in engine])

    outputs = _run(
        repository, f"{name}_targets", {"pixel_values": inputs.numpy(), "targets": labels[:, None].numpy()}
    )
    exported_maps = torch.from_numpy(outputs["maps"][:, 0])
    assert np.array_equal(outputs["logits"].argmax(-1), engine_logits.argmax(-1).numpy())
    assert (engine_logits.argmax(-1) == labels).float().mean() >= 0.9

    exported_hits, engine_hits = _hits(exported_maps, masks), _hits(engine_maps, masks)
    # maps equal within float rounding, so the same images are hit; and the maps do find the object
    assert torch.equal(exported_hits, engine_hits)
    assert exported_hits.mean() >= 0.7

    # the top-1 model explains the predicted class, which is the label on almost every image
    top = _run(repository, name, {"pixel_values": inputs.numpy()})
    assert np.array_equal(top["targets"][:, 0], engine_logits.argmax(-1).numpy())
    right = torch.from_numpy(top["targets"][:, 0]) == labels
    assert torch.allclose(torch.from_numpy(top["maps"][right, 0]), engine_maps[right], rtol=1e-4, atol=1e-4)


def test_unsupported_model_fails_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    kwargs = {**TINY, "img_size": 32, "patch_size": 8, "global_pool": "map"}
    model = perturb_(timm.create_model("vit_small_patch16_224", pretrained=False, **kwargs), 0).eval()
    reason = reduced_support_reason(model)
    assert reason is not None
    kwargs.pop("num_classes")
    path = tmp_path / "attention_pool.safetensors"
    metadata = {"arch": "vit_small_patch16_224", "model_kwargs": json.dumps(kwargs)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)
    assert main(["export", str(path), "--format", "onnx", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "reduced evaluation is not possible for this model" in error and reason in error
    assert not (tmp_path / "out").exists()


def test_missing_runtime_packages_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a)
    )
    assert main(["export", str(WEIGHTS), "--format", "openvino", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "export needs openvino" in error and "[export]" in error
    assert not (tmp_path / "out").exists()
