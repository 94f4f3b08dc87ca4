"""ViT-ReciproCAM for timm Vision Transformers: the engine's public API and the reference path.

The definition implemented here is the one in ``reciprocam-spec.md`` (docs/method.md): the tokens
entering a target encoder block are masked one patch neighbourhood at a time (the mask applied to
the block's first LayerNorm output, its residual being the masked raw input), the rest of the
network runs on every masked copy, and the class scores of copy ``k`` form cell ``k`` of the map.

:class:`ReciproCAM` runs one shared trunk per batch: blocks ``0..b-1`` once for every image, then
the ordinary forward to the logits (the prediction) and the masked passes (the explanation) from
the same block input. ``reference_masked_logits`` is the literal per-mask evaluation; the exact
reduced evaluation in :mod:`app.engine.reduced` is used instead wherever the model allows it. Where
the head reads prefix tokens only and the last block has no key normalisation, the reduced path
also runs the ordinary forward's last block on those rows alone, from the per-image projections
its masked copies use.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from app.engine.masks import KERNELS, mask_matrix

if TYPE_CHECKING:  # reduced imports this module
    from app.engine.reduced import LastBlockState, ReducedEvaluator

logger = logging.getLogger(__name__)

Score = Literal["logit", "probability"]
SCORES: tuple[str, ...] = ("logit", "probability")
PathChoice = Literal["auto", "reduced", "reference"]
HostWait = Literal["block", "spin"]
HOST_WAITS: tuple[str, ...] = ("block", "spin")
REFERENCE_MAX_SEQUENCES = 256
_FALLBACK_LOGGED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models whose fallback was logged


class UnsupportedModelError(ValueError):
    """The model's structure is not a timm ViT that ViT-ReciproCAM can explain."""


@dataclass(frozen=True)
class CamOptions:
    """Per-image explanation options; the defaults are the published method."""

    kernel: str = "gaussian"
    keep_prefix: bool = True
    score: str = "logit"
    target_block: int = -1

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown kernel {self.kernel!r}; expected one of {', '.join(KERNELS)}")
        if self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}; expected one of {', '.join(SCORES)}")


@dataclass
class ImageExplanation:
    """Result for one image.

    ``logits``: (C,) float32 logits of the ordinary, unmasked forward.
    ``score_maps``: (K, h, w) float32 raw score maps for ``targets`` (None for prediction only).
    ``targets``: (K,) long class ids the maps belong to (all classes when none were requested).
    """

    logits: torch.Tensor
    score_maps: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    options: CamOptions | None = None

    @property
    def probabilities(self) -> torch.Tensor:
        return self.logits.softmax(-1)


@dataclass(frozen=True)
class ModelAnatomy:
    """What the engine needs to know about a timm ViT."""

    num_prefix_tokens: int
    grid_size: tuple[int, int]
    num_blocks: int
    num_classes: int
    global_pool: str
    distilled: bool

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]


_BLOCK_PARTS = ("norm1", "attn", "ls1", "norm2", "mlp", "ls2")


def inspect_model(model: nn.Module) -> ModelAnatomy:
    """Check that ``model`` has the timm VisionTransformer anatomy the spec relies on."""
    for attr in ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head", "num_prefix_tokens"):
        if not hasattr(model, attr):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no {attr!r}: only timm VisionTransformer models "
                "(ViT, DeiT, DeiT distilled, register-token ViTs) can be explained"
            )
    for index, block in enumerate(model.blocks):
        missing = [part for part in _BLOCK_PARTS if not hasattr(block, part)]
        if missing:
            raise UnsupportedModelError(
                f"block {index} ({type(block).__name__}) lacks {missing}: ViT-ReciproCAM needs pre-norm "
                "blocks (norm1 -> attn -> ls1, norm2 -> mlp -> ls2)"
            )
    grid = tuple(int(v) for v in model.patch_embed.grid_size)
    if getattr(model, "dynamic_img_size", False):
        logger.info(
            "model allows dynamic image sizes; ViT-ReciproCAM explains inputs of its configured size "
            "%s only (the map grid is fixed to it)",
            "x".join(str(v) for v in model.patch_embed.img_size),
        )
    num_classes = int(getattr(model, "num_classes", 0))
    if num_classes <= 0:
        raise UnsupportedModelError("the model has no classifier head (num_classes is 0)")
    if not getattr(model, "global_pool", "token"):
        raise UnsupportedModelError(
            "global_pool '' applies the classifier to every token: the model gives no class score "
            "per image to explain"
        )
    return ModelAnatomy(
        num_prefix_tokens=int(model.num_prefix_tokens),
        grid_size=(grid[0], grid[1]),
        num_blocks=len(model.blocks),
        num_classes=num_classes,
        global_pool=str(getattr(model, "global_pool", "token")),
        distilled=hasattr(model, "head_dist"),
    )


