"""The distinct rows of the masked sequences, per patch grid and mask setting.

Every masked copy of a token sequence consists of the ``p`` prefix rows, the rows in the support of
its mask and identical all-zero rows; the reduced evaluation keeps the first two and ONE
representative zero row, with how many tokens each row stands for.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from app.engine.masks import mask_supports
from app.engine.options import Kernel


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
    height: int, width: int, kernel: Kernel, keep_prefix: bool, num_prefix: int, pool_include_prefix: bool
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
