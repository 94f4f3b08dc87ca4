"""Exact reduced evaluation of the ViT-ReciproCAM masked passes.

Every masked copy of a token sequence (``mosaic_k`` in the spec) consists of the ``p`` prefix rows,
the rows in the support of mask ``k`` and ``m_k`` identical all-zero rows. Per-token operations map
identical rows to identical rows and attention gives identical outputs to identical queries, so a
masked sequence is evaluated here on its distinct rows only:

* the prefix rows (when ``keep_prefix``; otherwise they are zero rows too),
* the ``S`` support rows (padded to the largest support with weight-0 rows that no key attends to),
* ONE representative zero row whose key column carries the additive attention bias ``log(m_k)``
  (``-inf`` when ``m_k = 0``), which reproduces the full softmax exactly.

The target block's projections are linear in the masked rows: ``qkv(a * z) = a * (W z) + b``. The
bias-free projection ``W z`` is computed once per image and scaled per mask. When the classifier
reads only prefix tokens (token pooling, distilled heads) the last block needs only the prefix
query rows; if it is also the target block and has no key normalisation, its attention scores and
outputs are gathered from per-image quantities (scores of the prefix queries against every token,
and one dense ``(masks x tokens) @ values`` product), so no per-mask key or value rows exist at all.
The same per-image quantities give the ordinary (unmasked) forward's last block on the prefix rows
(:meth:`ReducedEvaluator.unmasked_logits`), so that block never runs on all tokens.
Average / max pooling use each distinct row with its multiplicity among the pooled tokens.

All masks of all images are evaluated in batched tensor operations (no Python loop over masks);
memory is bounded by evaluating at most ``max_sequences`` masked sequences at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNormFp32, LayerScale, Mlp, RmsNorm, RmsNormFp32
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers.attention import Attention
from timm.layers.mlp import GluMlp, SwiGLU, SwiGLUPacked
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from timm.models.vision_transformer import LayerScale as VitLayerScale
from torch import nn

from app.engine.masks import mask_supports
from app.engine.reciprocam import grid_for_tokens, to_device

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
_PER_TOKEN_MLPS: tuple[type[nn.Module], ...] = (Mlp, GluMlp, SwiGLU, SwiGLUPacked)
_LAYER_SCALES: tuple[type[nn.Module], ...] = (nn.Identity, LayerScale, VitLayerScale)
_POOLS: tuple[str, ...] = ("token", "avg", "max", "avgmax")


def reduced_support_reason(model: nn.Module) -> str | None:
    """``None`` when the reduced evaluation is exact for ``model``; otherwise why it is not."""
    if type(model) not in (VisionTransformer, VisionTransformerDistilled):
        return (
            f"model class {type(model).__name__} is not timm's VisionTransformer or "
            "VisionTransformerDistilled (its head or token handling may differ)"
        )
    if getattr(model, "attn_pool", None) is not None:
        return "attention-pooling head (global_pool 'map'/'prr') mixes all tokens in a learned way"
    distilled = type(model) is VisionTransformerDistilled
    pool = str(getattr(model, "global_pool", "token"))
    if not distilled:
        if pool not in _POOLS:
            return f"global_pool {pool!r} is not one of {', '.join(_POOLS)}"
        if pool == "token" and int(model.num_prefix_tokens) == 0:
            return "token pooling without prefix tokens reads a patch token"
    for name in ("norm", "fc_norm"):
        module = getattr(model, name, nn.Identity())
        if type(module) not in _PER_TOKEN_NORMS:
            return f"model.{name} is {type(module).__name__}, not a known per-token normalisation"
    heads = [model.head, *([model.head_dist] if distilled else [])]
    if any(type(head) not in (nn.Linear, nn.Identity) for head in heads):
        return "classifier head is not a linear layer"
    for index, block in enumerate(model.blocks):
        reason = _block_reason(block)
        if reason is not None:
            return f"block {index}: {reason}"
    return None


def _block_reason(block: nn.Module) -> str | None:
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


@dataclass(frozen=True)
class ReducedLayout:
    """The distinct rows of every masked sequence of one (grid, kernel, keep_prefix) setting.

    Each of the ``n`` masked sequences is represented by ``R`` rows. For row ``r`` of sequence ``k``:
    ``src[k, r]`` is the token of the unmasked sequence it is a multiple of, ``scale[k, r]`` that
    multiple (1 for kept prefix rows, the mask weight for support rows, 0 for the representative
    zero row and for padding), ``key_count[k, r]`` how many of the ``p + n`` tokens it stands for
    (0 for padding) and ``pool_count[k, r]`` how many of the tokens read by average/max pooling.
    ``prefix_rows[t]`` is the row standing for prefix token ``t``.
    """

    src: torch.Tensor  # (n, R) long
    scale: torch.Tensor  # (n, R) float64
    key_count: torch.Tensor  # (n, R) float64
    pool_count: torch.Tensor  # (n, R) float64
    prefix_rows: tuple[int, ...]

    @property
    def num_rows(self) -> int:
        return int(self.src.shape[1])

    def key_bias(self) -> torch.Tensor:
        """(n, R) float32 additive attention bias: ``log(count)``, ``-inf`` for count 0."""
        return torch.log(self.key_count).to(torch.float32)


@lru_cache(maxsize=64)
def reduced_layout(
    height: int, width: int, kernel: str, keep_prefix: bool, num_prefix: int, pool_include_prefix: bool
) -> ReducedLayout:
    """The :class:`ReducedLayout` of an ``height x width`` grid (cached; CPU tensors)."""
    indices, weights = mask_supports(height, width, kernel)
    n = height * width
    support = (weights != 0).to(torch.float64)  # (n, S)
    support_size = support.sum(dim=1)
    kept = num_prefix if keep_prefix else 0
    prefix_src = torch.arange(kept).expand(n, kept)
    prefix_one = torch.ones(n, kept, dtype=torch.float64)
    zero_keys = n - support_size + (num_prefix - kept)
    zero_pool = n - support_size + ((num_prefix - kept) if pool_include_prefix else 0)
    src = torch.cat([prefix_src, num_prefix + indices, torch.zeros(n, 1, dtype=torch.long)], dim=1)
    scale = torch.cat([prefix_one, weights, torch.zeros(n, 1, dtype=torch.float64)], dim=1)
    key_count = torch.cat([prefix_one, support, zero_keys[:, None]], dim=1)
    pool_prefix = prefix_one if pool_include_prefix else torch.zeros_like(prefix_one)
    pool_count = torch.cat([pool_prefix, support, zero_pool[:, None]], dim=1)
    rows = src.shape[1]
    prefix_rows = tuple(range(num_prefix)) if keep_prefix else (rows - 1,) * num_prefix
    return ReducedLayout(src.contiguous(), scale, key_count, pool_count, prefix_rows)


def _rows(tensor: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``tensor`` (b, T, F) gathered at ``src`` (k, R) for every image -> (b, k, R, F)."""
    return tensor[:, src]


