"""Which models the exact reduced evaluation supports, and why a model is not supported.

The reduced evaluation relies on every part of the network except attention acting on each token
on its own, and on attention being timm's plain softmax attention; only module types known to
behave so are accepted.
"""

from __future__ import annotations

from timm.layers import DropPath, LayerNormFp32, LayerScale, Mlp, RmsNorm, RmsNormFp32
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers.attention import Attention
from timm.layers.mlp import GluMlp, SwiGLU
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from timm.models.vision_transformer import LayerScale as VitLayerScale
from torch import nn

from app.engine.anatomy import TimmModule

# Modules known to act on every token independently (exact types: e.g. LayerNorm2d subclasses
# nn.LayerNorm but normalises over channels-first maps).
_PER_TOKEN_NORMS: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.LayerNorm,
    TimmLayerNorm,
    LayerNormFp32,
    RmsNorm,
    RmsNormFp32,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
# timm's SwiGLUPacked is a partial of GluMlp, so its modules are GluMlp instances
_PER_TOKEN_MLPS: tuple[type[nn.Module], ...] = (Mlp, GluMlp, SwiGLU)
_LAYER_SCALES: tuple[type[nn.Module], ...] = (nn.Identity, LayerScale, VitLayerScale)
_POOLS: tuple[str, ...] = ("token", "avg", "max", "avgmax")


def reduced_support_reason(model: nn.Module) -> str | None:
    """``None`` when the reduced evaluation is exact for ``model``; otherwise why it is not."""
    vit: TimmModule = model
    if type(vit) not in (VisionTransformer, VisionTransformerDistilled):
        return (
            f"model class {type(vit).__name__} is not timm's VisionTransformer or "
            "VisionTransformerDistilled (its head or token handling may differ)"
        )
    if getattr(vit, "attn_pool", None) is not None:
        return "attention-pooling head (global_pool 'map'/'prr') mixes all tokens in a learned way"
    distilled = type(vit) is VisionTransformerDistilled
    pool = str(getattr(vit, "global_pool", "token"))
    if not distilled:
        if pool not in _POOLS:
            return f"global_pool {pool!r} is not one of {', '.join(_POOLS)}"
        if pool == "token" and int(vit.num_prefix_tokens) == 0:
            return "token pooling without prefix tokens reads a patch token"
    for name in ("norm", "fc_norm"):
        module = getattr(vit, name, nn.Identity())
        if type(module) not in _PER_TOKEN_NORMS:
            return f"model.{name} is {type(module).__name__}, not a known per-token normalisation"
    heads = [vit.head, *([vit.head_dist] if distilled else [])]
    if any(type(head) not in (nn.Linear, nn.Identity) for head in heads):
        return "classifier head is not a linear layer"
    for index, block in enumerate(vit.blocks):
        reason = _block_reason(block)
        if reason is not None:
            return f"block {index}: {reason}"
    return None


def _block_reason(block: TimmModule) -> str | None:
    if type(block) is not Block:
        return f"{type(block).__name__} is not timm's pre-norm Block"
    attn = block.attn
    if type(attn) is not Attention:
        return f"attention {type(attn).__name__} is not timm's Attention (e.g. rotary embeddings)"
    if type(attn.qkv) is not nn.Linear or type(attn.proj) is not nn.Linear:
        return "attention projections are not linear layers"
    if attn.gate is not None and type(attn.gate) is not nn.Linear:
        return "attention gate is not a linear layer"
    for name in ("norm1", "norm2"):
        if type(getattr(block, name)) not in _PER_TOKEN_NORMS:
            return f"{name} is {type(getattr(block, name)).__name__}, not a known per-token normalisation"
    for name in ("q_norm", "k_norm", "norm"):
        if type(getattr(attn, name)) not in _PER_TOKEN_NORMS:
            return f"attn.{name} is not a known per-token normalisation"
    if type(block.mlp) not in _PER_TOKEN_MLPS:
        return f"MLP {type(block.mlp).__name__} is not a known per-token MLP"
    for name in ("ls1", "ls2"):
        if type(getattr(block, name)) not in _LAYER_SCALES:
            return f"{name} is {type(getattr(block, name)).__name__}, not a layer scale"
    for name in ("drop_path1", "drop_path2"):
        # identity in eval mode, the only mode ReciproCAM.explain runs in
        if type(getattr(block, name, nn.Identity())) not in (nn.Identity, DropPath):
            return f"{name} is not timm's DropPath"
    return None
