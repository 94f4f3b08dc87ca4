"""Saliency-map metrics, usable without the server.

ADCC (Poppi et al. 2021, as the ViT-ReciproCAM authors compute it). Per image and class ``c``: the
min-max normalised map is upsampled to the input and multiplied into the normalised input; ``Y`` and
``O`` are the softmax confidences for ``c`` on the image and on that masked image.

- Average Drop = mean over images of ``max(0, Y - O) / Y``;
- Increase in Confidence = fraction of images with ``O > Y``;
- Coherency = mean of ``(1 + Pearson(map of image, map of masked image)) / 2`` on the grid maps;
- Complexity = mean of the grid map's L1 norm divided by ``h * w``;
- ADCC = ``3 / (1 / Coherency + 1 / (1 - Complexity) + 1 / (1 - Average Drop))`` of the dataset means.

Insertion and deletion (RISE, Petsiuk et al. 2018): pixels are ranked by the upsampled map (highest
first, ties in row-major order) and moved in ``steps`` equal chunks. Deletion starts from the image
and replaces the ranked pixels with the deletion baseline (a zero normalised input, i.e. the mean
colour); insertion starts from the insertion baseline (the image blurred with a Gaussian, sigma 5 px
at 224 px, scaled with the input) and restores the ranked pixels. The score is the area under the
curve of the class's softmax probability against the fraction of pixels moved (trapezoid rule, the
``steps + 1`` points evenly spaced over [0, 1]). Higher insertion and lower deletion are better.

Pointing game (Zhang et al. 2016): a hit when the upsampled map's maximum (the first one in
row-major order) lies within ``tolerance`` pixels (Euclidean) of a pixel of the object mask.

Paired comparison of two methods' pointing hits on the same images: ``wins`` are the images only
the first hits, ``losses`` those only the second hits. The exact McNemar test asks whether wins and
losses could be a fair coin's split of the discordant images (two-sided p-value), and
:func:`strict_win_probability` gives the chance that a sample of ``n`` images shows strictly more
wins than losses at given per-image rates: when both methods are near the ceiling, small samples
decide little.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

ModelFn = Callable[[torch.Tensor], torch.Tensor]  # (N, 3, H, W) -> (N, C) logits


def average_drop(confidence: torch.Tensor, masked_confidence: torch.Tensor) -> torch.Tensor:
    """Per-image ``max(0, Y - O) / Y`` (``Y`` = confidence on the image, ``O`` on the masked one).
    Where ``Y`` is 0 (a float32 softmax underflows past a logit gap of about 104) there is no
    confidence to lose: the drop is 0 instead of 0/0, which would make the whole mean NaN."""
    drop = (confidence - masked_confidence).clamp(min=0)
    positive = confidence > 0
    return torch.where(positive, drop / torch.where(positive, confidence, torch.ones_like(confidence)), 0.0)


def increase_in_confidence(confidence: torch.Tensor, masked_confidence: torch.Tensor) -> torch.Tensor:
    """Per image, 1.0 when the masked image is more confident (``O > Y``), else 0.0."""
    return (masked_confidence > confidence).float()


def pearson(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each pair of maps over their last two dims.

    A constant map has no defined correlation; it counts as uncorrelated (0).
    """
    a = first.double().flatten(-2)
    b = second.double().flatten(-2)
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    denominator = (a.square().sum(-1) * b.square().sum(-1)).sqrt()
    numerator = (a * b).sum(-1)
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, numerator / safe, torch.zeros_like(numerator)).float()


def coherency(maps: torch.Tensor, masked_maps: torch.Tensor) -> torch.Tensor:
    """Per image ``(1 + Pearson(map, map of the masked image)) / 2``, in [0, 1]."""
    return (1 + pearson(maps, masked_maps)) / 2


def complexity(maps: torch.Tensor) -> torch.Tensor:
    """Per image, the normalised grid map's L1 norm divided by its number of cells ``h * w``."""
    return maps.float().abs().flatten(-2).sum(-1) / (maps.shape[-2] * maps.shape[-1])


def adcc(drop: float, coherency_value: float, complexity_value: float) -> float:
    """The harmonic mean of Coherency, 1 - Complexity and 1 - Average Drop (0 if any is 0)."""
    terms = (coherency_value, 1 - complexity_value, 1 - drop)
    if min(terms) <= 0:
        return 0.0
    return 3 / sum(1 / term for term in terms)


def mask_input(inputs: torch.Tensor, upsampled_maps: torch.Tensor) -> torch.Tensor:
    """The explanation map: (N, 3, H, W) normalised inputs times (N, H, W) maps in [0, 1]."""
    return inputs * upsampled_maps[:, None].to(inputs.dtype)


def gaussian_blur(inputs: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) with reflected borders (kernel radius 2 sigma)."""
    radius = max(1, round(2 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=inputs.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(inputs.dtype)
    channels = inputs.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    pad_w = min(radius, inputs.shape[-1] - 1)
    pad_h = min(radius, inputs.shape[-2] - 1)
    out = F.pad(inputs, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w else inputs
    out = F.conv2d(out, horizontal[..., radius - pad_w : radius + pad_w + 1], groups=channels)
    out = F.pad(out, (0, 0, pad_h, pad_h), mode="reflect") if pad_h else out
    return F.conv2d(out, vertical[..., radius - pad_h : radius + pad_h + 1, :], groups=channels)


def insertion_baseline(inputs: torch.Tensor) -> torch.Tensor:
    """The blurred image insertion starts from (sigma = 5 px per 224 px of input width)."""
    return gaussian_blur(inputs, sigma=max(1.0, 5.0 * inputs.shape[-1] / 224))


def deletion_baseline(inputs: torch.Tensor) -> torch.Tensor:
    """The zero normalised input (the normalisation mean colour) deleted pixels become."""
    return torch.zeros_like(inputs)


def pixel_order(saliency: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> (N, H*W) pixel indices, most salient first, ties in row-major order."""
    return torch.sort(saliency.flatten(1), dim=1, descending=True, stable=True).indices


