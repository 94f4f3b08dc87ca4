"""ViT-ReciproCAM for timm Vision Transformers: predictions and score maps from one shared forward.

The definition implemented here is the one in ``reciprocam-spec.md`` (docs/method.md): the tokens
entering a target encoder block are masked one patch neighbourhood at a time (the mask applied to
the block's first LayerNorm output, its residual being the masked raw input), the rest of the
network runs on every masked copy, and the class scores of copy ``k`` form cell ``k`` of the map.

:class:`ReciproCAM` runs one shared trunk per batch: blocks ``0..b-1`` once for every image, then
the ordinary forward to the logits (the prediction) and the masked passes (the explanation) from
the same block input. The masked passes are evaluated by a :class:`MaskedEvaluator`: the exact
reduced evaluation (:mod:`app.engine.reduced`) wherever the model allows it, else the literal loop
(:mod:`app.engine.reference`). Where the evaluator shares the last block's per-image state, the
prediction and the maps of that block are computed from it.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from app.engine.anatomy import (
    TimmModule,
    UnsupportedModelError,
    grid_for_tokens,
    inspect_model,
    resolve_block,
)
from app.engine.devices import to_device
from app.engine.evaluator import LastBlockState, MaskedEvaluator
from app.engine.options import ENGINE_PATHS, HOST_WAITS, CamOptions, EnginePath, HostWait, Kernel, one_of
from app.engine.reduced import ReducedEvaluator
from app.engine.reduced_support import reduced_support_reason
from app.engine.reference import ReferenceEvaluator
from app.engine.results import ImageExplanation, MapRequest, collect

logger = logging.getLogger(__name__)

_FALLBACK_LOGGED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models whose fallback was logged


class ReciproCAM:
    """Predictions and ViT-ReciproCAM score maps from one shared forward.

    ``path``: ``"auto"`` uses the exact reduced evaluation wherever the model's structure allows
    it and the reference loop otherwise (the reason is logged once per model and kept in
    ``path_reason``); ``"reference"`` forces the literal loop; ``"reduced"`` fails if the model does
    not allow it. ``max_sequences``: the most masked sequences evaluated at once (memory bound);
    ``None`` uses 256 on the reference path and, on the reduced path, chunks holding about as many
    token rows as the plain forward of the same batch. ``host_wait``: how the calling thread waits
    for a CUDA device to finish a batch before copying the results: ``"block"`` sleeps (the thread
    leaves its core to other work, such as a server's decoding and encoding), ``"spin"`` busy-waits
    (CUDA's default for a process with one context: a core at 100% while the device computes).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        path: EnginePath = "auto",
        max_sequences: int | None = None,
        host_wait: HostWait = "block",
    ) -> None:
        if path not in ENGINE_PATHS:
            raise ValueError(f"unknown path {path!r}; expected {one_of(ENGINE_PATHS)}")
        if host_wait not in HOST_WAITS:
            raise ValueError(f"unknown host_wait {host_wait!r}; expected {one_of(HOST_WAITS)}")
        self.host_wait = host_wait
        self.model = model
        self.anatomy = inspect_model(model)
        self.max_sequences = max_sequences
        self.evaluator, self.path_reason = self._choose_evaluator(path)
        self.path = self.evaluator.path

    def _choose_evaluator(self, path: EnginePath) -> tuple[MaskedEvaluator, str]:
        if path == "reference":
            return self._reference(), "reference path forced by configuration"
        reason = reduced_support_reason(self.model)
        if reason is None:
            evaluator = ReducedEvaluator(self.model, max_sequences=self.max_sequences)
            return evaluator, "model structure allows the exact reduced evaluation"
        if path == "reduced":
            raise UnsupportedModelError(f"reduced evaluation is not possible for this model: {reason}")
        if self.model not in _FALLBACK_LOGGED:
            _FALLBACK_LOGGED.add(self.model)
            logger.warning("ViT-ReciproCAM falls back to the reference path: %s", reason)
        return self._reference(), reason

    def _reference(self) -> ReferenceEvaluator:
        return ReferenceEvaluator(self.model, max_sequences=self.max_sequences)

    def resolve_block(self, target_block: int) -> int:
        return resolve_block(target_block, self.anatomy.num_blocks)

    @torch.inference_mode()
    def explain(
        self,
        images: torch.Tensor,
        options: CamOptions | Sequence[CamOptions | None] | None = CamOptions(),
        *,
        targets: Sequence[Sequence[int] | None] | None = None,
        top_k: int | None = None,
    ) -> list[ImageExplanation]:
        """Predict and explain a batch.

        ``images``: (B, 3, H, W) preprocessed. ``options``: one for all images, or one per image
        (``None`` for an image that only needs its prediction). ``targets``: per image, the class ids
        to return maps for; else ``top_k`` classes of the prediction; else all classes.
        """
        model: TimmModule = self.model
        evaluator = self.evaluator
        self._check_inputs(images)
        batch = images.shape[0]
        requests = self._requests(_per_image_options(options, batch), targets, batch)

        param = next(model.parameters())
        x = images.to(device=param.device, dtype=param.dtype)
        x = model.patch_embed(x)
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        x = model.norm_pre(x)

        blocks = list(model.blocks)
        last = len(blocks) - 1
        # The last block's per-image state, where the evaluator shares it between the prediction
        # and the masked copies of that block (and between the option groups of a batch).
        shared: LastBlockState | None = None
        groups: list[tuple[list[MapRequest], torch.Tensor]] = []  # members, (G, n, C) masked logits
        done = 0
        for stop in sorted({request.block for request in requests}):
            for block in blocks[done:stop]:
                x = block(x)
            done = stop
            by_options = _group_by([request for request in requests if request.block == stop])
            if stop == last:
                zero_query = any(not keep_prefix for _, keep_prefix in by_options)
                shared = evaluator.share_last_block(x, zero_query=zero_query)
            for (kernel, keep_prefix), members in by_options.items():
                indices = [member.index for member in members]
                group_input, group_shared = x, shared
                if indices != list(range(batch)):  # every image: no copy of the block input
                    selected = to_device(torch.tensor(indices), x.device)
                    group_input = x.index_select(0, selected)
                    group_shared = None if shared is None else shared.select(selected)
                result = evaluator.masked_logits(stop, group_input, kernel, keep_prefix, shared=group_shared)
                groups.append((members, result))
        for block in blocks[done:last]:
            x = block(x)
        logits = evaluator.prediction_logits(x, shared).float()
        grid = grid_for_tokens(self.model, x.shape[1] - self.anatomy.num_prefix_tokens)
        return collect(logits, groups, grid, top_k, block=self.host_wait == "block")

    def _requests(
        self,
        per_image: list[CamOptions | None],
        targets: Sequence[Sequence[int] | None] | None,
        batch: int,
    ) -> list[MapRequest]:
        """The maps each image asks for, with its target ids checked and its target block resolved."""
        if targets is not None and len(targets) != batch:
            raise ValueError(f"targets has {len(targets)} entries for {batch} images")
        num_classes = self.anatomy.num_classes
        requests: list[MapRequest] = []
        for index, opts in enumerate(per_image):
            if opts is None:
                continue
            wanted = None if targets is None else targets[index]
            target_tensor = None
            if wanted is not None:
                target_tensor = torch.as_tensor(list(wanted), dtype=torch.long)
                if target_tensor.numel() and (
                    int(target_tensor.min()) < 0 or int(target_tensor.max()) >= num_classes
                ):
                    raise ValueError(f"target ids must be in [0, {num_classes - 1}]")
            requests.append(MapRequest(index, opts, target_tensor, self.resolve_block(opts.target_block)))
        return requests

    def _check_inputs(self, images: torch.Tensor) -> None:
        """Refuse what would give wrong maps without an error: a model in training mode (dropout and
        stochastic depth make every masked pass random), and images of another size than the
        model's (a model with dynamic image sizes would take them, but the grid is fixed)."""
        if any(module.training for module in self.model.modules()):
            raise ValueError(
                "the model is in training mode: dropout and stochastic depth would make the maps "
                "random; call model.eval() first"
            )
        vit: TimmModule = self.model
        expected = getattr(vit.patch_embed, "img_size", None)
        if images.dim() != 4:
            raise ValueError(f"images must be (B, 3, H, W), not {tuple(images.shape)}")
        if expected is not None and tuple(images.shape[-2:]) != tuple(int(v) for v in expected):
            height, width = images.shape[-2:]
            raise ValueError(
                f"images are {height}x{width}; the model's input size is "
                f"{'x'.join(str(int(v)) for v in expected)}, which the map grid follows"
            )

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C) float32 logits of the ordinary forward."""
        param = next(self.model.parameters())
        logits: torch.Tensor = self.model(images.to(device=param.device, dtype=param.dtype))
        return logits.float()


def _per_image_options(
    options: CamOptions | Sequence[CamOptions | None] | None, batch: int
) -> list[CamOptions | None]:
    if options is None or isinstance(options, CamOptions):
        return [options] * batch
    per_image = list(options)
    if len(per_image) != batch:
        raise ValueError(f"options has {len(per_image)} entries for {batch} images")
    return per_image


def _group_by(requests: list[MapRequest]) -> dict[tuple[Kernel, bool], list[MapRequest]]:
    groups: dict[tuple[Kernel, bool], list[MapRequest]] = {}
    for request in requests:
        groups.setdefault((request.options.kernel, request.options.keep_prefix), []).append(request)
    return groups
