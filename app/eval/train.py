"""Training the small shapes ViT shipped with the service (``python -m app train``).

A timm VisionTransformer with a class token on 64x64 inputs with 8x8 patches (an 8x8 patch grid),
trained from scratch on :mod:`app.eval.shapes` with AdamW, a linear warm-up and a cosine schedule,
flips and quarter-turn rotations as augmentation. The result is a self-describing ``.safetensors``
file (architecture, kwargs, labels and data config in its metadata) that
``load_model(None, path)`` loads without naming anything. The model is defined in
:mod:`app.eval.shapes_vit`, the losses beyond the class label in :mod:`app.eval.train_objectives`,
and the weights file and model card are written by :mod:`app.eval.train_files`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from app.engine.anatomy import TimmModule
from app.eval.shapes import IMAGE_SIZE, SHAPE_CLASSES, generate, generate_empty, normalize
from app.eval.shapes_vit import ARCH, MODEL_KWARGS, last_block_input, mimetic_init_
from app.eval.train_objectives import (
    augment,
    mask_patches,
    masked_window_batch,
    patch_targets,
    soft_cross_entropy,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    seed: int = 0
    train_count: int = 24000
    val_seed: int = 1
    val_count: int = 1000
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    threads: int = 2
    image_size: int = IMAGE_SIZE
    label_smoothing: float = 0.05
    token_loss_weight: float = 1.0
    pattern_loss_weight: float = 1.0
    empty_fraction: float = 0.1
    masked_loss_weight: float = 1.0
    init_weights: str | None = None
    token_coverage: float = 0.25
    mimetic_init: bool = True
    model_kwargs: dict[str, Any] = field(default_factory=lambda: dict(MODEL_KWARGS))


@dataclass
class TrainResult:
    val_accuracy: float
    train_accuracy: float
    seconds: float
    epochs: int
    history: list[dict[str, float]]


def build_model(config: TrainConfig) -> nn.Module:
    torch.manual_seed(config.seed)
    model = timm.create_model(ARCH, pretrained=False, num_classes=len(SHAPE_CLASSES), **config.model_kwargs)
    if config.mimetic_init:
        mimetic_init_(model)
    return model


@torch.no_grad()
def accuracy(
    model: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 256,
) -> float:
    if isinstance(model, nn.Module):
        model.eval()
    correct = 0
    for start in range(0, inputs.shape[0], batch_size):
        logits = model(inputs[start : start + batch_size])
        correct += int((logits.argmax(-1) == labels[start : start + batch_size]).sum())
    return correct / max(1, inputs.shape[0])


def train(config: TrainConfig, progress: bool = True) -> tuple[nn.Module, TrainResult]:
    """Train from scratch; the token-labelling head is used for training only and then dropped."""
    from tqdm import tqdm

    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    train_set = generate(config.seed, config.train_count, size=config.image_size)
    val_set = generate(config.val_seed, config.val_count, size=config.image_size)
    train_inputs, train_labels = normalize(train_set.images), torch.from_numpy(train_set.labels)
    val_inputs, val_labels = normalize(val_set.images), torch.from_numpy(val_set.labels)
    patch_size = int(config.model_kwargs["patch_size"])
    train_masks = torch.from_numpy(train_set.masks)
    empty_count = round(config.empty_fraction * config.train_count)
    if empty_count:
        # Images without an object, with a uniform target: no class is the answer for "nothing".
        empty = generate_empty(config.seed, empty_count, size=config.image_size)
        train_inputs = torch.cat([train_inputs, normalize(empty)])
        train_labels = torch.cat([train_labels, torch.full((empty_count,), -1, dtype=torch.long)])
        train_masks = torch.cat(
            [train_masks, torch.zeros(empty_count, *train_masks.shape[1:], dtype=torch.bool)]
        )
    train_total = train_inputs.shape[0]
    logger.info("generated %d training and %d validation images", len(train_set), len(val_set))

    model = build_model(config)
    if config.init_weights:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(config.init_weights))
        logger.info("continuing from %s", config.init_weights)
    embed_dim = int(config.model_kwargs["embed_dim"])

    token_head = nn.Linear(embed_dim, len(SHAPE_CLASSES) + 1)
    pattern_head = nn.Linear(embed_dim, patch_size**2)
    named = [
        *model.named_parameters(),
        *(("token_head." + n, p) for n, p in token_head.named_parameters()),
        *(("pattern_head." + n, p) for n, p in pattern_head.named_parameters()),
    ]
    decay = [p for n, p in named if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in named if p.ndim < 2 or "pos_embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    steps_per_epoch = math.ceil(train_total / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = max(1, int(config.warmup_epochs * steps_per_epoch))

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(config.seed)
    vit: TimmModule = model  # timm attributes, read during the steps
    prefix = int(vit.num_prefix_tokens)
    history: list[dict[str, float]] = []
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(train_total, generator=generator)
        running_loss, seen = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress)
        for step in bar:
            rows = order[step * config.batch_size : (step + 1) * config.batch_size]
            batch, masks = augment(train_inputs[rows], train_masks[rows], generator)
            block_input = last_block_input(model, batch)
            features = vit.norm(vit.blocks[-1](block_input))
            class_logits = vit.forward_head(features)
            class_loss = soft_cross_entropy(class_logits, train_labels[rows], config.label_smoothing)
            loss = class_loss
            postfix: dict[str, str] = {}
            # The auxiliary heads only run when they have a weight.
            if config.token_loss_weight > 0:
                tokens = patch_targets(
                    masks, train_labels[rows].clamp(min=0), patch_size, config.token_coverage
                )
                token_logits = token_head(features[:, prefix:])
                token_loss = F.cross_entropy(
                    token_logits.reshape(-1, token_logits.shape[-1]), tokens.reshape(-1)
                )
                loss = loss + config.token_loss_weight * token_loss
                postfix["tokens"] = f"{float(token_loss.detach()):.3f}"
            if config.pattern_loss_weight > 0:
                pattern_loss = F.binary_cross_entropy_with_logits(
                    pattern_head(features[:, prefix:]), mask_patches(masks, patch_size)
                )
                loss = loss + config.pattern_loss_weight * pattern_loss
            if config.masked_loss_weight > 0:
                window_logits, window_targets = masked_window_batch(
                    model, block_input, masks, train_labels[rows], patch_size, generator
                )
                window_loss = -(window_targets * F.log_softmax(window_logits, -1)).sum(-1).mean()
                loss = loss + config.masked_loss_weight * window_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(named_params(named), 1.0)
            optimizer.step()
            scheduler.step()
            running_loss += float(class_loss.detach()) * rows.numel()
            seen += rows.numel()
            bar.set_postfix(loss=f"{running_loss / seen:.3f}", **postfix)
        val_acc = accuracy(model, val_inputs, val_labels)
        history.append({"epoch": epoch + 1, "loss": running_loss / seen, "val_accuracy": val_acc})
        logger.info("epoch %d: class loss %.4f, val accuracy %.4f", epoch + 1, running_loss / seen, val_acc)
    train_acc = accuracy(model, train_inputs[:2000], train_labels[:2000])  # object images come first
    result = TrainResult(
        val_accuracy=history[-1]["val_accuracy"] if history else accuracy(model, val_inputs, val_labels),
        train_accuracy=train_acc,
        seconds=time.perf_counter() - started,
        epochs=config.epochs,
        history=history,
    )
    return model.eval(), result


def named_params(named: list[tuple[str, nn.Parameter]]) -> list[nn.Parameter]:
    return [param for _, param in named]
