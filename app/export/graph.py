"""A traceable torch module that returns a ViT's logits and its ViT-ReciproCAM maps in one graph.

It is the reduced evaluation of docs/method.md written for export: every shape is fixed when the
module is built except the batch, the row layout of the masked sequences is a set of constant
tensors (buffers, which become initializers), and there is no Python control flow that depends on
the data. Each masked copy of the target block's input is evaluated on its distinct rows (kept
prefix rows, the mask's support rows padded with weight-0 rows, one representative zero row whose
key column carries the bias ``log(count)``), and where the head reads prefix tokens only, the last
block computes only those query rows (for the masked copies and for the prediction alike, through
one shared projection and MLP). Logit maps apply only the head's rows of the target classes to the
masked copies. The module equals :meth:`app.engine.reciprocam.ReciproCAM.explain` up to float
rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from torch import nn

from app.engine.anatomy import inspect_model
from app.engine.masks import mask_matrix
from app.engine.options import CamOptions, Kernel
from app.engine.reduced_support import reduced_support_reason

# (pre-logit features (..., D), linear head): the logits are the mean of the heads' outputs
HeadTerm = tuple[torch.Tensor, Any]


class ExportError(ValueError):
    """The model or the options cannot be exported as one explanation graph."""


@dataclass(frozen=True)
class RowLayout:
    """Distinct rows of every masked sequence: for mask ``k`` and row ``r``, ``src[k, r]`` is the
    unmasked token the row is a multiple of, ``scale[k, r]`` that multiple, ``key_count[k, r]`` how
    many of the ``p + n`` tokens it stands for and ``pool_count[k, r]`` how many pooled tokens.
    ``prefix_rows[t]`` is the row standing for prefix token ``t``."""

    src: torch.Tensor  # (n, R) int64
    scale: torch.Tensor  # (n, R) float32
    key_count: torch.Tensor  # (n, R) float64
    pool_count: torch.Tensor  # (n, R) float64
    prefix_rows: tuple[int, ...]


def row_layout(
    grid: tuple[int, int], kernel: Kernel, keep_prefix: bool, num_prefix: int, pool_prefix: bool
) -> RowLayout:
    """The :class:`RowLayout` of a grid, from the spec's mask matrix."""
    matrix = mask_matrix(grid[0], grid[1], kernel, dtype=torch.float64)
    n = matrix.shape[0]
    support = int((matrix != 0).sum(dim=1).max())
    kept = num_prefix if keep_prefix else 0
    src_rows: list[list[int]] = []
    scale_rows: list[list[float]] = []
    key_rows: list[list[float]] = []
    pool_rows: list[list[float]] = []
    for k in range(n):
        cells = torch.nonzero(matrix[k]).flatten().tolist()
        pad = support - len(cells)
        zeros_keys = n - len(cells) + (num_prefix - kept)
        zeros_pool = n - len(cells) + ((num_prefix - kept) if pool_prefix else 0)
        src_rows.append([*range(kept), *(num_prefix + c for c in cells), *([0] * pad), 0])
        scale_rows.append([*([1.0] * kept), *(float(matrix[k, c]) for c in cells), *([0.0] * pad), 0.0])
        key_rows.append([*([1.0] * kept), *([1.0] * len(cells)), *([0.0] * pad), float(zeros_keys)])
        pool_prefix_rows = [1.0 if pool_prefix else 0.0] * kept
        pool_rows.append([*pool_prefix_rows, *([1.0] * len(cells)), *([0.0] * pad), float(zeros_pool)])
    rows = kept + support + 1
    prefix_rows = tuple(range(num_prefix)) if keep_prefix else (rows - 1,) * num_prefix
    return RowLayout(
        torch.tensor(src_rows, dtype=torch.long),
        torch.tensor(scale_rows, dtype=torch.float32),
        torch.tensor(key_rows, dtype=torch.float64),
        torch.tensor(pool_rows, dtype=torch.float64),
        prefix_rows,
    )


