"""Exact reduced evaluation of the ViT-ReciproCAM masked passes.

Every masked copy of a token sequence (``mosaic_k`` in the spec) consists of the ``p`` prefix rows,
the rows in the support of mask ``k`` and ``m_k`` identical all-zero rows. Per-token operations map
identical rows to identical rows and attention gives identical outputs to identical queries, so a
masked sequence is evaluated here on its distinct rows only (:mod:`app.engine.reduced_layout`):

* the prefix rows (when ``keep_prefix``; otherwise they are zero rows too),
* the ``S`` support rows (padded to the largest support with weight-0 rows that no key attends to),
* ONE representative zero row whose key column carries the additive attention bias ``log(m_k)``
  (``-inf`` when ``m_k = 0``), which reproduces the full softmax exactly.

The target block's projections are linear in the masked rows: ``qkv(a * z) = a * (W z) + b``. The
bias-free projection ``W z`` is computed once per image and scaled per mask. When the classifier
reads only prefix tokens (token pooling, distilled heads) the last block needs only the prefix
query rows; if it is also the target block and has no key normalisation, it is evaluated from
per-image quantities (:mod:`app.engine.last_block`), which the ordinary forward's last block shares.
Average / max pooling use each distinct row with its multiplicity among the pooled tokens.

All masks of all images are evaluated in batched tensor operations (no Python loop over masks);
memory is bounded by evaluating at most ``max_sequences`` masked sequences at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from torch import nn

from app.engine.anatomy import TimmModule, grid_for_tokens, head_logits
from app.engine.evaluator import LastBlockState, MaskedEvaluator
from app.engine.last_block import fuses_last_block, last_block_state, masked_prefix_rows, unmasked_prefix_rows
from app.engine.options import Evaluation, Kernel
from app.engine.reduced_layout import ReducedLayout, reduced_layout
from app.engine.reduced_support import reduced_support_reason
from app.engine.rows import (
    block_on_rows,
    finish_block,
    gather_rows,
    merge_heads,
    row_attention,
    split_heads,
    take_rows,
)

# (src, scale, key_bias, pool_count) of a layout on a device
_DeviceLayout = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class ReducedEvaluator(MaskedEvaluator):
    """Masked-pass logits of a timm ViT, computed on the distinct rows of each masked sequence.

    ``max_sequences``: the most masked sequences evaluated at once (memory bound); ``None`` sizes
    chunks so that each holds at most ``ROW_BUDGET`` times as many token rows as the plain forward
    of the same batch (the per-image projections stay resident besides), which keeps the peak
    memory of an explanation near that of the forward pass.
    """

    ROW_BUDGET = 0.5
    path: Evaluation = "reduced"

    def __init__(self, model: nn.Module, *, max_sequences: int | None = None) -> None:
        reason = reduced_support_reason(model)
        if reason is not None:
            raise ValueError(f"reduced evaluation is not exact for this model: {reason}")
        vit: TimmModule = model
        self.model = model
        self.max_sequences = max_sequences
        self.num_prefix = int(vit.num_prefix_tokens)
        distilled = type(model) is VisionTransformerDistilled
        self.pool = "token" if distilled else str(vit.global_pool)
        # Prefix tokens the head reads (class token; class + distillation token), 0 when pooling.
        self.head_tokens = 2 if distilled else (1 if self.pool == "token" else 0)
        self.pool_include_prefix = bool(getattr(model, "pool_include_prefix", False))
        # (grid, kernel, keep_prefix, device, dtype) -> src, scale, key_bias, pool_count on that
        # device: copied there once, not per call (a blocking copy to a GPU waits for its queue).
        self._on_device: dict[tuple[object, ...], _DeviceLayout] = {}

    @property
    def blocks(self) -> list[TimmModule]:
        vit: TimmModule = self.model
        return list(vit.blocks)

    @property
    def fuses_last_block(self) -> bool:
        """Whether the head reads prefix tokens only and the last block has no key normalisation:
        then the last block is evaluated on its prefix query rows from the shared per-image state,
        for the masked copies and for the unmasked forward alike."""
        return fuses_last_block(self.blocks[-1], self.head_tokens)

    def layout(self, grid: tuple[int, int], kernel: Kernel, keep_prefix: bool) -> ReducedLayout:
        """The row layout for one grid / kernel / keep_prefix setting."""
        return reduced_layout(
            grid[0], grid[1], kernel, bool(keep_prefix), self.num_prefix, self.pool_include_prefix
        )

    def _device_layout(
        self,
        grid: tuple[int, int],
        kernel: Kernel,
        keep_prefix: bool,
        device: torch.device,
        dtype: torch.dtype,
    ) -> _DeviceLayout:
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
    def share_last_block(self, last_block_input: torch.Tensor, *, zero_query: bool) -> LastBlockState | None:
        """The per-image state of the last block (see :func:`app.engine.last_block.last_block_state`);
        None unless :attr:`fuses_last_block`."""
        if not self.fuses_last_block:
            return None
        return last_block_state(self.blocks[-1], last_block_input, self.head_tokens, zero_query=zero_query)

    @torch.inference_mode()
    def prediction_logits(
        self, last_block_input: torch.Tensor, shared: LastBlockState | None
    ) -> torch.Tensor:
        """(B, C) logits of the ordinary forward. Where the last block fuses, the same computation as
        running it and the head, restricted to the rows the head reads."""
        last = self.blocks[-1]
        if shared is None:
            shared = self.share_last_block(last_block_input, zero_query=False)
        if shared is None:
            return head_logits(self.model, last(last_block_input))
        return head_logits(self.model, unmasked_prefix_rows(last, shared))

    @torch.inference_mode()
    def masked_logits(
        self,
        block_index: int,
        block_input: torch.Tensor,
        kernel: Kernel,
        keep_prefix: bool,
        *,
        shared: LastBlockState | None = None,
        max_sequences: int | None = None,
    ) -> torch.Tensor:
        """(B, n, C) logits of every masked copy of ``block_input`` (B, p + n, D) at ``block_index``.

        Equals :func:`app.engine.reference.reference_masked_logits` up to float rounding.
        ``shared``: :meth:`share_last_block` of the same ``block_input`` (used only when the target
        is the last block and :attr:`fuses_last_block`), so that the per-image projections of the
        last block are shared with the prediction and with other option groups.
        """
        blocks = self.blocks
        block_index = block_index % len(blocks)
        batch, tokens, _ = block_input.shape
        grid = grid_for_tokens(self.model, tokens - self.num_prefix)
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

        projected = gate_lin = query = None
        if fast:
            if shared is None or (not keep_prefix and shared.zero is None):
                shared = last_block_state(target, block_input, self.head_tokens, zero_query=not keep_prefix)
            query = shared.prefix if keep_prefix else shared.zero
        else:
            z = target.norm1(block_input)
            projected = F.linear(z, attn.qkv.weight)  # (B, T, 3A): W z without bias, once per image
            gate_lin = F.linear(z, attn.gate.weight) if attn.gate is not None else None
            del z

        rows_per_sequence = len(head_rows) if (fast and head_rows) else layout.num_rows
        outputs: list[torch.Tensor] = []
        for images, masks in self._chunks(batch, n, tokens, rows_per_sequence, max_sequences):
            if query is not None:
                assert shared is not None
                y = masked_prefix_rows(
                    target, shared, query, images, src[masks], scale[masks], key_bias[masks]
                )
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
                    y = block_on_rows(blocks[later_index], y, bias, rows)
            outputs.append(self._head(y, layout, pool_count[masks], images.stop - images.start, head_rows))
        return torch.cat(outputs, dim=0).reshape(batch, n, -1)

    def _target_rows(
        self,
        block: TimmModule,
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
        q_src = src if query_rows is None else take_rows(src, query_rows)
        q_scale = scale if query_rows is None else take_rows(scale, query_rows)
        # qkv(a * z) = a * (W z) + b for every distinct row, from the per-image W z.
        kv = gather_rows(projected[..., dim:], src) * scale[None, :, :, None]
        q = gather_rows(projected[..., :dim], q_src) * q_scale[None, :, :, None]
        if bias is not None:
            kv = kv + bias[dim:]
            q = q + bias[:dim]
        k, v = kv.split(dim, dim=-1)
        flat = count * masks
        q = attn.q_norm(split_heads(q.reshape(flat, -1, dim), heads))
        k = attn.k_norm(split_heads(k.reshape(flat, -1, dim), heads))
        v = split_heads(v.reshape(flat, -1, dim), heads)
        attended = merge_heads(row_attention(q, k, v, key_bias.repeat(count, 1)))
        gate = None
        if gate_lin is not None:
            gate = gather_rows(gate_lin, q_src) * q_scale[None, :, :, None]
            if attn.gate.bias is not None:
                gate = gate + attn.gate.bias
            gate = gate.reshape(flat, -1, dim).sigmoid()
        residual = (gather_rows(x, q_src) * q_scale[None, :, :, None]).reshape(flat, -1, x.shape[-1])
        return finish_block(block, attended, gate, residual)

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
        vit: TimmModule = self.model
        if head_rows is not None:
            # y holds the head rows; order them as the prefix tokens the head reads.
            position = [head_rows.index(r) for r in layout.prefix_rows[: self.head_tokens]]
            return head_logits(self.model, take_rows(y, position))
        normed = vit.norm(y)  # (b * k, R, D)
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
        logits: torch.Tensor = vit.head(vit.head_drop(vit.fc_norm(pooled)))
        return logits
