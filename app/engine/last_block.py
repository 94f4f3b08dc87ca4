"""The last block evaluated on the prefix query rows alone, from per-image quantities.

When the classifier reads only prefix tokens (token pooling, distilled heads) and the last block
has no key normalisation, the last block is needed on those query rows only. Their scores against
every unmasked, bias-free key ``W_k z_t`` and the bias-free values ``W_v z_t`` are computed once per
image (:func:`last_block_state`); they give the ordinary forward's last block
(:func:`unmasked_prefix_rows`) and, gathered per mask, the last block of every masked copy
(:func:`masked_prefix_rows`), so no per-mask key or value rows exist at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from app.engine.anatomy import TimmModule
from app.engine.evaluator import LastBlockState, QueryState
from app.engine.rows import finish_block, merge_heads, softmax_short, split_heads


def fuses_last_block(block: TimmModule, head_tokens: int) -> bool:
    """Whether the last ``block`` can be evaluated on its prefix query rows alone: the head reads
    ``head_tokens`` > 0 prefix tokens and the block has no key normalisation."""
    return head_tokens > 0 and isinstance(block.attn.k_norm, torch.nn.Identity)


def last_block_state(
    block: TimmModule, block_input: torch.Tensor, head_tokens: int, *, zero_query: bool
) -> LastBlockState:
    """Per-image quantities of the last ``block``, given its input ``x`` (B, T, D).

    The queries are the ``head_tokens`` prefix rows the head reads; their scores against every key
    and the values serve every masked copy of the image where the prefix is kept, and its unmasked
    forward. With ``zero_query`` the same quantities are added for the query of the representative
    zero row, which stands for the prefix rows of copies that drop them.
    """
    attn = block.attn
    dim, heads = attn.attn_dim, attn.num_heads
    x = block_input
    z = block.norm1(x)
    batch, _, width = x.shape
    w_q, w_k, w_v = attn.qkv.weight.split(dim)
    zeros = z.new_zeros(dim)
    b_q, _, b_v = (zeros, zeros, zeros) if attn.qkv.bias is None else attn.qkv.bias.split(dim)
    keys = split_heads(F.linear(z, w_k), heads).float()  # (B, H, T, hd)
    values = split_heads(F.linear(z, w_v), heads)  # (B, H, T, hd)

    def query(q_lin: torch.Tensor, residual: torch.Tensor, gate_input: torch.Tensor) -> QueryState:
        q = attn.q_norm(split_heads(q_lin, heads)).float() * attn.scale  # (B, H, nq, hd)
        gate = attn.gate(gate_input).sigmoid() if attn.gate is not None else None
        return QueryState(q @ keys.transpose(-1, -2), residual, gate)  # scores: q . (W_k z_t)

    prefix = z[:, :head_tokens]
    prefix_state = query(F.linear(prefix, w_q, b_q), x[:, :head_tokens], prefix)
    zero_state = None
    if zero_query:
        zero_row = z.new_zeros(batch, 1, width)
        zero_state = query(b_q.expand(batch, 1, dim), zero_row, zero_row)
    return LastBlockState(values, b_v, prefix_state, zero_state)


def unmasked_prefix_rows(block: TimmModule, state: LastBlockState) -> torch.Tensor:
    """The ordinary forward's last block output on the prefix rows (B, nq, D).

    Attention of the prefix queries over every token (the key bias ``q . b_k`` is the same for every
    key and cancels in the softmax), then the block's projection and MLP on those rows.
    """
    values = state.values
    weights = state.prefix.scores.softmax(dim=-1).to(values.dtype)
    attended = merge_heads(weights @ values) + state.bias_v
    return finish_block(block, attended, state.prefix.gate, state.prefix.residual)


def masked_prefix_rows(
    block: TimmModule,
    state: LastBlockState,
    query: QueryState,
    images: slice,
    src: torch.Tensor,
    scale: torch.Tensor,
    key_bias: torch.Tensor,
) -> torch.Tensor:
    """The last block's ``query`` rows for the masked copies (images x masks): (b * k, nq, D).

    ``src``/``scale``/``key_bias`` (k, R): the layout rows of the chunk's masks.
    """
    attended = _masked_attention(state, query, images, src, scale, key_bias)
    count, masks = images.stop - images.start, src.shape[0]
    flat, nq = attended.shape[0], attended.shape[1]
    gate = None
    if block.attn.gate is not None:
        assert query.gate is not None
        gate = query.gate[images][:, None].expand(count, masks, nq, -1).reshape(flat, nq, -1)
    residual = query.residual[images][:, None].expand(count, masks, nq, -1).reshape(flat, nq, -1)
    return finish_block(block, attended, gate, residual)


def _masked_attention(
    state: LastBlockState,
    query: QueryState,
    images: slice,
    src: torch.Tensor,
    scale: torch.Tensor,
    key_bias: torch.Tensor,
) -> torch.Tensor:
    """Attention output of the query rows for (images x masks): (b * k, nq, A).

    Key row ``r`` of a masked sequence is ``a_r * W_k z_src + b_k``: its score is
    ``a_r * (q . W_k z_src) + q . b_k`` plus the multiplicity bias, where ``q . b_k`` is the same
    for every row and cancels in the softmax. The output
    ``sum_r p_r (a_r W_v z_src + b_v)`` is one dense product of the scattered weights
    ``p_r a_r`` (masks x tokens) with the per-image values, plus ``b_v``.
    """
    scores = query.scores[images]  # (b, H, nq, T)
    count, heads, nq, tokens = scores.shape
    masks, rows = src.shape
    scale32 = scale.float()
    gathered = scores[..., src.reshape(-1)].reshape(count, heads, nq, masks, rows)
    logits = gathered * scale32 + key_bias
    weights = softmax_short(logits) * scale32
    values = state.values[images]  # (b, H, T, hd)
    # Dense (masks x tokens) weights in the values' dtype; padding rows add exact zeros.
    coef = values.new_zeros(count, heads, nq, masks, tokens)
    coef.scatter_add_(-1, src.expand(count, heads, nq, masks, rows), weights.to(values.dtype))
    coef = coef.reshape(count, heads, nq * masks, tokens)
    attended = (coef @ values).reshape(count, heads, nq, masks, -1)
    return attended.permute(0, 3, 2, 1, 4).reshape(count * masks, nq, -1) + state.bias_v
