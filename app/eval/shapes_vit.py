"""The shapes ViT's definition: a timm VisionTransformer with a class token on 64x64 inputs with 8x8
patches (an 8x8 patch grid), its data config, the mimetic initialisation it starts from, and the
tokens entering its last block (where the training's feature-masking loss acts)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from app.engine.anatomy import TimmModule
from app.eval.shapes import IMAGE_SIZE, MEAN, STD

ARCH = "vit_tiny_patch16_224"
MODEL_KWARGS: dict[str, Any] = {
    "img_size": IMAGE_SIZE,
    "patch_size": 8,
    "embed_dim": 80,
    "depth": 6,
    "num_heads": 4,
    "mlp_ratio": 4.0,
}
DATA_CONFIG: dict[str, Any] = {
    "input_size": [3, IMAGE_SIZE, IMAGE_SIZE],
    "mean": list(MEAN),
    "std": list(STD),
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "crop_mode": "center",
}


def sincos_position_embedding(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """(grid_h * grid_w, dim) 2-D sine-cosine position embedding (half the channels per axis)."""
    quarter = dim // 4
    frequencies = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float32), torch.arange(grid_w, dtype=torch.float32), indexing="ij"
    )
    parts = []
    for coordinate in (ys.reshape(-1), xs.reshape(-1)):
        angles = coordinate[:, None] * frequencies[None, :]
        parts += [angles.sin(), angles.cos()]
    embedding = torch.cat(parts, dim=1)
    return F.pad(embedding, (0, dim - embedding.shape[1]))


def _low_rank_factors(
    dim: int, rank: int, alpha: float, beta: float, sign: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dim, rank) factors A, B with A B^T the best rank-``rank`` fit of alpha Z + sign beta I."""
    target = alpha * torch.randn(dim, dim) / math.sqrt(dim) + sign * beta * torch.eye(dim)
    u, singular, vh = torch.linalg.svd(target)
    root = singular[:rank].sqrt()
    return u[:, :rank] * root, vh[:rank].T * root


@torch.no_grad()
def mimetic_init_(
    model: nn.Module, qk: tuple[float, float] = (0.7, 0.7), vo: tuple[float, float] = (0.4, 0.4)
) -> None:
    """Initialise attention to mimic trained ViTs (Trockman & Kolter 2023): per head,
    ``W_q W_k^T ~ a Z + b I`` and ``W_v W_o ~ a Z - b I``; position embeddings start as 2-D
    sine-cosine (scaled), so early attention already prefers nearby patches. Only the starting
    point changes; every parameter is trained as usual."""
    vit: TimmModule = model
    grid_h, grid_w = (int(v) for v in vit.patch_embed.grid_size)
    dim = int(vit.embed_dim)
    prefix = int(vit.num_prefix_tokens)
    position = sincos_position_embedding(grid_h, grid_w, dim)
    vit.pos_embed[0, prefix:] = position * 0.5
    for block in vit.blocks:
        attn = block.attn
        heads, head_dim = attn.num_heads, attn.head_dim

        for head in range(heads):
            rows = slice(head * head_dim, (head + 1) * head_dim)
            query, key = _low_rank_factors(dim, head_dim, *qk, sign=1.0)
            attn.qkv.weight[rows] = query.T
            attn.qkv.weight[dim + head * head_dim : dim + (head + 1) * head_dim] = key.T
            value, out = _low_rank_factors(dim, head_dim, *vo, sign=-1.0)
            attn.qkv.weight[2 * dim + head * head_dim : 2 * dim + (head + 1) * head_dim] = value.T
            attn.proj.weight[:, rows] = out / math.sqrt(heads)


def last_block_input(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Tokens entering the model's last block."""
    vit: TimmModule = model
    x: torch.Tensor = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    for block in vit.blocks[:-1]:
        x = block(x)
    return x
