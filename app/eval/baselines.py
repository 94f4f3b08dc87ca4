"""Saliency methods compared in the evaluation, all with one signature.

Every method takes a model, a batch of normalised inputs (B, 3, H, W) and class ids (B,) and returns
raw maps (B, h, w) on the model's patch grid (higher = more important); the evaluation min-max
normalises them.

- ``reciprocam`` and its variants: ViT-ReciproCAM through :class:`app.engine.reciprocam.ReciproCAM`
  (3x3 Gaussian or Dirac masks, class token kept or dropped, last or second-to-last block).
- ``rollout``: attention rollout (Abnar & Zuidema 2020): per block the head-mean attention plus the
  identity for the residual, rows renormalised, multiplied over the blocks; the map is the class
  token's row over the patch tokens. It does not depend on the class.
- ``grad-rollout``: gradient-weighted rollout, the generic rule of Chefer et al. 2021:
  ``R = I``, then per block ``R = R + mean_h(relu(dS_c/dA * A)) R``; the class token's row.
- ``gradcam``: Grad-CAM on the output tokens of the last block's ``norm1``: channel weights are the
  patch-mean gradients of the class logit, the map is ``relu(sum_d weight_d * token_d)``.

Attention probabilities are not materialised by timm's fused attention, so
:func:`capture_attention` temporarily replaces each block's ``attn.forward`` with an explicit,
numerically equivalent computation that records them; the originals are restored on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

from app.engine.anatomy import TimmModule
from app.engine.options import CamOptions
from app.engine.reciprocam import ReciproCAM

MapFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (inputs, class_ids) -> (B, h, w)


RECIPROCAM_VARIANTS: dict[str, CamOptions] = {
    "reciprocam": CamOptions(),
    "reciprocam-dirac": CamOptions(kernel="dirac"),
    "reciprocam-noprefix": CamOptions(keep_prefix=False),
    "reciprocam-dirac-noprefix": CamOptions(kernel="dirac", keep_prefix=False),
    "reciprocam-block-2": CamOptions(target_block=-2),
}

METHODS: dict[str, str] = {
    "reciprocam": "ViT-ReciproCAM, 3x3 Gaussian masks, class token kept, last block (the published method)",
    "reciprocam-dirac": "ViT-ReciproCAM, Dirac (1x1) masks",
    "reciprocam-noprefix": "ViT-ReciproCAM, prefix tokens zeroed in the masked copies",
    "reciprocam-dirac-noprefix": "ViT-ReciproCAM, Dirac masks, prefix tokens zeroed",
    "reciprocam-block-2": "ViT-ReciproCAM on the second-to-last block",
    "rollout": "attention rollout (Abnar & Zuidema 2020), head mean, residual identity",
    "grad-rollout": "gradient-weighted attention rollout (Chefer et al. 2021, generic rule)",
    "gradcam": "Grad-CAM on the last block's norm1 output tokens",
}
DEFAULT_METHODS: tuple[str, ...] = tuple(METHODS)


def _grid(model: nn.Module) -> tuple[int, int]:
    vit: TimmModule = model
    height, width = (int(v) for v in vit.patch_embed.grid_size)
    return height, width


def _explicit_attention_forward(
    attn: nn.Module, store: list[torch.Tensor], retain_grad: bool
) -> Callable[..., torch.Tensor]:
    """An ``Attention.forward`` that computes softmax(q k^T * scale) explicitly and records it."""

    def forward(
        self: TimmModule, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **_: object
    ) -> torch.Tensor:
        batch, tokens, _channels = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        if attn_mask is not None:
            scores = (
                scores + attn_mask
                if attn_mask.dtype != torch.bool
                else scores.masked_fill(~attn_mask, float("-inf"))
            )
        probabilities = scores.softmax(dim=-1)
        if retain_grad and probabilities.requires_grad:
            probabilities.retain_grad()
        store.append(probabilities)
        out = (self.attn_drop(probabilities) @ v).transpose(1, 2).reshape(batch, tokens, -1)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        projected: torch.Tensor = self.proj_drop(self.proj(out))
        return projected

    return MethodType(forward, attn)


@contextlib.contextmanager
def capture_attention(model: nn.Module, retain_grad: bool = False) -> Iterator[list[torch.Tensor]]:
    """Record every block's attention probabilities (B, heads, T, T), in block order, per forward."""
    store: list[torch.Tensor] = []
    originals: list[tuple[TimmModule, object]] = []
    vit: TimmModule = model
    try:
        for block in vit.blocks:
            attn = block.attn
            for needed in ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm", "proj"):
                if not hasattr(attn, needed):
                    raise ValueError(
                        f"{type(attn).__name__} lacks {needed!r}: attention capture needs timm's Attention"
                    )
            originals.append((attn, attn.__dict__.get("forward")))
            attn.forward = _explicit_attention_forward(attn, store, retain_grad)
        yield store
    finally:
        for attn, original in originals:
            if original is None:
                del attn.forward
            else:
                attn.forward = original


