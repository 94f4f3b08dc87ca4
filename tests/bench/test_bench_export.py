"""Smoke test of the export benchmark: a tiny ViT, one round, prints one complete row (OpenVINO XAI
is skipped when its separate environment is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench.conftest import benchmark_module, run_table

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")


def test_benchmark_prints_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 5}
    with benchmark_module("bench_export") as module:
        rows = run_table(
            module,
            [
                "--models=deit_tiny_patch16_224",
                f"--model-kwargs={json.dumps(kwargs)}",
                "--batch-sizes=2",
                "--rounds=1",
                "--iters=1",
                "--warmup=0",
                "--threads=1",
                f"--xai-python={tmp_path / 'absent' / 'python'}",
                f"--json={tmp_path / 'rows.json'}",
            ],
            capsys,
        )
    assert len(rows) == 1
    cells = rows[0]
    assert cells[:2] == ["deit_tiny_patch16_224", "2"]
    assert all(cells[i].endswith(" ms") and float(cells[i].split()[0]) > 0 for i in (2, 3, 5, 6))
    assert all(cells[i].endswith("x") for i in (4, 7))
    assert cells[8:] == ["–"] * 4  # no XAI environment
    written = json.loads((tmp_path / "rows.json").read_text())
    assert written[0]["batch"] == 2 and written[0]["ort_vs_plain"] > 0