def mosaic(tokens: torch.Tensor, masks: torch.Tensor, num_prefix: int, keep_prefix: bool) -> torch.Tensor:
    """Masked copies of token sequences.

    ``tokens``: (B, p + n, D); ``masks``: (K, n). Returns (B, K, p + n, D) where copy ``k`` has the
    prefix rows kept (or zeroed) and patch row ``q`` scaled by ``masks[k, q]``.
    """
    batch, _, dim = tokens.shape
    patches = masks.to(tokens.dtype)[None, :, :, None] * tokens[:, None, num_prefix:, :]
    if num_prefix == 0:
        return patches
    prefix = tokens[:, None, :num_prefix, :].expand(batch, masks.shape[0], num_prefix, dim)
    if not keep_prefix:
        prefix = torch.zeros_like(prefix)
    return torch.cat([prefix, patches], dim=2)


def masked_block_forward(block: nn.Module, x_masked: torch.Tensor, z_masked: torch.Tensor) -> torch.Tensor:
    """The target block with the mask applied after norm1: residual from the masked raw input."""
    y = x_masked + block.ls1(block.attn(z_masked))
    return y + block.ls2(block.mlp(block.norm2(y)))


def head_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Final norm and classifier head on the output tokens of the last block."""
    return model.forward_head(model.norm(tokens))


def reference_masked_logits(
    model: nn.Module,
    block_index: int,
    block_input: torch.Tensor,
    kernel: str,
    keep_prefix: bool,
    *,
    max_sequences: int = 256,
) -> torch.Tensor:
    """Logits of every masked copy, evaluated literally as the spec writes it.

    ``block_input``: (B, p + n, D) input of ``blocks[block_index]``. Returns (B, n, C): row ``k`` holds
    the logits of the copy masked at patch ``k``. Memory is bounded by evaluating at most
    ``max_sequences`` masked sequences at a time.
    """
    num_prefix = int(model.num_prefix_tokens)
    batch, tokens, _ = block_input.shape
    grid_h, grid_w = grid_for_tokens(model, tokens - num_prefix)
    masks = mask_matrix(grid_h, grid_w, kernel, dtype=block_input.dtype, device=block_input.device)
    n = masks.shape[0]
    block = model.blocks[block_index]
    later_blocks = list(model.blocks)[block_index + 1 :]
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


def _mosaic_rows(
    tokens: torch.Tensor, masks: torch.Tensor, num_prefix: int, keep_prefix: bool
) -> torch.Tensor:
    """One masked copy per row: ``tokens`` (c, p + n, D), ``masks`` (c, n) -> (c, p + n, D)."""
    patches = masks.to(tokens.dtype)[:, :, None] * tokens[:, num_prefix:, :]
    prefix = tokens[:, :num_prefix, :]
    if not keep_prefix:
        prefix = torch.zeros_like(prefix)
    return torch.cat([prefix, patches], dim=1)


def grid_for_tokens(model: nn.Module, num_patches: int) -> tuple[int, int]:
    """The patch grid for a sequence of ``num_patches`` patch tokens."""
    grid = tuple(int(v) for v in model.patch_embed.grid_size)
    if grid[0] * grid[1] == num_patches:
        return grid[0], grid[1]
    raise UnsupportedModelError(
        f"{num_patches} patch tokens do not match the model's {grid[0]}x{grid[1]} grid; "
        "feed images of the model's input size"
    )


def scores_from_logits(masked_logits: torch.Tensor, score: str) -> torch.Tensor:
    """(..., C) masked logits -> (..., C) scores (raw logits or softmax probabilities)."""
    if score == "logit":
        return masked_logits
    if score == "probability":
        return masked_logits.float().softmax(dim=-1)
    raise ValueError(f"unknown score {score!r}")


@dataclass
class _Item:
    index: int
    options: CamOptions
    targets: torch.Tensor | None
    block: int = field(default=0)


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
        path: PathChoice = "auto",
        max_sequences: int | None = None,
        host_wait: HostWait = "block",
    ) -> None:
        if path not in ("auto", "reduced", "reference"):
            raise ValueError(f"unknown path {path!r}; expected auto, reduced or reference")
        if host_wait not in HOST_WAITS:
            raise ValueError(f"unknown host_wait {host_wait!r}; expected block or spin")
        self.host_wait = host_wait
        self.model = model
        self.anatomy = inspect_model(model)
        self.max_sequences = max_sequences
        self.requested_path = path
        self.path, self.path_reason, self._reduced = self._choose_path(path)

    def _choose_path(self, path: PathChoice) -> tuple[str, str, ReducedEvaluator | None]:
        if path == "reference":
            return "reference", "reference path forced by configuration", None
        try:
            from app.engine.reduced import ReducedEvaluator, reduced_support_reason
        except ImportError:  # pragma: no cover - reduced module always ships with the package
            return "reference", "reduced evaluation is not available in this build", None
        reason = reduced_support_reason(self.model)
        if reason is None:
            return (
                "reduced",
                "model structure allows the exact reduced evaluation",
                ReducedEvaluator(self.model, max_sequences=self.max_sequences),
            )
        if path == "reduced":
            raise UnsupportedModelError(f"reduced evaluation is not possible for this model: {reason}")
        if self.model not in _FALLBACK_LOGGED:
            _FALLBACK_LOGGED.add(self.model)
            logger.warning("ViT-ReciproCAM falls back to the reference path: %s", reason)
        return "reference", reason, None

    def resolve_block(self, target_block: int) -> int:
        blocks = self.anatomy.num_blocks
        resolved = target_block + blocks if target_block < 0 else target_block
        if not 0 <= resolved < blocks:
            raise ValueError(f"target_block {target_block} is outside the model's {blocks} blocks")
        return resolved

    def masked_logits(
        self,
        block_index: int,
        block_input: torch.Tensor,
        kernel: str,
        keep_prefix: bool,
        *,
        state: LastBlockState | None = None,
    ) -> torch.Tensor:
        """(B, n, C) logits of every masked copy, on the chosen path (``state``: reduced path only)."""
        if self._reduced is not None:
            return self._reduced.masked_logits(block_index, block_input, kernel, keep_prefix, state=state)
        return reference_masked_logits(
            self.model,
            block_index,
            block_input,
            kernel,
            keep_prefix,
            max_sequences=self.max_sequences or REFERENCE_MAX_SEQUENCES,
        )

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
        model = self.model
        self._check_inputs(images)
        batch = images.shape[0]
        per_image = _per_image_options(options, batch)
        if targets is not None and len(targets) != batch:
            raise ValueError(f"targets has {len(targets)} entries for {batch} images")
        num_classes = self.anatomy.num_classes
        items: list[_Item] = []
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
            items.append(_Item(index, opts, target_tensor, self.resolve_block(opts.target_block)))

        param = next(model.parameters())
        x = images.to(device=param.device, dtype=param.dtype)
        x = model.patch_embed(x)
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        x = model.norm_pre(x)

        blocks = list(model.blocks)
        last = len(blocks) - 1
        # Where the reduced path allows it (head reading prefix tokens only, no key norm in the last
        # block), the last block runs on those rows alone, from per-image projections that the
        # masked copies of the last block share.
        reduced = self._reduced if self._reduced is not None and self._reduced.fuses_last_block else None
        state = None
        stops = sorted({item.block for item in items})
        groups: list[tuple[list[_Item], torch.Tensor]] = []  # members, (G, n, C) masked logits
        done = 0
        for stop in stops:
            for block in blocks[done:stop]:
                x = block(x)
            done = stop
            by_options = _group_by([item for item in items if item.block == stop])
            if reduced is not None and stop == last:
                zero_query = any(not keep_prefix for _, keep_prefix in by_options)
                state = reduced.last_block_state(x, zero_query=zero_query)
            for (kernel, keep_prefix), members in by_options.items():
                indices = [item.index for item in members]
                group_state = state
                if indices == list(range(batch)):
                    group_input = x  # every image: no copy of the block input
                else:
                    selected = to_device(torch.tensor(indices), x.device)
                    group_input = x.index_select(0, selected)
                    group_state = None if state is None else state.select(selected)
                result = self.masked_logits(stop, group_input, kernel, keep_prefix, state=group_state)
                groups.append((members, result))
        if reduced is not None:
            for block in blocks[done:last]:
                x = block(x)
            if state is None:
                state = reduced.last_block_state(x)
            logits = reduced.unmasked_logits(state).float()
        else:
            for block in blocks[done:]:
                x = block(x)
            logits = head_logits(model, x).float()
        grid = grid_for_tokens(model, x.shape[1] - self.anatomy.num_prefix_tokens)
        return _collect(logits, groups, grid, top_k, block=self.host_wait == "block")

    def _check_inputs(self, images: torch.Tensor) -> None:
        """Refuse what would give wrong maps without an error: a model in training mode (dropout and
        stochastic depth make every masked pass random), and images of another size than the
        model's (a model with dynamic image sizes would take them, but the grid is fixed)."""
        if any(module.training for module in self.model.modules()):
            raise ValueError(
                "the model is in training mode: dropout and stochastic depth would make the maps "
                "random; call model.eval() first"
            )
        expected = getattr(self.model.patch_embed, "img_size", None)
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
        return self.model(images.to(device=param.device, dtype=param.dtype)).float()