def _heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., R, H*hd) -> (..., H, R, hd)."""
    shape = tensor.shape
    return tensor.reshape(*shape[:-1], heads, shape[-1] // heads).transpose(-3, -2)


def _merge(tensor: torch.Tensor) -> torch.Tensor:
    """(..., H, R, hd) -> (..., R, H*hd)."""
    moved = tensor.transpose(-3, -2)
    shape = moved.shape
    return moved.reshape(*shape[:-2], shape[-2] * shape[-1])


def _finish(
    block: Any, attended: torch.Tensor, gate: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """Attention output rows -> block output rows: output norm, gate, projection, layer scales, MLP."""
    out = block.attn.norm(attended)
    if gate is not None:
        out = out * gate
    y = residual + block.ls1(block.attn.proj(out))
    result: torch.Tensor = y + block.ls2(block.mlp(block.norm2(y)))
    return result


class ExplainedViT(nn.Module):
    """``forward(pixel_values[, targets]) -> (logits, targets, maps)`` for a timm ViT.

    ``pixel_values`` (N, 3, H, W) preprocessed; ``targets`` (N, K) int64 class ids, or ``None`` for the
    ``top_k`` classes of the prediction. Returns ``logits`` (N, C), ``targets`` (N, K) and raw
    ``maps`` (N, K, h, w) (logits or probabilities of the masked copies, as ``options.score`` says).
    Maps of class ids outside ``[0, C)`` are NaN.
    """

    # timm modules are read through their attributes (blocks, attn.qkv, ...), which nn.Module types
    # as Tensor | Module
    model: Any
    src: torch.Tensor
    scale: torch.Tensor
    key_bias: torch.Tensor
    pool_weight: torch.Tensor
    pool_present: torch.Tensor

    def __init__(self, model: nn.Module, options: CamOptions = CamOptions(), top_k: int = 1) -> None:
        super().__init__()
        reason = reduced_support_reason(model)
        if reason is not None:
            raise ExportError(f"reduced evaluation is not possible for this model: {reason}")
        if any(module.training for module in model.modules()):
            raise ExportError("the model is in training mode; call model.eval() before export")
        anatomy = inspect_model(model)
        blocks = anatomy.num_blocks
        block = options.target_block + blocks if options.target_block < 0 else options.target_block
        if not 0 <= block < blocks:
            raise ExportError(f"target_block {options.target_block} is outside the model's {blocks} blocks")
        if not 1 <= top_k <= anatomy.num_classes:
            raise ExportError(f"top_k must be in [1, {anatomy.num_classes}], not {top_k}")
        self.model = model
        self.options = options
        self.top_k = top_k
        self.block = block
        self.grid = anatomy.grid_size
        self.num_classes = anatomy.num_classes
        self.num_prefix = anatomy.num_prefix_tokens
        distilled = type(model) is VisionTransformerDistilled
        self.pool = "token" if distilled else anatomy.global_pool
        # Prefix tokens the head reads (class; class + distillation), 0 when it pools patch tokens.
        self.head_tokens = 2 if distilled else (1 if self.pool == "token" else 0)
        last_attn = self.model.blocks[-1].attn
        self.prefix_last = self.head_tokens > 0 and isinstance(last_attn.k_norm, nn.Identity)
        heads = [model.head, *([model.head_dist] if self.head_tokens == 2 else [])]
        # logit maps need the head's rows of the target classes only; probabilities need all classes
        self.target_head = options.score == "logit" and all(isinstance(h, nn.Linear) for h in heads)
        pool_prefix = bool(getattr(model, "pool_include_prefix", False))
        layout = row_layout(self.grid, options.kernel, options.keep_prefix, self.num_prefix, pool_prefix)
        self.prefix_rows = layout.prefix_rows
        self.num_rows = int(layout.src.shape[1])
        self.register_buffer("src", layout.src, persistent=False)
        self.register_buffer("scale", layout.scale, persistent=False)
        self.register_buffer("key_bias", torch.log(layout.key_count).to(torch.float32), persistent=False)
        pooled = layout.pool_count / layout.pool_count.sum(dim=1, keepdim=True)
        self.register_buffer("pool_weight", pooled.to(torch.float32), persistent=False)
        self.register_buffer("pool_present", layout.pool_count > 0, persistent=False)

    # -- the graph -------------------------------------------------------------------------------

    def forward(
        self, pixel_values: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.model
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(pixel_values))))
        blocks = list(model.blocks)
        for block in blocks[: self.block]:
            x = block(x)
        if self.block == len(blocks) - 1 and self.prefix_last:
            logits, terms = self._last_target(x)
        else:
            terms = self._masked(x)
            y = x
            for block in blocks[self.block : -1]:
                y = block(y)
            logits = self._prediction(y)
        if targets is None:
            targets = logits.topk(self.top_k, dim=-1).indices
        valid = (targets >= 0) & (targets < self.num_classes)
        safe = targets.clamp(0, self.num_classes - 1)
        if self.target_head:
            picked = self._target_scores(terms, safe)  # (N, n, K)
        else:
            masked = self._all_scores(terms)  # (N, n, C)
            if self.options.score == "probability":
                masked = masked.softmax(dim=-1)
            n = self.grid[0] * self.grid[1]
            picked = masked.gather(2, safe[:, None, :].expand(-1, n, -1))
        picked = torch.where(valid[:, None, :], picked, torch.full_like(picked, float("nan")))
        maps = picked.transpose(1, 2).reshape(picked.shape[0], -1, self.grid[0], self.grid[1])
        return logits, targets, maps

    # -- the head on the masked copies -----------------------------------------------------------

    def _row_terms(self, normed: torch.Tensor) -> list[HeadTerm]:
        """Final normed prefix rows (M, head_tokens, D) -> the head's terms (the distilled head averages
        the class and distillation tokens' heads)."""
        model = self.model
        if self.head_tokens == 2:
            drop = model.head_drop
            return [(drop(normed[:, 0]), model.head), (drop(normed[:, 1]), model.head_dist)]
        return [(model.forward_head(normed, pre_logits=True), model.head)]

    def _all_scores(self, terms: list[HeadTerm]) -> torch.Tensor:
        """(N, n, C) logits of the masked copies."""
        logits: torch.Tensor = terms[0][1](terms[0][0])
        for features, linear in terms[1:]:
            logits = logits + linear(features)
        if len(terms) > 1:
            logits = logits / len(terms)
        return logits.reshape(-1, self.grid[0] * self.grid[1], self.num_classes)

    def _target_scores(self, terms: list[HeadTerm], targets: torch.Tensor) -> torch.Tensor:
        """(N, n, K) logits of the masked copies for the target classes only: the head's rows of the K
        targets instead of all C classes (the same numbers, C/K times fewer products)."""
        n = self.grid[0] * self.grid[1]
        scores: torch.Tensor | None = None
        for features, linear in terms:
            rows = features.reshape(-1, n, features.shape[-1])  # (N, n, D)
            term = rows @ linear.weight[targets].transpose(1, 2)  # (N, n, K)
            if linear.bias is not None:
                term = term + linear.bias[targets][:, None, :]
            scores = term if scores is None else scores + term
        assert scores is not None
        return scores / len(terms) if len(terms) > 1 else scores

    # -- the prediction --------------------------------------------------------------------------

    def _prediction(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the ordinary forward from the last block's input ``x`` (N, T, D)."""
        model = self.model
        if not self.prefix_last:
            logits: torch.Tensor = model.forward_head(model.norm(model.blocks[-1](x)))
            return logits
        state = self._last_state(x)
        block = model.blocks[-1]
        weights = state["scores"].softmax(dim=-1)
        attended = _merge(weights @ state["values"]) + state["bias_v"]
        y = _finish(block, attended, state.get("gate"), x[:, : self.head_tokens])
        prediction: torch.Tensor = model.forward_head(model.norm(y))
        return prediction

    def _last_state(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image quantities of the last block for the prefix queries the head reads: their scores
        against every bias-free key ``W_k z_t`` (the key bias adds the same ``q . b_k`` to all scores of a
        query and cancels in the softmax), the bias-free values and, with ``zero``, the scores of the
        representative zero row's query."""
        block = self.model.blocks[-1]
        attn = block.attn
        dim, heads = attn.attn_dim, attn.num_heads
        z = block.norm1(x)
        w_q, w_kv = attn.qkv.weight[:dim], attn.qkv.weight[dim:]
        bias = attn.qkv.bias
        b_q = bias[:dim] if bias is not None else None
        # keys and values from one product
        keys, values = (_heads(t, heads) for t in F.linear(z, w_kv).split(dim, dim=-1))  # (N, H, T, hd)
        state = {"values": values, "keys": keys}
        state["bias_v"] = bias[2 * dim :] if bias is not None else torch.zeros_like(w_kv[:dim, 0])
        prefix = z[:, : self.head_tokens]
        q = attn.q_norm(_heads(F.linear(prefix, w_q, b_q), heads)) * attn.scale
        state["scores"] = q @ keys.transpose(-1, -2)  # (N, H, nq, T)
        if attn.gate is not None:
            state["gate"] = attn.gate(prefix).sigmoid()
        return state

    # -- masked copies: the target block is the last block ---------------------------------------

    def _last_target(self, x: torch.Tensor) -> tuple[torch.Tensor, list[HeadTerm]]:
        """Prediction and the head's terms of the masked copies when the target block is the last block
        and the head reads prefix tokens only: the per-mask attention of the prefix queries is gathered
        from the per-image scores and values, and only those rows run through the projection, MLP and
        head."""
        model = self.model
        block = model.blocks[-1]
        attn = block.attn
        state = self._last_state(x)
        weights = state["scores"].softmax(dim=-1)
        attended = _merge(weights @ state["values"]) + state["bias_v"]  # (N, nq, A)

        nq = self.head_tokens
        if self.options.keep_prefix:
            scores = state["scores"]  # (N, H, nq, T)
            residual = x[:, :nq]
            gate = state.get("gate")
        else:
            # the prefix rows of every masked copy are the representative zero row: z = 0, so its query
            # is the query bias, its residual zero and its gate the gate's bias
            dim, heads = attn.attn_dim, attn.num_heads
            zero = x.new_zeros(1, 1, x.shape[-1])
            b_q = attn.qkv.bias[:dim] if attn.qkv.bias is not None else None
            q = attn.q_norm(_heads(F.linear(zero, attn.qkv.weight[:dim], b_q), heads)) * attn.scale
            scores = q @ state["keys"].transpose(-1, -2)  # (N, H, 1, T)
            residual = zero
            gate = attn.gate(zero).sigmoid() if attn.gate is not None else None
        rows = scores[:, :, :, self.src]  # (N, H, nq, n, R)
        probs = (rows * self.scale + self.key_bias).softmax(dim=-1) * self.scale
        values = state["values"][:, :, self.src]  # (N, H, n, R, hd)
        out = probs.transpose(2, 3) @ values  # (N, H, n, nq, hd)
        out = out.permute(0, 2, 3, 1, 4)  # (N, n, nq, H, hd)
        out = out.reshape(out.shape[0], out.shape[1], out.shape[2], -1) + state["bias_v"]
        # the prediction's rows run through the projection, MLP and norm together with the masked
        # copies' rows: one product per layer instead of a second set of one-row products
        if self.options.keep_prefix:
            joined = torch.cat([attended[:, None], out], dim=1)  # (N, 1 + n, nq, A)
            gate_rows = None if gate is None else gate[:, None]
            y = model.norm(_finish(block, joined, gate_rows, residual[:, None]))
            prediction, masked = y[:, 0], y[:, 1:]
        else:
            flat = out[:, :, 0]  # (N, n, A)
            joined = torch.cat([attended, flat], dim=1)  # (N, nq + n, A)
            gate_rows = None
            if gate is not None:
                gate_rows = torch.cat([state["gate"], gate.expand_as(flat)], dim=1)
            # the masked copies' residual is the zero row
            y = model.norm(_finish(block, joined, gate_rows, F.pad(x[:, :nq], (0, 0, 0, flat.shape[1]))))
            prediction, masked = y[:, :nq], y[:, nq:, None].expand(-1, -1, nq, -1)
        logits = model.forward_head(prediction)
        return logits, self._row_terms(masked.reshape(-1, nq, masked.shape[-1]))

    # -- masked copies: general case -------------------------------------------------------------

    def _masked(self, x: torch.Tensor) -> list[HeadTerm]:
        """The head's terms of the masked copies: the target block on the distinct rows from per-image
        projections (``qkv(a z) = a (W z) + b``), later blocks as ordinary blocks with the multiplicity
        bias, and a head that reads the prefix rows or pools with the rows' multiplicities."""
        model = self.model
        blocks = list(model.blocks)
        block = blocks[self.block]
        attn = block.attn
        dim, heads = attn.attn_dim, attn.num_heads
        last = self.block == len(blocks) - 1
        head_rows = list(dict.fromkeys(self.prefix_rows[: self.head_tokens])) if self.head_tokens else None
        query_rows = head_rows if last else None
        z = block.norm1(x)
        projected = F.linear(z, attn.qkv.weight)  # (N, T, 3A)
        scale = self.scale[..., None]
        q_src = self.src if query_rows is None else self.src[:, query_rows]
        q_scale = scale if query_rows is None else scale[:, query_rows]
        kv = projected[:, self.src, dim:] * scale  # (N, n, R, 2A)
        q = projected[:, q_src, :dim] * q_scale
        if attn.qkv.bias is not None:
            kv = kv + attn.qkv.bias[dim:]
            q = q + attn.qkv.bias[:dim]
        k, v = kv.split(dim, dim=-1)
        q, k, v = attn.q_norm(_heads(q, heads)), attn.k_norm(_heads(k, heads)), _heads(v, heads)
        attended = _merge(self._attention(q, k, v, attn.scale))
        gate = None
        if attn.gate is not None:
            gate = F.linear(z, attn.gate.weight)[:, q_src] * q_scale
            if attn.gate.bias is not None:
                gate = gate + attn.gate.bias
            gate = gate.sigmoid()
        y = _finish(block, attended, gate, x[:, q_src] * q_scale)  # (N, n, Rq, D)
        for index in range(self.block + 1, len(blocks)):
            final = index == len(blocks) - 1
            y = self._block_rows(blocks[index], y, head_rows if final else None)
        return self._head(y, head_rows)

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Softmax attention over the distinct rows with the multiplicity bias ``log(count)``."""
        bias = self.key_bias[:, None, None, :]  # (n, 1, 1, R)
        weights = ((q * scale) @ k.transpose(-1, -2) + bias).softmax(dim=-1)
        return weights @ v

    def _block_rows(self, block: Any, y: torch.Tensor, query_rows: list[int] | None) -> torch.Tensor:
        """An ordinary block on the reduced sequences ``y`` (N, n, R, D); only ``query_rows`` out."""
        attn = block.attn
        dim, heads = attn.attn_dim, attn.num_heads
        z = block.norm1(y)
        zq = z if query_rows is None else z[:, :, query_rows]
        yq = y if query_rows is None else y[:, :, query_rows]
        bias = attn.qkv.bias
        q = F.linear(zq, attn.qkv.weight[:dim], None if bias is None else bias[:dim])
        k, v = F.linear(z, attn.qkv.weight[dim:], None if bias is None else bias[dim:]).split(dim, dim=-1)
        q, k, v = attn.q_norm(_heads(q, heads)), attn.k_norm(_heads(k, heads)), _heads(v, heads)
        attended = _merge(self._attention(q, k, v, attn.scale))
        gate = attn.gate(zq).sigmoid() if attn.gate is not None else None
        return _finish(block, attended, gate, yq)

    def _head(self, y: torch.Tensor, head_rows: list[int] | None) -> list[HeadTerm]:
        """The head's terms from the final rows (N, n, R or len(head_rows), D)."""
        model = self.model
        width = y.shape[-1]
        if head_rows is not None:
            position = [head_rows.index(r) for r in self.prefix_rows[: self.head_tokens]]
            rows = y[:, :, position].reshape(-1, self.head_tokens, width)
            return self._row_terms(model.norm(rows))
        normed = model.norm(y)  # (N, n, R, D)
        pooled: torch.Tensor | None = None
        if self.pool in ("avg", "avgmax"):
            pooled = (normed * self.pool_weight[..., None]).sum(dim=2)
        if self.pool in ("max", "avgmax"):
            hidden = torch.full_like(normed, float("-inf"))
            peak = torch.where(self.pool_present[..., None], normed, hidden).amax(dim=2)
            pooled = peak if pooled is None else 0.5 * (peak + pooled)
        assert pooled is not None
        return [(model.head_drop(model.fc_norm(pooled)), model.head)]
