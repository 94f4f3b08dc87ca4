"""Full-size exported models (224 px, 14x14 grid) in ONNX Runtime and OpenVINO against the torch
engine, at batch sizes 1, 3 and 8: deit_tiny, deit_small, a distilled DeiT and a register-token ViT,
with seeded random weights (no model hub). Slow: `make test-slow`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine.models import load_model
from app.engine.options import CamOptions
from app.export.writer import export_model
from tests.integration.test_export_runtimes import check_against_engine

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "deit_tiny": ("deit_tiny_patch16_224", {}),
    "deit_small": ("deit_small_patch16_224", {}),
    "deit_tiny_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "vit_small_registers": ("vit_small_patch16_224", {"reg_tokens": 4, "num_classes": 100}),
}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
@pytest.mark.parametrize("name", list(MODELS))
def test_full_size_runtime_equals_engine(tmp_path: Path, name: str, fmt: str) -> None:
    arch, kwargs = MODELS[name]
    loaded = load_model(arch, "random:0", device="cpu", warmup=False, model_kwargs=kwargs)
    # timm's init leaves norms at weight 1, bias 0: seeded noise makes them ordinary parameters
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in loaded.model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    exported = export_model(loaded, fmt, tmp_path, options=CamOptions(), top_k=3)
    check_against_engine(loaded, exported, fmt, CamOptions(), top_k=3)
