"""The interface of the masked-pass evaluations, and the last-block state a prediction can share.

Two evaluations implement it: the literal loop (:mod:`app.engine.reference`) and the exact reduced
evaluation (:mod:`app.engine.reduced`). :class:`app.engine.reciprocam.ReciproCAM` uses nothing else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from app.engine.options import Evaluation, Kernel


@dataclass(frozen=True)
class QueryState:
    """Per-image inputs of the last block's attention for one kind of query row.

    ``scores`` (B, H, nq, T) float32: each query against every bias-free key ``W_k z_t``;
    ``residual`` (B, nq, D): the rows the attention output is added to; ``gate`` (B, nq, A): the
    sigmoid gate of gated attention, None without.
    """

    scores: torch.Tensor
    residual: torch.Tensor
    gate: torch.Tensor | None

    def select(self, indices: torch.Tensor) -> QueryState:
        """The state of a subset of the images (``indices`` into the batch)."""
        gate = None if self.gate is None else self.gate.index_select(0, indices.to(self.gate.device))
        return QueryState(
            self.scores.index_select(0, indices.to(self.scores.device)),
            self.residual.index_select(0, indices.to(self.residual.device)),
            gate,
        )


@dataclass(frozen=True)
class LastBlockState:
    """Per-image quantities of the last block that the prediction and the maps share.

    ``values`` (B, H, T, hd): the bias-free value projections ``W_v z_t``; ``bias_v`` (A,): the value
    projection's bias; ``prefix``: the prefix rows the head reads as queries; ``zero``: the query of
    the representative zero row, which stands for the prefix rows of copies that drop them (None
    when no copy drops them). The key bias ``b_k`` adds ``q . b_k`` to every score of a query alike,
    so it cancels in the softmax and is not kept.
    """

    values: torch.Tensor
    bias_v: torch.Tensor
    prefix: QueryState
    zero: QueryState | None

    def select(self, indices: torch.Tensor) -> LastBlockState:
        """The state of a subset of the images (``indices`` into the batch)."""
        return LastBlockState(
            self.values.index_select(0, indices.to(self.values.device)),
            self.bias_v,
            self.prefix.select(indices),
            None if self.zero is None else self.zero.select(indices),
        )


class MaskedEvaluator(ABC):
    """Logits of the masked copies of a block input, and the ordinary forward from the last block.

    ``path`` names the evaluation.
    """

    path: Evaluation

    @abstractmethod
    def masked_logits(
        self,
        block_index: int,
        block_input: torch.Tensor,
        kernel: Kernel,
        keep_prefix: bool,
        *,
        shared: LastBlockState | None = None,
    ) -> torch.Tensor:
        """(B, n, C) logits of every masked copy of ``block_input`` (B, p + n, D), the input of
        ``blocks[block_index]``: row ``k`` holds the logits of the copy masked at patch ``k``.
        ``shared``: :meth:`share_last_block` of the same input, when the target is the last block."""

    @abstractmethod
    def share_last_block(self, last_block_input: torch.Tensor, *, zero_query: bool) -> LastBlockState | None:
        """The per-image state of the last block for its input (B, T, D), shared by the prediction
        and the masked copies of that block; ``zero_query`` adds the query of copies that drop the
        prefix. None when this evaluation shares nothing."""

    @abstractmethod
    def prediction_logits(
        self, last_block_input: torch.Tensor, shared: LastBlockState | None
    ) -> torch.Tensor:
        """(B, C) logits of the ordinary forward from the last block's input (B, T, D), or from
        ``shared``, the :meth:`share_last_block` of that input, where there is one."""
