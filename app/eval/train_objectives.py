"""The training's objectives beyond the class label: augmentation, token and pixel-pattern targets for
the auxiliary patch heads, the feature-masking batch at the last block, and the soft cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from app.engine.anatomy import TimmModule
from app.eval.shapes import SHAPE_CLASSES


def augment(
    batch: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random horizontal flips and quarter turn for images (N, 3, H, W) and their object
    masks (N, H, W); every class is closed under both."""
    flips = torch.rand(batch.shape[0], generator=generator) < 0.5
    batch = torch.where(flips[:, None, None, None], batch.flip(-1), batch)
    masks = torch.where(flips[:, None, None], masks.flip(-1), masks)
    turns = int(torch.randint(0, 4, (1,), generator=generator))
    return torch.rot90(batch, turns, dims=(-2, -1)), torch.rot90(masks, turns, dims=(-2, -1))


def mask_patches(masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, H, W) masks -> (N, h * w, patch_size**2) float pixel patterns, patches in row-major order."""
    patches = F.unfold(masks[:, None].float(), kernel_size=patch_size, stride=patch_size)
    return patches.transpose(1, 2)


def patch_targets(
    masks: torch.Tensor, labels: torch.Tensor, patch_size: int, coverage: float
) -> torch.Tensor:
    """Token labels (N, h, w): the object's class where it covers at least ``coverage`` of the
    patch, else the background id ``num_classes``."""
    covered = F.avg_pool2d(masks[:, None].float(), patch_size)[:, 0]
    background = torch.full_like(covered, len(SHAPE_CLASSES), dtype=torch.long)
    return torch.where(covered >= coverage, labels[:, None, None].expand_as(background), background)


def masked_window_batch(
    model: nn.Module,
    block_input: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    patch_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature masking at the last block: per image, a random window of 1x1 to 3x3 patches keeps
    its tokens with random weights in (0, 1]; every other patch token is zeroed (prefix kept), the
    mask applied to the block's norm1 output and its residual input alike. Target: the class in
    proportion to the share of the object inside the window (saturating at one half), the rest
    uniform; no object in the window, uniform. Returns logits and soft targets (B, C)."""
    batch, tokens, _ = block_input.shape
    vit: TimmModule = model
    prefix = int(vit.num_prefix_tokens)
    grid_h, grid_w = (int(v) for v in vit.patch_embed.grid_size)
    classes = len(SHAPE_CLASSES)
    size = torch.randint(1, 4, (batch,), generator=generator)
    top = (torch.rand(batch, generator=generator) * (grid_h - size + 1)).long()
    left = (torch.rand(batch, generator=generator) * (grid_w - size + 1)).long()
    rows = torch.arange(grid_h).view(1, grid_h, 1)
    cols = torch.arange(grid_w).view(1, 1, grid_w)
    inside = (
        (rows >= top.view(-1, 1, 1))
        & (rows < (top + size).view(-1, 1, 1))
        & (cols >= left.view(-1, 1, 1))
        & (cols < (left + size).view(-1, 1, 1))
    )
    weights = inside.float() * (0.05 + 0.95 * torch.rand(batch, grid_h, grid_w, generator=generator))
    flat = weights.flatten(1).to(block_input.dtype)
    scale = torch.cat([torch.ones(batch, prefix, dtype=flat.dtype), flat], dim=1)[..., None]
    block = vit.blocks[-1]
    z = block.norm1(block_input) * scale
    y = block_input * scale + block.ls1(block.attn(z))
    y = y + block.ls2(block.mlp(block.norm2(y)))
    logits: torch.Tensor = vit.forward_head(vit.norm(y))
    pixel_window = inside.float().repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
    area = masks.flatten(1).sum(1).clamp(min=1)
    share = (masks.float() * pixel_window).flatten(1).sum(1) / area
    evidence = (share / 0.5).clamp(max=1.0) * (labels >= 0).float()
    targets = torch.full((batch, classes), 1.0 / classes)
    known = labels >= 0
    targets[known] = (
        targets[known] * (1 - evidence[known, None])
        + evidence[known, None] * F.one_hot(labels[known], classes).float()
    )
    assert tokens == prefix + grid_h * grid_w
    return logits, targets


def soft_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy with label smoothing; a label of -1 (no object) targets the uniform distribution."""
    classes = logits.shape[-1]
    known = labels >= 0
    target = torch.full_like(logits, smoothing / classes)
    target[known] += F.one_hot(labels[known], classes).to(logits.dtype) * (1 - smoothing)
    target[~known] = 1.0 / classes
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()
