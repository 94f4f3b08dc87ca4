"""Per-image results of a batch: the prediction and the score maps each image asked for.

The maps are selected on the device and reach the host in one transfer per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.engine.devices import to_device, wait_asleep
from app.engine.options import CamOptions


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


@dataclass
class MapRequest:
    """The maps one image of a batch asks for: its index in the batch, its options, its explicit
    target classes (None: the top k or every class) and its resolved target block."""

    index: int
    options: CamOptions
    targets: torch.Tensor | None
    block: int = 0


def collect(
    logits: torch.Tensor,
    groups: list[tuple[list[MapRequest], torch.Tensor]],
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
    plan: list[tuple[list[MapRequest], int | None]] = []
    for members, result in groups:
        kinds = {
            "targets" if m.targets is not None else ("top" if top is not None else "all") for m in members
        }
        if kinds == {"all"}:
            pieces.append(group_scores(members, result, None).transpose(1, 2))
            plan.append((members, num_classes))
        elif kinds == {"top"}:
            assert top is not None
            rows = [m.index for m in members]
            picked = top if rows == list(range(batch)) else top[to_device(torch.tensor(rows), device)]
            pieces.append(group_scores(members, result, picked).transpose(1, 2))
            plan.append((members, picked.shape[1]))
        else:
            pieces.append(mixed_maps(members, result, top, device))
            plan.append((members, None))
    packed = torch.cat([piece.reshape(-1) for piece in pieces])
    if block:
        wait_asleep(device)
    host = packed.cpu()
    host_top = None if top is None else top.cpu().unbind(0)
    parts = iter(host.split([piece.numel() for piece in pieces]))
    results = [ImageExplanation(logits=row) for row in next(parts).view(batch, num_classes).unbind(0)]
    for members, count in plan:
        if count is not None:
            maps = next(parts).view(len(members), count, *grid).unbind(0)
        else:
            maps = next(parts).view(-1, *grid).split(class_counts(members, top, num_classes))
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


def class_counts(members: list[MapRequest], top: torch.Tensor | None, num_classes: int) -> list[int]:
    """How many maps each member gets: its explicit targets, else the top k, else every class."""
    k = num_classes if top is None else int(top.shape[1])
    return [len(m.targets) if m.targets is not None else k for m in members]


def mixed_maps(
    members: list[MapRequest], result: torch.Tensor, top: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """(sum of K_i, n) maps of a group whose members want different classes (explicit targets next to
    the top k or every class), member after member, with a fixed number of device operations.

    Each member's classes fill a row of a (G, K) index, padded to the longest: explicit targets come
    from the host in one copy, top-k rows from the device (``-1`` in the host rows marks them). The
    scores are gathered for the whole index, and the padding is dropped with one more selection.
    """
    num_classes = result.shape[-1]
    counts = class_counts(members, top, num_classes)
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
    maps = group_scores(members, result, columns).transpose(1, 2).reshape(-1, result.shape[1])  # (G * K, n)
    keep = [row * width + j for row, count in enumerate(counts) for j in range(count)]
    return maps.index_select(0, to_device(torch.tensor(keep, dtype=torch.long), device))


def group_scores(
    members: list[MapRequest], result: torch.Tensor, columns: torch.Tensor | None
) -> torch.Tensor:
    """(G, n, K) float32 scores of a group's masked logits ``result`` (G, n, C) for the classes
    ``columns`` (G, K) of each member (all C classes when None), each member with its own score
    kind. Logits are picked before their conversion to float32; probabilities need every class."""

    def pick(tensor: torch.Tensor) -> torch.Tensor:
        if columns is None:
            return tensor
        return tensor.gather(2, columns[:, None, :].expand(-1, tensor.shape[1], -1))

    kinds = [m.options.score for m in members]
    logit = pick(result).float() if "logit" in kinds else None
    probability = pick(result.float().softmax(dim=-1)) if "probability" in kinds else None
    if probability is None:
        assert logit is not None
        return logit
    if logit is None:
        return probability
    flags = to_device(torch.tensor([kind == "probability" for kind in kinds]), result.device)
    return torch.where(flags[:, None, None], probability, logit)
