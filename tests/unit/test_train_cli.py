"""`python -m app train` end to end on a tiny budget: a loadable self-describing file, a model card
that states the command and the accuracy, and the same bytes from the same seed."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from app.cli import main
from app.engine.models import load_model
from app.eval.shapes import SHAPE_CLASSES

TINY = ["--epochs", "1", "--train-count", "48", "--val-count", "16", "--batch-size", "16"]


def _train(path, capsys, *extra: str) -> dict:
    code = main(["train", "--out", str(path), *TINY, "--threads", "1", "--no-progress", *extra])
    assert code == 0
    return json.loads(capsys.readouterr().out)


def test_train_writes_weights_card_and_reproduces(tmp_path, capsys):
    first = tmp_path / "a" / "shapes.safetensors"
    report = _train(first, capsys)
    assert report["out"] == str(first)
    assert 0.0 <= report["val_accuracy"] <= 1.0 and len(report["history"]) == 1

    loaded = load_model(None, str(first), device="cpu", warmup=False)
    assert loaded.labels == list(SHAPE_CLASSES)
    assert loaded.anatomy.num_prefix_tokens == 1
    with safe_open(str(first), framework="pt") as handle:
        training = json.loads(handle.metadata()["training"])
    assert training["epochs"] == 1 and training["train_count"] == 48

    card = first.with_suffix(".md").read_text(encoding="utf-8")
    assert "python -m app train" in card and "--train-count 48" in card
    assert f"{100 * report['val_accuracy']:.1f}%" in card
    assert "A feature-masking loss at the last block" in card  # on by default

    second = tmp_path / "b" / "shapes.safetensors"
    _train(second, capsys)
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    other = tmp_path / "c" / "shapes.safetensors"
    _train(other, capsys, "--seed", "5", "--masked-loss-weight", "0", "--token-loss-weight", "0")
    c = load_file(str(other))
    assert not all(torch.equal(a[k], c[k]) for k in a)
    other_card = other.with_suffix(".md").read_text(encoding="utf-8")
    assert "A feature-masking loss" not in other_card and "token labels" not in other_card
    assert "pixel mask inside each patch" in other_card and "--token-loss-weight 0.0" in other_card
    assert "token labels" in card
