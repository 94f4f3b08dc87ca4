"""Row operations of the reduced evaluation: gathering rows, attention heads, a block on rows.

Sequences here are the distinct rows of masked sequences (see :mod:`app.engine.reduced_layout`),
attended with an additive key bias that stands for each row's multiplicity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from app.engine.anatomy import TimmModule
from app.engine.devices import to_device


def gather_rows(tensor: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``tensor`` (b, T, F) gathered at ``src`` (k, R) for every image -> (b, k, R, F)."""
    return tensor[:, src]


def take_rows(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``tensor[:, rows]``, without the blocking host-to-device copy of ``rows`` that indexing with a
    list makes (on a GPU it would wait for all queued work): a slice where ``rows`` are consecutive."""
    first = rows[0]
    if rows == list(range(first, first + len(rows))):
        return tensor[:, first : first + len(rows)]
    return tensor.index_select(1, to_device(torch.tensor(rows), tensor.device))


def split_heads(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(..., R, H*hd) -> (..., H, R, hd)."""
    *lead, rows, dim = tensor.shape
    return tensor.reshape(*lead, rows, num_heads, dim // num_heads).transpose(-3, -2)


def merge_heads(tensor: torch.Tensor) -> torch.Tensor:
    """(..., H, R, hd) -> (..., R, H*hd)."""
    *lead, heads, rows, dim = tensor.shape
    return tensor.transpose(-3, -2).reshape(*lead, rows, heads * dim)


def row_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
    """Softmax attention over the distinct key rows with the multiplicity bias, in float32.

    ``q`` (N, H, Rq, hd), ``k``/``v`` (N, H, R, hd), ``key_bias`` (N, R) float32. Returns (N, H, Rq, hd)
    in the dtype of ``q``.
    """
    out = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=key_bias[:, None, None, :].to(q.device)
    )
    return out.to(q.dtype)


def softmax_short(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over a short last dimension (the ``R`` rows), written out: on CPU this is several
    times faster than ``Tensor.softmax`` for rows of about ten entries. ``-inf`` entries give 0."""
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    weights = shifted.exp_()
    return weights.div_(weights.sum(dim=-1, keepdim=True))


def finish_block(
    block: TimmModule, attended: torch.Tensor, gate: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """Attention output rows (N, Rq, D) -> block output rows: norm, gate, proj, layer scales, MLP."""
    attn = block.attn
    out = attn.norm(attended)
    if gate is not None:
        out = out * gate
    y: torch.Tensor = residual + block.ls1(attn.proj(out))
    result: torch.Tensor = y + block.ls2(block.mlp(block.norm2(y)))
    return result


def block_on_rows(
    block: TimmModule, y: torch.Tensor, key_bias: torch.Tensor, query_rows: list[int] | None
) -> torch.Tensor:
    """A full block on reduced sequences ``y`` (N, R, D); outputs only ``query_rows`` when given."""
    attn = block.attn
    dim = attn.attn_dim
    z = block.norm1(y)
    zq = z if query_rows is None else take_rows(z, query_rows)
    yq = y if query_rows is None else take_rows(y, query_rows)
    weight, bias = attn.qkv.weight, attn.qkv.bias
    if query_rows is None:
        q, k, v = attn.qkv(z).split(dim, dim=-1)
    else:
        q = F.linear(zq, weight[:dim], None if bias is None else bias[:dim])
        k, v = F.linear(z, weight[dim:], None if bias is None else bias[dim:]).split(dim, dim=-1)
    heads = attn.num_heads
    q, k, v = attn.q_norm(split_heads(q, heads)), attn.k_norm(split_heads(k, heads)), split_heads(v, heads)
    attended = merge_heads(row_attention(q, k, v, key_bias))
    gate = attn.gate(zq).sigmoid() if attn.gate is not None else None
    return finish_block(block, attended, gate, yq)
