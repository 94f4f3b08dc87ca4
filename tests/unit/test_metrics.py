"""Saliency metrics on small cases whose results are computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from app.eval import metrics


def test_average_drop_and_increase_by_hand():
    confidence = torch.tensor([0.8, 0.5, 0.4, 0.9])
    masked = torch.tensor([0.4, 0.6, 0.4, 0.0])
    # (0.8 - 0.4) / 0.8 = 0.5; O > Y -> 0; equal -> 0; (0.9 - 0) / 0.9 = 1
    assert metrics.average_drop(confidence, masked).tolist() == pytest.approx([0.5, 0.0, 0.0, 1.0])
    # only the second image gains confidence; equality is not an increase
    assert metrics.increase_in_confidence(confidence, masked).tolist() == [0.0, 1.0, 0.0, 0.0]


def test_average_drop_of_an_image_without_confidence_is_zero_not_nan():
    """A float32 softmax underflows to exactly 0 past a logit gap of about 104: such an image has no
    confidence to lose (drop 0, not 0/0), so the dataset mean stays a number; a tiny positive
    confidence is still divided by."""
    confidence = torch.tensor([120.0, 0.0]).softmax(-1)[1:].repeat(2)  # exactly 0.0
    assert confidence.tolist() == [0.0, 0.0]
    drops = metrics.average_drop(torch.tensor([0.0, 0.0, 1e-30]), torch.tensor([0.0, 0.3, 0.0]))
    assert drops.tolist() == [0.0, 0.0, 1.0]
    # subnormal confidences (a logit gap of 87 to 104) are divided by as they are
    subnormal = metrics.average_drop(torch.tensor([1e-40, 1e-40]), torch.tensor([5e-41, 0.0]))
    assert subnormal.tolist() == pytest.approx([0.5, 1.0], rel=1e-3)
    assert torch.isfinite(drops).all()


def test_pearson_and_coherency_by_hand():
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    same_shape_scaled = 2 * a + 5
    reversed_map = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])
    # x = (1, 2, 3, 4), y = (1, 0, 0, 1): centred x = (-1.5, -.5, .5, 1.5), y = (.5, -.5, -.5, .5)
    # sum xy = -.75 + .25 - .25 + .75 = 0 -> r = 0
    orthogonal = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert metrics.pearson(a, same_shape_scaled).item() == pytest.approx(1.0)
    assert metrics.pearson(a, reversed_map).item() == pytest.approx(-1.0)
    assert metrics.pearson(a, orthogonal).item() == pytest.approx(0.0, abs=1e-7)
    # x = (1, 2, 3, 4), y = (1, 1, 1, 2): centred y = (-.25, -.25, -.25, .75); sum xy = 1.5,
    # |x|^2 = 5, |y|^2 = .75 -> r = 1.5 / sqrt(3.75)
    partial = torch.tensor([[[1.0, 1.0], [1.0, 2.0]]])
    expected_r = 1.5 / math.sqrt(3.75)
    assert metrics.pearson(a, partial).item() == pytest.approx(expected_r, rel=1e-6)
    assert metrics.coherency(a, partial).item() == pytest.approx((1 + expected_r) / 2, rel=1e-6)
    assert metrics.coherency(a, reversed_map).item() == pytest.approx(0.0, abs=1e-7)
    # a constant map has no correlation: it counts as 0, coherency 1/2
    assert metrics.coherency(a, torch.ones(1, 2, 2)).item() == pytest.approx(0.5)


def test_complexity_is_mean_absolute_value():
    maps = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[0.0, 0.0], [0.0, 0.0]]])
    assert metrics.complexity(maps).tolist() == pytest.approx([0.5, 0.0])


def test_adcc_is_harmonic_mean_by_hand():
    # coherency 0.9, 1 - complexity 0.6, 1 - drop 0.75: 3 / (1/0.9 + 1/0.6 + 1/0.75)
    expected = 3 / (1 / 0.9 + 1 / 0.6 + 1 / 0.75)
    assert metrics.adcc(drop=0.25, coherency_value=0.9, complexity_value=0.4) == pytest.approx(expected)
    assert metrics.adcc(drop=0.0, coherency_value=1.0, complexity_value=0.0) == pytest.approx(1.0)
    assert metrics.adcc(drop=1.0, coherency_value=1.0, complexity_value=0.0) == 0.0


def test_curve_auc_trapezoid_by_hand():
    # points at 0, 1/2, 1 with values 1, 0.5, 0 -> area 1/2; values 0, 1, 1 -> 1/4 + 1/2 = 3/4
    curves = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 1.0]])
    assert metrics.curve_auc(curves).tolist() == pytest.approx([0.5, 0.75])
    with pytest.raises(ValueError):
        metrics.curve_auc(torch.tensor([1.0]))


def test_pixel_order_breaks_ties_row_major():
    saliency = torch.tensor([[[0.2, 0.9], [0.9, 0.1]]])
    assert metrics.pixel_order(saliency).tolist() == [[1, 2, 0, 3]]


def _pixel_counting_model(images: torch.Tensor) -> torch.Tensor:
    """Two classes; the logit of class 1 is log(#pixels with value 1), class 0 is log(#other)."""
    ones = (images[:, 0] == 1).flatten(1).sum(1).float()
    others = images[0, 0].numel() - ones
    return torch.stack([torch.log(others.clamp(min=1e-9)), torch.log(ones.clamp(min=1e-9))], dim=1)


def test_deletion_curve_by_hand():
    # 2x2 image of ones; class 1's probability is the fraction of ones. Deleting (zeroing) in the
    # saliency order with 4 steps removes one pixel per step: 1, 3/4, 1/2, 1/4, 0 -> AUC 1/2.
    image = torch.ones(1, 3, 2, 2)
    saliency = torch.tensor([[[0.1, 0.4], [0.3, 0.2]]])
    curve = metrics.deletion_curve(_pixel_counting_model, image, saliency, torch.tensor([1]), steps=4)
    assert curve[0].tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0], abs=1e-6)
    assert metrics.curve_auc(curve).item() == pytest.approx(0.5, abs=1e-6)
    # with 2 steps, two pixels per step: 1, 1/2, 0
    curve = metrics.deletion_curve(_pixel_counting_model, image, saliency, torch.tensor([1]), steps=2)
    assert curve[0].tolist() == pytest.approx([1.0, 0.5, 0.0], abs=1e-6)


