"""The shipped shapes model: it loads by itself, classifies, and its ViT-ReciproCAM maps point at
the object on images generated with a seed that training never used; with Dirac masks they miss it
less often than attention rollout does, the published (Gaussian) maps lead both rollouts in
ADCC, and on two-object images they find which object a class is, which rollout cannot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.engine.maps import normalize_maps, upsample_maps
from app.engine.models import load_model
from app.eval import metrics, shapes
from app.eval.baselines import make_method

WEIGHTS = Path(__file__).resolve().parents[2] / "app" / "weights" / "shapes_vit.safetensors"
FRESH_SEED = 20_250  # training uses seeds 0 (train) and 1 (validation)
IMAGES = 200


@pytest.fixture(scope="module")
def loaded():
    return load_model(None, str(WEIGHTS), device="cpu", warmup=False)


@pytest.fixture(scope="module")
def fresh():
    data = shapes.generate(FRESH_SEED, IMAGES)
    return shapes.normalize(data.images), torch.from_numpy(data.labels), torch.from_numpy(data.masks)


def test_weights_are_small_and_self_describing(loaded):
    assert WEIGHTS.stat().st_size <= 10 * 1024 * 1024
    assert loaded.labels == list(shapes.SHAPE_CLASSES)
    assert loaded.arch.startswith("vit_")
    assert loaded.anatomy.num_prefix_tokens == 1 and loaded.anatomy.global_pool == "token"
    grid_h, grid_w = loaded.anatomy.grid_size
    assert grid_h >= 7 and grid_w >= 7
    config = loaded.data_config
    assert config.input_size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
    assert config.crop_pct == 1.0
    assert config.mean == shapes.MEAN and config.std == shapes.STD


def test_preprocessor_matches_the_training_normalisation(loaded, fresh):
    from PIL import Image

    data = shapes.generate(FRESH_SEED, 2)
    tensor, _ = loaded.preprocessor(Image.fromarray(data.images[1]))
    assert torch.allclose(tensor, fresh[0][1], atol=1e-6)


def test_classifies_fresh_images(loaded, fresh):
    inputs, labels, _ = fresh
    predicted = loaded.engine.predict(inputs).argmax(-1)
    # the model card reports the accuracy on the validation seed
    assert (predicted == labels).float().mean().item() >= 0.9


def _pointing_misses(loaded, inputs, labels, masks, name: str) -> int:
    """How many images' map maximum (tolerance 4 px) misses the object, for the true class."""
    size = (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
    misses = 0
    for start in range(0, len(labels), 250):
        part = slice(start, start + 250)
        grid = make_method(name, loaded.model, loaded.engine)(inputs[part], labels[part])
        hits = metrics.pointing_hits(upsample_maps(normalize_maps(grid), size), masks[part], tolerance=4.0)
        misses += int((hits == 0).sum())
    return misses


@pytest.fixture(scope="module")
def pointing(loaded, fresh):
    """Pointing-game accuracy of each method on the 200 fresh images."""
    inputs, labels, masks = fresh
    return {
        name: 1 - _pointing_misses(loaded, inputs, labels, masks, name) / len(labels)
        for name in ("reciprocam", "reciprocam-dirac", "rollout")
    }


def test_reciprocam_points_at_the_object(pointing):
    assert pointing["reciprocam"] >= 0.9, pointing
    assert pointing["reciprocam-dirac"] >= 0.9, pointing


@pytest.mark.xfail(
    strict=True,
    reason="pointing is saturated on this model: attention rollout hits the object on all 200 "
    "images (the decoys do not draw its attention), ViT-ReciproCAM on 98%, so it does not beat "
    "rollout here; docs/evaluation.md discusses why",
)
def test_reciprocam_beats_rollout_at_pointing(pointing):
    """Every image holds decoys (rings, bars, crescents, hollow outlines of the class shapes) as
    salient as the object but of no class. The issue asks ViT-ReciproCAM to beat attention rollout
    at pointing; this records the gap and turns red if it closes."""
    assert pointing["reciprocam"] > pointing["rollout"], pointing


def test_dirac_reciprocam_points_better_than_rollout(loaded):
    """Pointing misses are rare (under 1%), so 200 images cannot separate the methods; on 1000 fresh
    images ViT-ReciproCAM with Dirac masks misses the object less often than attention rollout
    (docs/evaluation.md: 15 against 34 misses over 4,500 images of four seeds)."""
    data = shapes.generate(FRESH_SEED, 1000)
    inputs, labels, masks = (
        shapes.normalize(data.images),
        torch.from_numpy(data.labels),
        torch.from_numpy(data.masks),
    )
    dirac = _pointing_misses(loaded, inputs, labels, masks, "reciprocam-dirac")
    rollout = _pointing_misses(loaded, inputs, labels, masks, "rollout")
    assert dirac < rollout, {"reciprocam-dirac": dirac, "rollout": rollout}
    assert dirac <= 0.01 * len(labels)


def test_reciprocam_leads_the_attention_baselines_in_adcc(loaded):
    """The paper's headline result on this model: ViT-ReciproCAM's ADCC is above attention
    rollout's and gradient-weighted rollout's (200 fresh images, the true class)."""
    from app.eval.batches import synthetic_batches
    from app.eval.evaluate import evaluate

    methods = ("reciprocam", "rollout", "grad-rollout")
    report = evaluate(
        loaded,
        synthetic_batches(loaded, FRESH_SEED, IMAGES, 50),
        methods,
        total=IMAGES,
        steps=0,
        figure_images=0,
        progress=False,
    )
    adcc = {name: report.scores[name].summary()["adcc"] for name in methods}
    assert report.images == IMAGES
    assert adcc["reciprocam"] > adcc["rollout"] + 0.05, adcc
    assert adcc["reciprocam"] > adcc["grad-rollout"] + 0.05, adcc


def test_reciprocam_finds_which_object_a_class_is_where_rollout_cannot(loaded):
    """On 200 fresh two-object images (two classes, more than 8 px apart), the map of each object's
    class must peak on that object. Attention rollout gives one map for every class, so it can hit
    at most one of the two (50%); the published ViT-ReciproCAM hits significantly more often (on
    the first 100 images of seed 4040 before this test was written: 67% against 50%, 38 wins and 4
    losses over the 200 objects; docs/evaluation.md has 1000 images)."""
    from app.eval.pairs import evaluate_pairs

    report = evaluate_pairs(
        loaded, ("reciprocam", "rollout"), seed=FRESH_SEED, limit=IMAGES, batch_size=50, progress=False
    )
    rows = {row["method"]: row for row in report.rows()}
    assert rows["rollout"]["both"] == 0.0 and rows["rollout"]["class_pointing"] <= 0.5
    assert rows["reciprocam"]["class_pointing"] > rows["rollout"]["class_pointing"] + 0.1, rows
    wins, losses, p = report.paired("rollout")["reciprocam"]
    assert wins > losses and p < 0.01, (wins, losses, p)