def curve_auc(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid area under (..., S + 1) values evenly spaced over [0, 1]."""
    steps = curve.shape[-1] - 1
    if steps < 1:
        raise ValueError("a curve needs at least two points")
    return (curve.sum(-1) - (curve[..., 0] + curve[..., -1]) / 2) / steps


@torch.no_grad()
def probability_curve(
    model_fn: ModelFn,
    start: torch.Tensor,
    finish: torch.Tensor,
    saliency: torch.Tensor,
    class_ids: torch.Tensor,
    steps: int,
    chunk: int = 256,
) -> torch.Tensor:
    """Softmax probability of ``class_ids`` as the ranked pixels move from ``start`` to ``finish``.

    ``start``/``finish``: (N, 3, H, W); ``saliency``: (N, H, W). Point ``t`` (0..steps) has the
    ``ceil(t * H * W / steps)`` most salient pixels taken from ``finish``. Returns (N, steps + 1).
    """
    batch, _, height, width = start.shape
    pixels = height * width
    order = pixel_order(saliency)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(pixels, device=order.device).expand(batch, -1))
    counts = torch.tensor([-(-t * pixels // steps) for t in range(steps + 1)], device=start.device)
    curves = torch.empty(batch, steps + 1)
    for image in range(batch):
        moved = (rank[image][None, :] < counts[:, None]).view(steps + 1, 1, height, width)
        probabilities = []
        for first in range(0, steps + 1, chunk):
            part = moved[first : first + chunk]
            mixed = torch.where(part, finish[image : image + 1], start[image : image + 1])
            logits = model_fn(mixed).float()
            probabilities.append(logits.softmax(-1)[:, int(class_ids[image])].cpu())
        curves[image] = torch.cat(probabilities)
    return curves


def deletion_curve(
    model_fn: ModelFn, inputs: torch.Tensor, saliency: torch.Tensor, class_ids: torch.Tensor, steps: int
) -> torch.Tensor:
    return probability_curve(model_fn, inputs, deletion_baseline(inputs), saliency, class_ids, steps)


def insertion_curve(
    model_fn: ModelFn, inputs: torch.Tensor, saliency: torch.Tensor, class_ids: torch.Tensor, steps: int
) -> torch.Tensor:
    return probability_curve(model_fn, insertion_baseline(inputs), inputs, saliency, class_ids, steps)


def pointing_hits(upsampled_maps: torch.Tensor, object_masks: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Per image, 1.0 when the map's maximum is within ``tolerance`` px of the object mask."""
    batch, height, width = upsampled_maps.shape
    peak = upsampled_maps.flatten(1).argmax(dim=1)
    peak_y, peak_x = (peak // width).float(), (peak % width).float()
    ys = torch.arange(height, dtype=torch.float32).view(1, height, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, width)
    distance_sq = (ys - peak_y.view(batch, 1, 1)) ** 2 + (xs - peak_x.view(batch, 1, 1)) ** 2
    near = distance_sq <= tolerance**2 + 1e-9
    return (near & object_masks.bool()).flatten(1).any(dim=1).float()


def paired_hits(first: Sequence[float], second: Sequence[float]) -> tuple[int, int]:
    """(wins, losses): images only ``first`` hits, images only ``second`` hits (hits are 0 or 1)."""
    if len(first) != len(second):
        raise ValueError(f"the methods scored {len(first)} and {len(second)} images")
    wins = sum(1 for a, b in zip(first, second, strict=True) if a > 0.5 >= b)
    losses = sum(1 for a, b in zip(first, second, strict=True) if b > 0.5 >= a)
    return wins, losses


def exact_mcnemar(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value: ``2 P(X <= min(wins, losses))`` for ``X ~ Binomial(wins +
    losses, 1/2)``, at most 1 (and 1 when there is no discordant image)."""
    if wins < 0 or losses < 0:
        raise ValueError("counts must not be negative")
    total = wins + losses
    # integers throughout: 2.0**total overflows a float from 1024 discordant images on (1 << total
    # is 2**total, which a type checker reads as int, where it cannot tell the sign of int ** int)
    tail = sum(math.comb(total, k) for k in range(min(wins, losses) + 1)) / (1 << total)
    return min(1.0, 2.0 * tail)


def strict_win_probability(win_rate: float, loss_rate: float, images: int) -> float:
    """Chance that ``images`` independent images give more wins than losses, where each image is a
    win with probability ``win_rate``, a loss with ``loss_rate`` and a tie otherwise."""
    tie_rate = 1.0 - win_rate - loss_rate
    if min(win_rate, loss_rate, tie_rate) < 0:
        raise ValueError("rates must be non-negative and sum to at most 1")
    # distribution of (wins - losses), built image by image
    offset = images
    dist = [0.0] * (2 * images + 1)
    dist[offset] = 1.0
    for _ in range(images):
        step = [0.0] * len(dist)
        for index, mass in enumerate(dist):
            if mass == 0.0:
                continue
            step[index] += mass * tie_rate
            if index + 1 < len(step):
                step[index + 1] += mass * win_rate
            if index > 0:
                step[index - 1] += mass * loss_rate
        dist = step
    return float(sum(dist[offset + 1 :]))