def test_probability_curve_moves_the_most_salient_pixels_first():
    # Class 1 counts ones. Start all zeros, finish: ones only at (0, 1). A map that ranks (0, 1)
    # first inserts it at the first step; a map that ranks it last inserts it at the end.
    start = torch.zeros(2, 3, 2, 2)
    finish = torch.zeros(2, 3, 2, 2)
    finish[:, :, 0, 1] = 1
    good = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    bad = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    curve = metrics.probability_curve(
        _pixel_counting_model, start, finish, torch.stack([good, bad]), torch.tensor([1, 1]), steps=4
    )
    assert curve[0].tolist() == pytest.approx([0.0, 0.25, 0.25, 0.25, 0.25], abs=1e-6)
    assert curve[1].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.25], abs=1e-6)


def test_baselines_for_insertion_and_deletion():
    image = torch.randn(1, 3, 16, 16)
    assert torch.equal(metrics.deletion_baseline(image), torch.zeros_like(image))
    constant = torch.full((1, 3, 16, 16), 2.5)
    assert torch.allclose(metrics.insertion_baseline(constant), constant)
    blurred = metrics.insertion_baseline(image)
    assert blurred.shape == image.shape and blurred.std() < image.std()
    # the blur keeps the mean of a symmetric pattern and spreads an impulse symmetrically
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[0, 0, 4, 4] = 1
    spread = metrics.gaussian_blur(impulse, sigma=1.0)
    assert spread.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(spread, spread.flip(-1)) and torch.allclose(spread, spread.transpose(-1, -2))
    assert spread[0, 0, 4, 4] == spread.max()


