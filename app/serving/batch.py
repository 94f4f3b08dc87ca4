"""One batch: the items a request contributes, their stacked model inputs, one engine call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from app.engine.options import CamOptions
from app.engine.reciprocam import ReciproCAM
from app.engine.results import ImageExplanation


def batch_limit(max_images: int, queued: int, staggered: bool) -> int:
    """The images a batch formed now may take: ``max_images``, or, while another stream computes
    (``staggered``), no more than leaves half a batch queued, and at least half a batch. The next
    stream to free up then finds a batch's worth ready (formed to wait on it, see the batcher)
    instead of waiting for requests still being decoded, which under a steady load arrive together
    as the answers of one batch go out: a batch that took all of them would leave the other streams
    nothing."""
    if not staggered:
        return max_images
    half = max(1, max_images // 2)
    return min(max_images, max(half, queued - half))


@dataclass
class BatchItem:
    """One image and what to compute for it.

    ``image`` is the model input (3, H, W): uint8 pixels, normalised with the batch on the model's
    device, or with ``normalized`` a float tensor the client already normalised. ``options`` None
    means prediction only. ``targets`` are explicit class ids to explain; otherwise the ``top_k``
    most probable classes are explained.
    """

    image: torch.Tensor
    options: CamOptions | None = None
    targets: list[int] | None = None
    top_k: int = 1
    normalized: bool = False


def batch_inputs(
    items: Sequence[BatchItem],
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The batch's model inputs (B, 3, H, W) in item order, on ``device``.

    uint8 pixels are stacked and moved as uint8 (a quarter of the bytes of float32), then
    normalised in one call of ``normalize`` (which takes (..., H, W, 3) pixels) on the device;
    normalised items are taken as they are.
    """
    pixel_rows = [row for row, item in enumerate(items) if not item.normalized]
    tensor_rows = [row for row, item in enumerate(items) if item.normalized]
    if not pixel_rows:
        stacked = torch.stack([item.image for item in items])
        return stacked if device is None else stacked.to(device)
    if normalize is None:
        raise ValueError("uint8 images need a normalize function")
    # stacked as (B, H, W, 3), the layout of decoded pixels: copied once, moved as one block
    pixels = torch.stack([items[row].image.movedim(0, -1) for row in pixel_rows])
    normalized = normalize(pixels if device is None else pixels.to(device))
    if not tensor_rows:
        return normalized
    inputs = torch.empty(
        (len(items), *normalized.shape[1:]), dtype=normalized.dtype, device=normalized.device
    )
    inputs[pixel_rows] = normalized
    inputs[tensor_rows] = torch.stack([items[row].image for row in tensor_rows]).to(inputs)
    return inputs


def run_engine_batch(
    engine: ReciproCAM,
    items: Sequence[BatchItem],
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
) -> list[ImageExplanation]:
    """One ``ReciproCAM.explain`` call for a batch of items (called on the device thread); uint8
    items are normalised here, with the batch, on ``device`` (see :func:`batch_inputs`)."""
    images = batch_inputs(items, normalize, device)
    options = [item.options for item in items]
    targets = [item.targets for item in items] if any(item.targets is not None for item in items) else None
    top_ks = [item.top_k for item in items if item.options is not None and item.targets is None]
    results = engine.explain(images, options, targets=targets, top_k=max(top_ks, default=1))
    for result in results:
        # A NaN or an infinity (an fp16 overflow, broken weights) would reach clients as null where
        # a number is promised: fail the batch, so that splitting isolates the image it came from.
        if not _finite(result.logits) or (result.score_maps is not None and not _finite(result.score_maps)):
            raise NonFiniteOutputError(
                "the model produced non-finite values (NaN or infinity) for this image; with fp16 or bf16 "
                "weights this can be an overflow"
            )
    return results


class NonFiniteOutputError(ValueError):
    """The model's logits or score maps for an image hold NaN or infinity."""


def _finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())
