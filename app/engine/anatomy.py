"""What the engine needs to know about a timm Vision Transformer, and the parts every path shares."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from torch import nn

logger = logging.getLogger(__name__)

# A timm ViT or one of its parts, reached by attribute (model.blocks[i].attn.qkv): nn.Module's
# __getattr__ types every such attribute as Tensor | Module, so the engine handles them as Any.
TimmModule: TypeAlias = Any

_BLOCK_PARTS = ("norm1", "attn", "ls1", "norm2", "mlp", "ls2")


class UnsupportedModelError(ValueError):
    """The model's structure is not a timm ViT that ViT-ReciproCAM can explain."""


@dataclass(frozen=True)
class ModelAnatomy:
    """What the engine needs to know about a timm ViT."""

    num_prefix_tokens: int
    grid_size: tuple[int, int]
    num_blocks: int
    num_classes: int
    global_pool: str
    distilled: bool


def resolve_block(target_block: int, num_blocks: int) -> int:
    """``target_block`` (negative counts from the end) as an index of the model's blocks."""
    resolved = target_block + num_blocks if target_block < 0 else target_block
    if not 0 <= resolved < num_blocks:
        raise ValueError(f"target_block {target_block} is outside the model's {num_blocks} blocks")
    return resolved


def inspect_model(model: nn.Module) -> ModelAnatomy:
    """Check that ``model`` has the timm VisionTransformer anatomy the spec relies on."""
    vit: TimmModule = model
    for attr in ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head", "num_prefix_tokens"):
        if not hasattr(vit, attr):
            raise UnsupportedModelError(
                f"{type(vit).__name__} has no {attr!r}: only timm VisionTransformer models "
                "(ViT, DeiT, DeiT distilled, register-token ViTs) can be explained"
            )
    for index, block in enumerate(vit.blocks):
        missing = [part for part in _BLOCK_PARTS if not hasattr(block, part)]
        if missing:
            raise UnsupportedModelError(
                f"block {index} ({type(block).__name__}) lacks {missing}: ViT-ReciproCAM needs pre-norm "
                "blocks (norm1 -> attn -> ls1, norm2 -> mlp -> ls2)"
            )
    grid = tuple(int(v) for v in vit.patch_embed.grid_size)
    if getattr(vit, "dynamic_img_size", False):
        logger.info(
            "model allows dynamic image sizes; ViT-ReciproCAM explains inputs of its configured size "
            "%s only (the map grid is fixed to it)",
            "x".join(str(v) for v in vit.patch_embed.img_size),
        )
    num_classes = int(getattr(vit, "num_classes", 0))
    if num_classes <= 0:
        raise UnsupportedModelError("the model has no classifier head (num_classes is 0)")
    if not getattr(vit, "global_pool", "token"):
        raise UnsupportedModelError(
            "global_pool '' applies the classifier to every token: the model gives no class score "
            "per image to explain"
        )
    return ModelAnatomy(
        num_prefix_tokens=int(vit.num_prefix_tokens),
        grid_size=(grid[0], grid[1]),
        num_blocks=len(vit.blocks),
        num_classes=num_classes,
        global_pool=str(getattr(vit, "global_pool", "token")),
        distilled=hasattr(vit, "head_dist"),
    )


def grid_for_tokens(model: nn.Module, num_patches: int) -> tuple[int, int]:
    """The patch grid for a sequence of ``num_patches`` patch tokens."""
    vit: TimmModule = model
    grid = tuple(int(v) for v in vit.patch_embed.grid_size)
    if grid[0] * grid[1] == num_patches:
        return grid[0], grid[1]
    raise UnsupportedModelError(
        f"{num_patches} patch tokens do not match the model's {grid[0]}x{grid[1]} grid; "
        "feed images of the model's input size"
    )


def head_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Final norm and classifier head on the output tokens of the last block."""
    vit: TimmModule = model
    logits: torch.Tensor = vit.forward_head(vit.norm(tokens))
    return logits
