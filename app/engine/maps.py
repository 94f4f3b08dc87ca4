"""Score maps into displayable form: normalisation, 8-bit levels, upsampling."""

from __future__ import annotations

import torch


def normalize_maps(score_maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-map min-max normalisation over the last two dims, into [0, 1]."""
    flat = score_maps.float().flatten(-2)
    low = flat.min(dim=-1, keepdim=True).values
    high = flat.max(dim=-1, keepdim=True).values
    return ((flat - low) / (high - low + eps)).reshape(score_maps.shape)


def to_uint8(normalized: torch.Tensor) -> torch.Tensor:
    """The 8-bit form: floor(255 * normalised)."""
    return torch.floor(normalized.clamp(0, 1) * 255).to(torch.uint8)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of (..., h, w) maps to ``size`` = (H, W)."""
    shape = maps.shape
    flat = maps.float().reshape(-1, 1, shape[-2], shape[-1])
    out = torch.nn.functional.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*shape[:-2], size[0], size[1])