def _class_token_row(relevance: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """(B, T, T) relevance -> (B, h, w): the first (class) token's row over the patch tokens."""
    vit: TimmModule = model
    prefix = int(vit.num_prefix_tokens)
    height, width = _grid(model)
    return relevance[:, 0, prefix:].reshape(-1, height, width)


def _require_class_token(model: nn.Module, method: str) -> None:
    if not getattr(model, "cls_token", None) is not None:
        raise ValueError(f"{method} reads the class token's row; the model has no class token")


@torch.no_grad()
def attention_rollout(model: nn.Module, inputs: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    """Attention rollout: prod over blocks of rownorm(mean_h(A) + I); class-independent."""
    del class_ids
    _require_class_token(model, "attention rollout")
    with capture_attention(model) as attentions:
        model(inputs)
    tokens = attentions[0].shape[-1]
    identity = torch.eye(tokens, dtype=torch.float64, device=inputs.device)
    rollout = identity.expand(inputs.shape[0], tokens, tokens)
    for attention in attentions:
        mixed = attention.double().mean(dim=1) + identity
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed @ rollout
    return _class_token_row(rollout, model).float()


def _class_scores(logits: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, class_ids.view(-1, 1).to(logits.device)).sum()


def gradient_rollout(model: nn.Module, inputs: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    """Chefer et al.'s generic rule: R = I; R += mean_h(relu(grad * A)) @ R over the blocks."""
    _require_class_token(model, "gradient-weighted rollout")
    with torch.enable_grad(), capture_attention(model, retain_grad=True) as attentions:
        source = inputs.detach().clone().requires_grad_(True)
        logits = model(source)
        _class_scores(logits, class_ids).backward()
    tokens = attentions[0].shape[-1]
    relevance = torch.eye(tokens, dtype=torch.float64, device=inputs.device).repeat(inputs.shape[0], 1, 1)
    for attention in attentions:
        assert attention.grad is not None
        weighted = (attention.grad * attention).clamp(min=0).mean(dim=1).double().detach()
        relevance = relevance + weighted @ relevance
    return _class_token_row(relevance, model).float()


def grad_cam(model: nn.Module, inputs: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    """Grad-CAM on the patch tokens of the last block's norm1 output."""
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, _args: object, output: torch.Tensor) -> None:
        output.retain_grad()
        captured.append(output)

    vit: TimmModule = model
    handle = vit.blocks[-1].norm1.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            source = inputs.detach().clone().requires_grad_(True)
            logits = model(source)
            _class_scores(logits, class_ids).backward()
    finally:
        handle.remove()
    tokens = captured[-1]
    assert tokens.grad is not None
    prefix = int(vit.num_prefix_tokens)
    activations = tokens[:, prefix:].detach().float()
    gradients = tokens.grad[:, prefix:].float()
    weights = gradients.mean(dim=1, keepdim=True)  # (B, 1, D)
    cam = F.relu((weights * activations).sum(dim=-1))
    height, width = _grid(model)
    return cam.reshape(-1, height, width)


def reciprocam_maps(
    engine: ReciproCAM, options: CamOptions, inputs: torch.Tensor, class_ids: torch.Tensor
) -> torch.Tensor:
    """Raw ViT-ReciproCAM score maps (B, h, w) for one class per image."""
    results = engine.explain(inputs, options, targets=[[int(c)] for c in class_ids.tolist()])
    maps = []
    for result in results:
        assert result.score_maps is not None
        maps.append(result.score_maps[0])
    return torch.stack(maps)


def make_method(name: str, model: nn.Module, engine: ReciproCAM | None = None) -> MapFn:
    """The map function for a method name (see :data:`METHODS`)."""
    if name in RECIPROCAM_VARIANTS:
        explainer = engine if engine is not None else ReciproCAM(model)
        options = RECIPROCAM_VARIANTS[name]
        return lambda inputs, class_ids: reciprocam_maps(explainer, options, inputs, class_ids)
    if name == "rollout":
        return lambda inputs, class_ids: attention_rollout(model, inputs, class_ids)
    if name == "grad-rollout":
        return lambda inputs, class_ids: gradient_rollout(model, inputs, class_ids)
    if name == "gradcam":
        return lambda inputs, class_ids: grad_cam(model, inputs, class_ids)
    raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