def test_pointing_game_with_tolerance_by_hand():
    maps = torch.zeros(3, 10, 10)
    maps[0, 2, 2] = 1.0  # on the object
    maps[1, 2, 7] = 1.0  # 3 px right of the object's edge at column 4
    maps[2, 9, 9] = 1.0  # far away
    masks = torch.zeros(3, 10, 10, dtype=torch.bool)
    masks[:, 1:4, 1:5] = True
    assert metrics.pointing_hits(maps, masks, tolerance=0).tolist() == [1.0, 0.0, 0.0]
    assert metrics.pointing_hits(maps, masks, tolerance=2).tolist() == [1.0, 0.0, 0.0]
    assert metrics.pointing_hits(maps, masks, tolerance=3).tolist() == [1.0, 1.0, 0.0]
    # the first maximum in row-major order counts
    tie = torch.zeros(1, 10, 10)
    tie[0, 2, 2] = tie[0, 9, 9] = 1.0
    assert metrics.pointing_hits(tie, masks[:1], tolerance=0).tolist() == [1.0]


def test_mask_input_multiplies_every_channel():
    inputs = torch.arange(12.0).reshape(1, 3, 2, 2)
    maps = torch.tensor([[[1.0, 0.0], [0.5, 0.0]]])
    masked = metrics.mask_input(inputs, maps)
    assert masked[0, :, 0, 0].tolist() == inputs[0, :, 0, 0].tolist()
    assert masked[0, :, 1, 0].tolist() == (inputs[0, :, 1, 0] * 0.5).tolist()
    assert masked[0, :, :, 1].abs().sum() == 0


def test_paired_hits_counts_the_images_only_one_method_hits():
    first = [1.0, 0.0, 1.0, 0.0, 1.0]
    second = [1.0, 1.0, 0.0, 0.0, 0.0]
    # only the first hits images 2 and 4; only the second hits image 1; images 0 and 3 tie
    assert metrics.paired_hits(first, second) == (2, 1)
    assert metrics.paired_hits(second, first) == (1, 2)
    with pytest.raises(ValueError):
        metrics.paired_hits([1.0], [1.0, 0.0])


def test_exact_mcnemar_by_hand():
    assert metrics.exact_mcnemar(0, 0) == 1.0
    # 5 discordant images, all wins: 2 * (1/2)^5
    assert metrics.exact_mcnemar(5, 0) == pytest.approx(0.0625)
    assert metrics.exact_mcnemar(0, 5) == pytest.approx(0.0625)
    # 1 of 6: 2 * (C(6,0) + C(6,1)) / 2^6 = 14 / 64
    assert metrics.exact_mcnemar(1, 5) == pytest.approx(14 / 64)
    # 2 of 4: 2 * (1 + 4 + 6) / 16 > 1, capped
    assert metrics.exact_mcnemar(2, 2) == 1.0
    assert metrics.exact_mcnemar(10, 0) == pytest.approx(2 / 1024)
    # thousands of discordant images (a float 2.0**n overflows from n = 1024): still exact
    assert metrics.exact_mcnemar(600, 600) == 1.0
    assert 0.0 < metrics.exact_mcnemar(600, 500) < 0.01
    assert metrics.exact_mcnemar(600, 500) == pytest.approx(metrics.exact_mcnemar(500, 600))
    assert 0.0 < metrics.exact_mcnemar(1000, 30) < 1e-200
    with pytest.raises(ValueError):
        metrics.exact_mcnemar(-1, 3)


def test_strict_win_probability_by_hand():
    # one image: a win with probability 0.3
    assert metrics.strict_win_probability(0.3, 0.2, 1) == pytest.approx(0.3)
    # two images (tie rate 0.5): win-win, or one win and one tie in either order
    assert metrics.strict_win_probability(0.3, 0.2, 2) == pytest.approx(0.3**2 + 2 * 0.3 * 0.5)
    # three images: W - L > 0 for WWW, WWT (3 orders), WTT (3), WWL (3)
    w, lo, t = 0.2, 0.1, 0.7
    expected = w**3 + 3 * w**2 * t + 3 * w * t**2 + 3 * w**2 * lo
    assert metrics.strict_win_probability(w, lo, 3) == pytest.approx(expected)
    assert metrics.strict_win_probability(0.0, 0.1, 5) == 0.0
    assert metrics.strict_win_probability(1.0, 0.0, 3) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        metrics.strict_win_probability(0.7, 0.5, 3)