def _take_rows(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``tensor[:, rows]``, without the blocking host-to-device copy of ``rows`` that indexing with a
    list makes (on a GPU it would wait for all queued work): a slice where ``rows`` are consecutive."""
    first = rows[0]
    if rows == list(range(first, first + len(rows))):
        return tensor[:, first : first + len(rows)]
    return tensor.index_select(1, to_device(torch.tensor(rows), tensor.device))


def _heads(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(..., R, H*hd) -> (..., H, R, hd)."""
    *lead, rows, dim = tensor.shape
    return tensor.reshape(*lead, rows, num_heads, dim // num_heads).transpose(-3, -2)


def _merge_heads(tensor: torch.Tensor) -> torch.Tensor:
    """(..., H, R, hd) -> (..., R, H*hd)."""
    *lead, heads, rows, dim = tensor.shape
    return tensor.transpose(-3, -2).reshape(*lead, rows, heads * dim)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
    """Softmax attention over the distinct key rows with the multiplicity bias, in float32.

    ``q`` (N, H, Rq, hd), ``k``/``v`` (N, H, R, hd), ``key_bias`` (N, R) float32. Returns (N, H, Rq, hd)
    in the dtype of ``q``.
    """
    out = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=key_bias[:, None, None, :].to(q.device)
    )
    return out.to(q.dtype)


def _softmax_short(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over a short last dimension (the ``R`` rows), written out: on CPU this is several
    times faster than ``Tensor.softmax`` for rows of about ten entries. ``-inf`` entries give 0."""
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    weights = shifted.exp_()
    return weights.div_(weights.sum(dim=-1, keepdim=True))


def _finish_block(
    block: Block, attended: torch.Tensor, gate: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """Attention output rows (N, Rq, D) -> block output rows: norm, gate, proj, layer scales, MLP."""
    attn = block.attn
    out = attn.norm(attended)
    if gate is not None:
        out = out * gate
    y = residual + block.ls1(attn.proj(out))
    return y + block.ls2(block.mlp(block.norm2(y)))


def _block_on_rows(
    block: Block, y: torch.Tensor, key_bias: torch.Tensor, query_rows: list[int] | None
) -> torch.Tensor:
    """A full block on reduced sequences ``y`` (N, R, D); outputs only ``query_rows`` when given."""
    attn = block.attn
    dim = attn.attn_dim
    z = block.norm1(y)
    zq = z if query_rows is None else _take_rows(z, query_rows)
    yq = y if query_rows is None else _take_rows(y, query_rows)
    weight, bias = attn.qkv.weight, attn.qkv.bias
    if query_rows is None:
        q, k, v = attn.qkv(z).split(dim, dim=-1)
    else:
        q = F.linear(zq, weight[:dim], None if bias is None else bias[:dim])
        k, v = F.linear(z, weight[dim:], None if bias is None else bias[dim:]).split(dim, dim=-1)
    heads = attn.num_heads
    q, k, v = attn.q_norm(_heads(q, heads)), attn.k_norm(_heads(k, heads)), _heads(v, heads)
    attended = _merge_heads(_attention(q, k, v, key_bias))
    gate = attn.gate(zq).sigmoid() if attn.gate is not None else None
    return _finish_block(block, attended, gate, yq)


@dataclass(frozen=True)
class LastBlockState:
    """Per-image quantities of the last block (see :meth:`ReducedEvaluator.last_block_state`).

    ``tensors`` all have the images first: ``values`` (B, H, T, hd) and, per query kind (``prefix``:
    the prefix rows the head reads; ``zero``: the representative zero row), ``{kind}_scores``
    (B, H, nq, T) float32, ``{kind}_residual`` (B, nq, D) and, for gated attention, ``{kind}_gate``
    (B, nq, A). ``bias_v`` is the value projection's bias (A,). The key bias ``b_k`` adds ``q . b_k`` to
    every score of a query alike, so it cancels in the softmax and is not kept.
    """

    tensors: dict[str, torch.Tensor]
    bias_v: torch.Tensor

    def select(self, indices: torch.Tensor) -> LastBlockState:
        """The state of a subset of the images (``indices`` into the batch)."""
        picked = {name: t.index_select(0, indices.to(t.device)) for name, t in self.tensors.items()}
        return LastBlockState(picked, self.bias_v)

    def query(self, kind: str) -> dict[str, torch.Tensor]:
        """The per-image inputs of the masked attention for one query kind."""
        t = self.tensors
        return {
            "scores": t[f"{kind}_scores"],
            "values": t["values"],
            "bv": self.bias_v,
            "residual": t[f"{kind}_residual"],
            "gate": t.get(f"{kind}_gate", torch.empty(0)),
        }


class ReducedEvaluator:
    """Masked-pass logits of a timm ViT, computed on the distinct rows of each masked sequence.

    ``max_sequences``: the most masked sequences evaluated at once (memory bound); ``None`` sizes
    chunks so that each holds at most ``ROW_BUDGET`` times as many token rows as the plain forward
    of the same batch (the per-image projections stay resident besides), which keeps the peak
    memory of an explanation near that of the forward pass.
    """

    ROW_BUDGET = 0.5

    def __init__(self, model: nn.Module, *, max_sequences: int | None = None) -> None:
        reason = reduced_support_reason(model)
        if reason is not None:
            raise ValueError(f"reduced evaluation is not exact for this model: {reason}")
        self.model = model
        self.max_sequences = max_sequences
        self.num_prefix = int(model.num_prefix_tokens)
        distilled = type(model) is VisionTransformerDistilled
        self.pool = "token" if distilled else str(model.global_pool)
        # Prefix tokens the head reads (class token; class + distillation token), 0 when pooling.
        self.head_tokens = 2 if distilled else (1 if self.pool == "token" else 0)
        self.pool_include_prefix = bool(getattr(model, "pool_include_prefix", False))
        # (grid, kernel, keep_prefix, device, dtype) -> src, scale, key_bias, pool_count on that
        # device: copied there once, not per call (a blocking copy to a GPU waits for its queue).
        self._on_device: dict[tuple[object, ...], tuple[torch.Tensor, ...]] = {}

    def layout(self, grid: tuple[int, int], kernel: str, keep_prefix: bool) -> ReducedLayout:
        """The row layout for one grid / kernel / keep_prefix setting."""
        return reduced_layout(
            grid[0], grid[1], kernel, bool(keep_prefix), self.num_prefix, self.pool_include_prefix
        )

    def _device_layout(
        self, grid: tuple[int, int], kernel: str, keep_prefix: bool, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, ...]:
        """``src``, ``scale`` (in ``dtype``), the float32 key bias and ``pool_count`` of a layout, on
        ``device``."""
        key = (grid, kernel, bool(keep_prefix), device, dtype)
        cached = self._on_device.get(key)
        if cached is None:
            layout = self.layout(grid, kernel, keep_prefix)
            cached = (
                layout.src.to(device),
                layout.scale.to(device=device, dtype=dtype),
                layout.key_bias().to(device),
                layout.pool_count.to(device),
            )
            self._on_device[key] = cached
        return cached

    def _chunks(
        self, batch: int, n: int, tokens: int, rows: int, max_sequences: int | None
    ) -> Iterator[tuple[slice, slice]]:
        """Rectangles (image range, mask range) of at most ``max_sequences`` sequences each."""
        limit = max_sequences if max_sequences is not None else self.max_sequences
        if limit is None:
            limit = int(self.ROW_BUDGET * batch * tokens) // max(1, rows)
        limit = max(1, int(limit))
        if limit >= n:
            per = max(1, limit // n)
            for b0 in range(0, batch, per):
                yield slice(b0, min(batch, b0 + per)), slice(0, n)
        else:
            for b0 in range(batch):
                for k0 in range(0, n, limit):
                    yield slice(b0, b0 + 1), slice(k0, min(n, k0 + limit))

    @torch.inference_mode()
    def masked_logits(
        self,
        block_index: int,
        block_input: torch.Tensor,
        kernel: str,
        keep_prefix: bool,
        *,
        max_sequences: int | None = None,
        state: LastBlockState | None = None,
    ) -> torch.Tensor:
        """(B, n, C) logits of every masked copy of ``block_input`` (B, p + n, D) at ``block_index``.

        Equals :func:`app.engine.reciprocam.reference_masked_logits` up to float rounding.
        ``state``: :meth:`last_block_state` of the same ``block_input`` (used only when the target is
        the last block and :attr:`fuses_last_block`), so that the per-image projections of the last
        block are shared with :meth:`unmasked_logits` and with other option groups.
        """
        model = self.model
        blocks = list(model.blocks)
        block_index = block_index % len(blocks)
        batch, tokens, _ = block_input.shape
        grid = grid_for_tokens(model, tokens - self.num_prefix)
        n = grid[0] * grid[1]
        layout = self.layout(grid, kernel, keep_prefix)
        src, scale, key_bias, pool_count = self._device_layout(
            grid, kernel, keep_prefix, block_input.device, block_input.dtype
        )
        last = block_index == len(blocks) - 1
        prefix_head = self.head_tokens > 0
        # Query rows of the last block when the head reads prefix tokens only.
        head_rows = list(dict.fromkeys(layout.prefix_rows[: self.head_tokens])) if prefix_head else None
        target = blocks[block_index]
        attn = target.attn
        fast = last and self.fuses_last_block

        projected = gate_lin = per_image = None
        if fast:
            if state is None or (not keep_prefix and "zero_scores" not in state.tensors):
                state = self.last_block_state(block_input, zero_query=not keep_prefix)
            per_image = state.query("prefix" if keep_prefix else "zero")
        else:
            z = target.norm1(block_input)
            projected = F.linear(z, attn.qkv.weight)  # (B, T, 3A): W z without bias, once per image
            gate_lin = F.linear(z, attn.gate.weight) if attn.gate is not None else None
            del z

        rows_per_sequence = len(head_rows) if (fast and head_rows) else layout.num_rows
        outputs: list[torch.Tensor] = []
        for images, masks in self._chunks(batch, n, tokens, rows_per_sequence, max_sequences):
            if per_image is not None:
                y = self._fast_target(target, per_image, images, src[masks], scale[masks], key_bias[masks])
            else:
                assert projected is not None
                y = self._target_rows(
                    target,
                    block_input[images],
                    projected[images],
                    None if gate_lin is None else gate_lin[images],
                    src[masks],
                    scale[masks],
                    key_bias[masks],
                    head_rows if last else None,
                )
                count = images.stop - images.start
                bias = key_bias[masks].repeat(count, 1)
                for later_index in range(block_index + 1, len(blocks)):
                    final = later_index == len(blocks) - 1
                    rows = head_rows if (final and prefix_head) else None
                    y = _block_on_rows(blocks[later_index], y, bias, rows)
            outputs.append(self._head(y, layout, pool_count[masks], images.stop - images.start, head_rows))
        return torch.cat(outputs, dim=0).reshape(batch, n, -1)

    # -- target block -------------------------------------------------------------------------

    def _target_rows(
        self,
        block: Block,
        x: torch.Tensor,
        projected: torch.Tensor,
        gate_lin: torch.Tensor | None,
        src: torch.Tensor,
        scale: torch.Tensor,
        key_bias: torch.Tensor,
        query_rows: list[int] | None,
    ) -> torch.Tensor:
        """The masked target block on the distinct rows, from per-image projections.

        ``x``/``projected`` (b, T, D)/(b, T, 3A) for the chunk's images; ``src``/``scale``/``key_bias``
        (k, R) for its masks. Returns (b * k, Rq, D) output rows (``Rq`` = all rows or ``query_rows``).
        """
        attn = block.attn
        dim, heads = attn.attn_dim, attn.num_heads
        bias = attn.qkv.bias
        count = x.shape[0]
        masks = src.shape[0]
        q_src = src if query_rows is None else _take_rows(src, query_rows)
        q_scale = scale if query_rows is None else _take_rows(scale, query_rows)
        # qkv(a * z) = a * (W z) + b for every distinct row, from the per-image W z.
        kv = _rows(projected[..., dim:], src) * scale[None, :, :, None]
        q = _rows(projected[..., :dim], q_src) * q_scale[None, :, :, None]
        if bias is not None:
            kv = kv + bias[dim:]
            q = q + bias[:dim]
        k, v = kv.split(dim, dim=-1)
        flat = count * masks
        q = attn.q_norm(_heads(q.reshape(flat, -1, dim), heads))
        k = attn.k_norm(_heads(k.reshape(flat, -1, dim), heads))
        v = _heads(v.reshape(flat, -1, dim), heads)
        attended = _merge_heads(_attention(q, k, v, key_bias.repeat(count, 1)))
        gate = None
        if gate_lin is not None:
            gate = _rows(gate_lin, q_src) * q_scale[None, :, :, None]
            if attn.gate.bias is not None:
                gate = gate + attn.gate.bias
            gate = gate.reshape(flat, -1, dim).sigmoid()
        residual = (_rows(x, q_src) * q_scale[None, :, :, None]).reshape(flat, -1, x.shape[-1])
        return _finish_block(block, attended, gate, residual)

    @property
    def fuses_last_block(self) -> bool:
        """Whether the head reads prefix tokens only and the last block has no key normalisation:
        then the last block is evaluated on its prefix query rows from :meth:`last_block_state`,
        for the masked copies and for the unmasked forward alike."""
        return self.head_tokens > 0 and isinstance(self.model.blocks[-1].attn.k_norm, nn.Identity)

    @torch.inference_mode()
    def last_block_state(self, block_input: torch.Tensor, *, zero_query: bool = False) -> LastBlockState:
        """Per-image quantities of the last block, given its input ``x`` (B, T, D).

        Only the prefix rows the head reads are ever needed as queries of the last block. Their
        scores against every unmasked, bias-free key ``W_k z_t`` and the bias-free values ``W_v z_t``
        serve every masked copy of the image (where the prefix is kept) and its unmasked forward.
        With ``zero_query`` the same quantities are added for the query of the representative zero
        row, which stands for the prefix rows of copies that drop them.
        """
        if not self.fuses_last_block:
            raise ValueError("the last block of this model cannot be evaluated on prefix rows only")
        block = self.model.blocks[-1]
        attn = block.attn
        dim, heads = attn.attn_dim, attn.num_heads
        x = block_input
        z = block.norm1(x)
        batch, _, width = x.shape
        w_q, w_k, w_v = attn.qkv.weight.split(dim)
        zeros = z.new_zeros(dim)
        b_q, _, b_v = (zeros, zeros, zeros) if attn.qkv.bias is None else attn.qkv.bias.split(dim)
        keys = _heads(F.linear(z, w_k), heads).float()  # (B, H, T, hd)
        tensors: dict[str, torch.Tensor] = {"values": _heads(F.linear(z, w_v), heads)}  # (B, H, T, hd)
        # query kind -> (bias-free query projection, residual rows, input rows of the gate)
        prefix = z[:, : self.head_tokens]
        queries = {"prefix": (F.linear(prefix, w_q, b_q), x[:, : self.head_tokens], prefix)}
        if zero_query:
            zero_row = z.new_zeros(batch, 1, width)
            queries["zero"] = (b_q.expand(batch, 1, dim), zero_row, zero_row)
        for kind, (q_lin, residual, gate_input) in queries.items():
            q = attn.q_norm(_heads(q_lin, heads)).float() * attn.scale  # (B, H, nq, hd)
            tensors[f"{kind}_scores"] = q @ keys.transpose(-1, -2)  # (B, H, nq, T): q . (W_k z_t)
            tensors[f"{kind}_residual"] = residual
            if attn.gate is not None:
                tensors[f"{kind}_gate"] = attn.gate(gate_input).sigmoid()
        return LastBlockState(tensors, b_v)

    @torch.inference_mode()
    def unmasked_logits(self, state: LastBlockState) -> torch.Tensor:
        """(B, C) logits of the ordinary forward from the :meth:`last_block_state` of its last block.

        The same computation as running the last block and the head, restricted to the rows the head
        reads: attention of the prefix queries over every token (the key bias ``q . b_k`` is the same
        for every key and cancels in the softmax), the block's projection and MLP on those rows.
        """
        model = self.model
        block = model.blocks[-1]
        values = state.tensors["values"]
        weights = state.tensors["prefix_scores"].softmax(dim=-1).to(values.dtype)
        attended = _merge_heads(weights @ values) + state.bias_v
        y = _finish_block(block, attended, state.tensors.get("prefix_gate"), state.tensors["prefix_residual"])
        return model.forward_head(model.norm(y))

    @staticmethod
    def _fast_attention(
        pre: dict[str, torch.Tensor],
        images: slice,
        src: torch.Tensor,
        scale: torch.Tensor,
        key_bias: torch.Tensor,
    ) -> torch.Tensor:
        """Attention output of the prefix query rows for (images x masks): (b * k, nq, A).

        Key row ``r`` of a masked sequence is ``a_r * W_k z_src + b_k``: its score is
        ``a_r * (q . W_k z_src) + q . b_k`` plus the multiplicity bias, where ``q . b_k`` is the same
        for every row and cancels in the softmax. The output
        ``sum_r p_r (a_r W_v z_src + b_v)`` is one dense product of the scattered weights
        ``p_r a_r`` (masks x tokens) with the per-image values, plus ``b_v``.
        """
        scores = pre["scores"][images]  # (b, H, nq, T)
        count, heads, nq, tokens = scores.shape
        masks, rows = src.shape
        scale32 = scale.float()
        gathered = scores[..., src.reshape(-1)].reshape(count, heads, nq, masks, rows)
        logits = gathered * scale32 + key_bias
        weights = _softmax_short(logits) * scale32
        values = pre["values"][images]  # (b, H, T, hd)
        # Dense (masks x tokens) weights in the values' dtype; padding rows add exact zeros.
        coef = values.new_zeros(count, heads, nq, masks, tokens)
        coef.scatter_add_(-1, src.expand(count, heads, nq, masks, rows), weights.to(values.dtype))
        coef = coef.reshape(count, heads, nq * masks, tokens)
        attended = (coef @ values).reshape(count, heads, nq, masks, -1)
        return attended.permute(0, 3, 2, 1, 4).reshape(count * masks, nq, -1) + pre["bv"]

    def _fast_target(
        self,
        block: Block,
        pre: dict[str, torch.Tensor],
        images: slice,
        src: torch.Tensor,
        scale: torch.Tensor,
        key_bias: torch.Tensor,
    ) -> torch.Tensor:
        """The last block's prefix query rows for the chunk's (images x masks): (b * k, nq, D)."""
        attended = self._fast_attention(pre, images, src, scale, key_bias)
        count, masks = images.stop - images.start, src.shape[0]
        flat, nq = attended.shape[0], attended.shape[1]
        gate = None
        if block.attn.gate is not None:
            gate = pre["gate"][images][:, None].expand(count, masks, nq, -1).reshape(flat, nq, -1)
        residual = pre["residual"][images][:, None].expand(count, masks, nq, -1).reshape(flat, nq, -1)
        return _finish_block(block, attended, gate, residual)

    # -- head ------------------------------------------------------------------------------------

    def _head(
        self,
        y: torch.Tensor,
        layout: ReducedLayout,
        pool_count: torch.Tensor,
        count: int,
        head_rows: list[int] | None,
    ) -> torch.Tensor:
        """Logits (b * k, C) from the final rows of each reduced sequence (``pool_count``: the chunk's
        masks' rows of ``layout.pool_count``, on the device)."""
        model = self.model
        if head_rows is not None:
            # y holds the head rows; order them as the prefix tokens the head reads.
            position = [head_rows.index(r) for r in layout.prefix_rows[: self.head_tokens]]
            return model.forward_head(model.norm(_take_rows(y, position)))
        normed = model.norm(y)  # (b * k, R, D)
        weight = pool_count.repeat(count, 1)  # (N, R)
        pooled = None
        if self.pool in ("avg", "avgmax"):
            w = (weight / weight.sum(dim=1, keepdim=True)).to(normed.dtype)
            pooled = (normed * w[..., None]).sum(dim=1)
        if self.pool in ("max", "avgmax"):
            present = (weight > 0)[..., None]
            peak = normed.masked_fill(~present, float("-inf")).amax(dim=1)
            pooled = peak if pooled is None else 0.5 * (peak + pooled)
        assert pooled is not None
        return model.head(model.head_drop(model.fc_norm(pooled)))
