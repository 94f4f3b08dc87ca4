"""Map post-processing, the one place that turns raw score maps into what a caller asked for, and the
predictions' top-k with labels. Used by every protocol, the command line and the evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from app.engine.maps import normalize_maps, upsample_maps
from app.engine.preprocess import Geometry, project_to_original
from app.serving.options import MAP_SIZES, MapSize


def shape_maps(
    raw: torch.Tensor,
    size: MapSize,
    *,
    input_size: tuple[int, int],
    geometry: Geometry | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """(..., h, w) raw score maps -> float32 maps on the patch grid, the model input (H, W) =
    ``input_size`` or the posted image (``geometry``'s crop undone, zero outside it). Normalised maps
    are min-max scaled into [0, 1] on the grid, and stay in it after resizing."""
    maps = normalize_maps(raw) if normalize else raw.float()
    if size == "grid":
        return maps
    on_input = upsample_maps(maps, input_size)
    if normalize:
        on_input = on_input.clamp_(0.0, 1.0)
    if size == "input":
        return on_input
    if size == "original":
        if geometry is None:
            raise ValueError("maps at the original size need the image's geometry")
        on_original = project_to_original(on_input, geometry)
        return on_original.clamp_(0.0, 1.0) if normalize else on_original
    raise ValueError(f"unknown map size {size!r}; expected one of {', '.join(MAP_SIZES)}")


def predictions(logits: torch.Tensor, top_k: int, labels: Sequence[str]) -> list[dict[str, Any]]:
    """The ``top_k`` classes of (C,) logits, most probable first: id, label, probability, logit."""
    probabilities = logits.float().softmax(-1)
    top = torch.topk(logits.float(), min(top_k, logits.shape[-1]))
    return [
        {
            "class_id": int(index),
            "label": label_of(labels, int(index)),
            "probability": float(probabilities[index]),
            "logit": float(logits[index]),
        }
        for index in top.indices.tolist()
    ]


def label_of(labels: Sequence[str], index: int) -> str:
    return labels[index] if 0 <= index < len(labels) else str(index)
