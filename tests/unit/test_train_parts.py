"""Pieces of the shapes-model training recipe, on small inputs."""

from __future__ import annotations

import math

import pytest
import torch

from app.eval import shapes_vit, train, train_files, train_objectives
from app.eval.shapes import SHAPE_CLASSES


def test_soft_cross_entropy_by_hand():
    logits = torch.zeros(2, 4)
    # uniform logits: cross-entropy is log(4) for any target distribution
    value = train_objectives.soft_cross_entropy(logits, torch.tensor([2, -1]), smoothing=0.1)
    assert value.item() == pytest.approx(math.log(4))
    logits = torch.tensor([[2.0, 0.0]])
    log_p = torch.log_softmax(logits, -1)[0]
    # smoothing 0.2 over 2 classes: target (0.9, 0.1)
    expected = -(0.9 * log_p[0] + 0.1 * log_p[1])
    assert train_objectives.soft_cross_entropy(logits, torch.tensor([0]), 0.2).item() == pytest.approx(
        expected.item()
    )


def test_patch_targets_and_mask_patches():
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True  # fills the top-left 2x2 patch
    masks[0, 2, 2] = True  # 1 of 4 pixels of the bottom-right patch
    targets = train_objectives.patch_targets(masks, torch.tensor([3]), patch_size=2, coverage=0.3)
    background = len(SHAPE_CLASSES)
    assert targets.tolist() == [[[3, background], [background, background]]]
    assert train_objectives.patch_targets(masks, torch.tensor([3]), 2, coverage=0.25)[0, 1, 1] == 3
    patterns = train_objectives.mask_patches(masks, patch_size=2)
    assert patterns.shape == (1, 4, 4)
    assert patterns[0, 0].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert patterns[0, 3].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_augment_moves_images_and_masks_together():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    masks = images[:, 0] > 20
    generator = torch.Generator().manual_seed(3)
    out_images, out_masks = train_objectives.augment(images, masks, generator)
    assert torch.equal(out_masks, out_images[:, 0] > 20)
    assert sorted(out_images.flatten().tolist()) == sorted(images.flatten().tolist())


def test_masked_window_targets_follow_the_object_share():
    config = train.TrainConfig(
        model_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    )
    model = train.build_model(config)
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(64, 32, 32, dtype=torch.bool)
    masks[:, 8:16, 8:16] = True  # the object is exactly patch (1, 1)
    labels = torch.full((64,), 2)
    labels[-4:] = -1  # images without an object
    masks[-4:] = False
    with torch.no_grad():
        block_input = shapes_vit.last_block_input(model, images)
        logits, targets = train_objectives.masked_window_batch(
            model, block_input, masks, labels, 8, torch.Generator().manual_seed(1)
        )
    assert logits.shape == targets.shape == (64, len(SHAPE_CLASSES))
    assert torch.allclose(targets.sum(-1), torch.ones(64))
    uniform = torch.full((len(SHAPE_CLASSES),), 1 / len(SHAPE_CLASSES))
    one_hot = torch.nn.functional.one_hot(torch.tensor(2), len(SHAPE_CLASSES)).float()
    kinds = set()
    for index in range(64):
        if torch.allclose(targets[index], one_hot):
            kinds.add("object")
        elif torch.allclose(targets[index], uniform):
            kinds.add("none")
        else:
            kinds.add("other")
    # the object is one patch: a window holds all of it or none of it
    assert kinds == {"object", "none"}
    assert all(torch.allclose(targets[i], uniform) for i in range(60, 64))


def test_mimetic_init_sets_position_embeddings_and_keeps_shapes():
    config = train.TrainConfig()
    model = train.build_model(config)
    grid = model.patch_embed.grid_size
    expected = shapes_vit.sincos_position_embedding(grid[0], grid[1], model.embed_dim) * 0.5
    assert torch.allclose(model.pos_embed[0, 1:], expected)
    out = model(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, len(SHAPE_CLASSES))


def test_train_writes_elsewhere_by_default_and_never_overwrites_without_force(tmp_path, monkeypatch, capsys):
    import os
    import stat

    from app.cli import build_parser, main

    assert str(build_parser().parse_args(["train"]).out) == "out/shapes_vit.safetensors"
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"keep me")
    assert main(["train", "--out", str(target), "--epochs", "1"]) == 2
    assert "add --force to overwrite" in capsys.readouterr().err
    assert target.read_bytes() == b"keep me"
    card = tmp_path / "other.md"
    card.write_text("card", encoding="utf-8")
    assert main(["train", "--out", str(tmp_path / "other.safetensors")]) == 2  # the card alone counts
    assert "other.md already exists" in capsys.readouterr().err

    # the weights file itself: readable by others as the umask allows (safetensors' own writer: 0600)
    config = train.TrainConfig(model_kwargs={**shapes_vit.MODEL_KWARGS, "depth": 1})
    model = train.build_model(config)
    result = train.TrainResult(val_accuracy=0.5, train_accuracy=0.5, seconds=1.0, epochs=1, history=[])
    previous = os.umask(0o022)
    try:
        path = train_files.save_weights(model, tmp_path / "fresh.safetensors", config, result)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    from app.engine.models import load_model

    assert load_model(None, path, warmup=False).num_classes == len(SHAPE_CLASSES)