def _per_image_options(
    options: CamOptions | Sequence[CamOptions | None] | None, batch: int
) -> list[CamOptions | None]:
    if options is None or isinstance(options, CamOptions):
        return [options] * batch
    per_image = list(options)
    if len(per_image) != batch:
        raise ValueError(f"options has {len(per_image)} entries for {batch} images")
    return per_image


def _group_by(items: list[_Item]) -> dict[tuple[str, bool], list[_Item]]:
    groups: dict[tuple[str, bool], list[_Item]] = {}
    for item in items:
        groups.setdefault((item.options.kernel, item.options.keep_prefix), []).append(item)
    return groups


def _collect(
    logits: torch.Tensor,
    groups: list[tuple[list[_Item], torch.Tensor]],
    grid: tuple[int, int],
    top_k: int | None,
    *,
    block: bool = True,
) -> list[ImageExplanation]:
    """Per-image results from the batch's logits (B, C) and each option group's masked logits.

    The maps are selected on the device and everything reaches the host in one float32 transfer
    (plus one for the top-k class ids): per-image copies would each wait for the device. With
    ``block`` the thread sleeps until a CUDA device is done, rather than spinning in the copy.
    Each image's tensors are views into that one host buffer, which lives as long as any of them.
    """
    batch, num_classes = logits.shape
    device = logits.device
    top = None
    if top_k is not None and any(item.targets is None for members, _ in groups for item in members):
        top = logits.topk(min(top_k, num_classes), dim=-1).indices  # (B, k) on the device
    every_class = torch.arange(num_classes)
    pieces: list[torch.Tensor] = [logits]
    # Per group: (members, K) with the group's maps (G, K, n) as one piece, or (members, None) with
    # one (K_i, n) piece per member.
    plan: list[tuple[list[_Item], int | None]] = []
    for members, result in groups:
        kinds = {
            "targets" if m.targets is not None else ("top" if top is not None else "all") for m in members
        }
        if kinds == {"all"}:
            pieces.append(_scores(members, result, None).transpose(1, 2))
            plan.append((members, num_classes))
        elif kinds == {"top"}:
            assert top is not None
            rows = [m.index for m in members]
            picked = top if rows == list(range(batch)) else top[to_device(torch.tensor(rows), device)]
            pieces.append(_scores(members, result, picked).transpose(1, 2))
            plan.append((members, picked.shape[1]))
        else:
            pieces.append(_mixed_maps(members, result, top, device))
            plan.append((members, None))
    packed = torch.cat([piece.reshape(-1) for piece in pieces])
    if block and device.type == "cuda":
        done = torch.cuda.Event(blocking=True)  # cudaEventBlockingSync: wait asleep
        done.record(torch.cuda.current_stream(device))
        done.synchronize()
    host = packed.cpu()
    host_top = None if top is None else top.cpu().unbind(0)
    parts = iter(host.split([piece.numel() for piece in pieces]))
    results = [ImageExplanation(logits=row) for row in next(parts).view(batch, num_classes).unbind(0)]
    for members, count in plan:
        if count is not None:
            maps = next(parts).view(len(members), count, *grid).unbind(0)
        else:
            maps = next(parts).view(-1, *grid).split(_class_counts(members, top, num_classes))
        for member, member_maps in zip(members, maps, strict=True):
            if member.targets is not None:
                chosen = member.targets
            elif host_top is not None:
                chosen = host_top[member.index]
            else:
                chosen = every_class
            explanation = results[member.index]
            explanation.score_maps = member_maps
            explanation.targets = chosen
            explanation.options = member.options
    return results


