"""The literal evaluation of the masked passes, as the spec writes it.

The tokens entering the target block are masked one patch neighbourhood at a time (the mask applied
to the block's first LayerNorm output, its residual being the masked raw input) and the rest of the
network runs on every masked copy. Works for any model with the anatomy :func:`inspect_model`
checks; the reduced evaluation is compared against it.
"""

from __future__ import annotations

import torch
from torch import nn

from app.engine.anatomy import TimmModule, grid_for_tokens, head_logits
from app.engine.evaluator import LastBlockState, MaskedEvaluator
from app.engine.masks import mask_matrix
from app.engine.options import Evaluation, Kernel

REFERENCE_MAX_SEQUENCES = 256


class ReferenceEvaluator(MaskedEvaluator):
    """Masked-pass logits evaluated literally, at most ``max_sequences`` (default 256) masked
    sequences at a time (memory bound)."""

    path: Evaluation = "reference"

    def __init__(self, model: nn.Module, *, max_sequences: int | None = None) -> None:
        self.model = model
        self.max_sequences = max_sequences or REFERENCE_MAX_SEQUENCES

    def masked_logits(
        self,
        block_index: int,
        block_input: torch.Tensor,
        kernel: Kernel,
        keep_prefix: bool,
        *,
        shared: LastBlockState | None = None,
    ) -> torch.Tensor:
        return reference_masked_logits(
            self.model, block_index, block_input, kernel, keep_prefix, max_sequences=self.max_sequences
        )

    def share_last_block(self, last_block_input: torch.Tensor, *, zero_query: bool) -> LastBlockState | None:
        return None

    def prediction_logits(
        self, last_block_input: torch.Tensor, shared: LastBlockState | None
    ) -> torch.Tensor:
        vit: TimmModule = self.model
        return head_logits(self.model, vit.blocks[-1](last_block_input))


def reference_masked_logits(
    model: nn.Module,
    block_index: int,
    block_input: torch.Tensor,
    kernel: Kernel,
    keep_prefix: bool,
    *,
    max_sequences: int = REFERENCE_MAX_SEQUENCES,
) -> torch.Tensor:
    """Logits of every masked copy, evaluated literally as the spec writes it.

    ``block_input``: (B, p + n, D) input of ``blocks[block_index]``. Returns (B, n, C): row ``k`` holds
    the logits of the copy masked at patch ``k``. Memory is bounded by evaluating at most
    ``max_sequences`` masked sequences at a time.
    """
    vit: TimmModule = model
    num_prefix = int(vit.num_prefix_tokens)
    batch, tokens, _ = block_input.shape
    grid_h, grid_w = grid_for_tokens(model, tokens - num_prefix)
    masks = mask_matrix(grid_h, grid_w, kernel, dtype=block_input.dtype, device=block_input.device)
    n = masks.shape[0]
    block = vit.blocks[block_index]
    later_blocks = list(vit.blocks)[block_index + 1 :]
    normed = block.norm1(block_input)
    outputs: list[torch.Tensor] = []
    flat_total = batch * n
    for start in range(0, flat_total, max(1, max_sequences)):
        stop = min(flat_total, start + max(1, max_sequences))
        flat = torch.arange(start, stop, device=block_input.device)
        image_index, mask_index = flat // n, flat % n
        chunk_masks = masks[mask_index]  # (c, n)
        x_k = _mosaic_rows(block_input[image_index], chunk_masks, num_prefix, keep_prefix)
        z_k = _mosaic_rows(normed[image_index], chunk_masks, num_prefix, keep_prefix)
        y = masked_block_forward(block, x_k, z_k)
        for later in later_blocks:
            y = later(y)
        outputs.append(head_logits(model, y))
    return torch.cat(outputs, dim=0).reshape(batch, n, -1)


def masked_block_forward(block: TimmModule, x_masked: torch.Tensor, z_masked: torch.Tensor) -> torch.Tensor:
    """The target block with the mask applied after norm1: residual from the masked raw input."""
    y: torch.Tensor = x_masked + block.ls1(block.attn(z_masked))
    out: torch.Tensor = y + block.ls2(block.mlp(block.norm2(y)))
    return out


def _mosaic_rows(
    tokens: torch.Tensor, masks: torch.Tensor, num_prefix: int, keep_prefix: bool
) -> torch.Tensor:
    """One masked copy per row: ``tokens`` (c, p + n, D), ``masks`` (c, n) -> (c, p + n, D)."""
    patches = masks.to(tokens.dtype)[:, :, None] * tokens[:, num_prefix:, :]
    prefix = tokens[:, :num_prefix, :]
    if not keep_prefix:
        prefix = torch.zeros_like(prefix)
    return torch.cat([prefix, patches], dim=1)