def _class_counts(members: list[_Item], top: torch.Tensor | None, num_classes: int) -> list[int]:
    """How many maps each member gets: its explicit targets, else the top k, else every class."""
    k = num_classes if top is None else int(top.shape[1])
    return [len(m.targets) if m.targets is not None else k for m in members]


def _mixed_maps(
    members: list[_Item], result: torch.Tensor, top: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """(sum of K_i, n) maps of a group whose members want different classes (explicit targets next to
    the top k or every class), member after member, with a fixed number of device operations.

    Each member's classes fill a row of a (G, K) index, padded to the longest: explicit targets come
    from the host in one copy, top-k rows from the device (``-1`` in the host rows marks them). The
    scores are gathered for the whole index, and the padding is dropped with one more selection.
    """
    num_classes = result.shape[-1]
    counts = _class_counts(members, top, num_classes)
    width = max(counts)
    rows: list[list[int]] = []
    for member, count in zip(members, counts, strict=True):
        if member.targets is not None:
            wanted = member.targets.tolist()
        elif top is None:
            wanted = list(range(num_classes))
        else:
            wanted = [-1] * count
        rows.append(wanted + [0] * (width - count))
    columns = to_device(torch.tensor(rows, dtype=torch.long), device)
    if top is not None and any(m.targets is None for m in members):
        indices = [m.index for m in members]
        picked = top[to_device(torch.tensor(indices, dtype=torch.long), device)]  # (G, k)
        picked = torch.nn.functional.pad(picked, (0, width - picked.shape[1]))
        columns = torch.where(columns < 0, picked, columns)
    maps = _scores(members, result, columns).transpose(1, 2).reshape(-1, result.shape[1])  # (G * K, n)
    keep = [row * width + j for row, count in enumerate(counts) for j in range(count)]
    return maps.index_select(0, to_device(torch.tensor(keep, dtype=torch.long), device))


def _scores(members: list[_Item], result: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
    """(G, n, K) float32 scores of a group's masked logits ``result`` (G, n, C) for the classes
    ``columns`` (G, K) of each member (all C classes when None), each member with its own score
    kind. Logits are picked before their conversion to float32; probabilities need every class."""

    def pick(tensor: torch.Tensor) -> torch.Tensor:
        if columns is None:
            return tensor
        return tensor.gather(2, columns[:, None, :].expand(-1, tensor.shape[1], -1))

    kinds = [m.options.score for m in members]
    logit = pick(result).float() if "logit" in kinds else None
    probability = pick(scores_from_logits(result.float(), "probability")) if "probability" in kinds else None
    if probability is None:
        assert logit is not None
        return logit
    if logit is None:
        return probability
    flags = to_device(torch.tensor([kind == "probability" for kind in kinds]), result.device)
    return torch.where(flags[:, None, None], probability, logit)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without waiting for the device.

    A blocking copy to a CUDA device waits for all work queued before it, which would stall the
    queue in mid-batch; from pinned memory the copy is queued like a kernel instead.
    """
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def normalize_maps(score_maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-map min-max normalisation over the last two dims, into [0, 1]."""
    flat = score_maps.float().flatten(-2)
    low = flat.min(dim=-1, keepdim=True).values
    high = flat.max(dim=-1, keepdim=True).values
    return ((flat - low) / (high - low + eps)).reshape(score_maps.shape)


def to_uint8(normalized: torch.Tensor) -> torch.Tensor:
    """The 8-bit form: floor(255 * normalised)."""
    return torch.floor(normalized.clamp(0, 1) * 255).to(torch.uint8)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of (..., h, w) maps to ``size`` = (H, W)."""
    shape = maps.shape
    flat = maps.float().reshape(-1, 1, shape[-2], shape[-1])
    out = torch.nn.functional.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*shape[:-2], size[0], size[1])
