"""Training the small shapes ViT shipped with the service (``python -m app train``).

A timm VisionTransformer with a class token on 64x64 inputs with 8x8 patches (an 8x8 patch grid),
trained from scratch on :mod:`app.eval.shapes` with AdamW, a linear warm-up and a cosine schedule,
flips and quarter-turn rotations as augmentation. The result is a self-describing ``.safetensors``
file (architecture, kwargs, labels and data config in its metadata) that
``load_model(None, path)`` loads without naming anything.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from app.eval.shapes import IMAGE_SIZE, MEAN, SHAPE_CLASSES, STD, generate, generate_empty, normalize

logger = logging.getLogger(__name__)

ARCH = "vit_tiny_patch16_224"
MODEL_KWARGS: dict[str, Any] = {
    "img_size": IMAGE_SIZE,
    "patch_size": 8,
    "embed_dim": 80,
    "depth": 6,
    "num_heads": 4,
    "mlp_ratio": 4.0,
}
DATA_CONFIG: dict[str, Any] = {
    "input_size": [3, IMAGE_SIZE, IMAGE_SIZE],
    "mean": list(MEAN),
    "std": list(STD),
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "crop_mode": "center",
}


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


def sincos_position_embedding(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """(grid_h * grid_w, dim) 2-D sine-cosine position embedding (half the channels per axis)."""
    quarter = dim // 4
    frequencies = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float32), torch.arange(grid_w, dtype=torch.float32), indexing="ij"
    )
    parts = []
    for coordinate in (ys.reshape(-1), xs.reshape(-1)):
        angles = coordinate[:, None] * frequencies[None, :]
        parts += [angles.sin(), angles.cos()]
    embedding = torch.cat(parts, dim=1)
    return F.pad(embedding, (0, dim - embedding.shape[1]))


def _low_rank_factors(
    dim: int, rank: int, alpha: float, beta: float, sign: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dim, rank) factors A, B with A B^T the best rank-``rank`` fit of alpha Z + sign beta I."""
    target = alpha * torch.randn(dim, dim) / math.sqrt(dim) + sign * beta * torch.eye(dim)
    u, singular, vh = torch.linalg.svd(target)
    root = singular[:rank].sqrt()
    return u[:, :rank] * root, vh[:rank].T * root


@torch.no_grad()
def mimetic_init_(
    model: nn.Module, qk: tuple[float, float] = (0.7, 0.7), vo: tuple[float, float] = (0.4, 0.4)
) -> None:
    """Initialise attention to mimic trained ViTs (Trockman & Kolter 2023): per head,
    ``W_q W_k^T ~ a Z + b I`` and ``W_v W_o ~ a Z - b I``; position embeddings start as 2-D
    sine-cosine (scaled), so early attention already prefers nearby patches. Only the starting
    point changes; every parameter is trained as usual."""
    grid_h, grid_w = (int(v) for v in model.patch_embed.grid_size)
    dim = model.embed_dim
    prefix = int(model.num_prefix_tokens)
    position = sincos_position_embedding(grid_h, grid_w, dim)
    model.pos_embed[0, prefix:] = position * 0.5
    for block in model.blocks:
        attn = block.attn
        heads, head_dim = attn.num_heads, attn.head_dim

        for head in range(heads):
            rows = slice(head * head_dim, (head + 1) * head_dim)
            query, key = _low_rank_factors(dim, head_dim, *qk, sign=1.0)
            attn.qkv.weight[rows] = query.T
            attn.qkv.weight[dim + head * head_dim : dim + (head + 1) * head_dim] = key.T
            value, out = _low_rank_factors(dim, head_dim, *vo, sign=-1.0)
            attn.qkv.weight[2 * dim + head * head_dim : 2 * dim + (head + 1) * head_dim] = value.T
            attn.proj.weight[:, rows] = out / math.sqrt(heads)


def augment(
    batch: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random horizontal flips and quarter turn for images (N, 3, H, W) and their object
    masks (N, H, W); every class is closed under both."""
    flips = torch.rand(batch.shape[0], generator=generator) < 0.5
    batch = torch.where(flips[:, None, None, None], batch.flip(-1), batch)
    masks = torch.where(flips[:, None, None], masks.flip(-1), masks)
    turns = int(torch.randint(0, 4, (1,), generator=generator))
    return torch.rot90(batch, turns, dims=(-2, -1)), torch.rot90(masks, turns, dims=(-2, -1))


def mask_patches(masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, H, W) masks -> (N, h * w, patch_size**2) float pixel patterns, patches in row-major order."""
    patches = F.unfold(masks[:, None].float(), kernel_size=patch_size, stride=patch_size)
    return patches.transpose(1, 2)


def patch_targets(
    masks: torch.Tensor, labels: torch.Tensor, patch_size: int, coverage: float
) -> torch.Tensor:
    """Token labels (N, h, w): the object's class where it covers at least ``coverage`` of the
    patch, else the background id ``num_classes``."""
    covered = F.avg_pool2d(masks[:, None].float(), patch_size)[:, 0]
    background = torch.full_like(covered, len(SHAPE_CLASSES), dtype=torch.long)
    return torch.where(covered >= coverage, labels[:, None, None].expand_as(background), background)


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
    prefix = int(model.num_prefix_tokens)
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
            features = model.norm(model.blocks[-1](block_input))
            class_logits = model.forward_head(features)
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


def last_block_input(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Tokens entering the model's last block."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    for block in model.blocks[:-1]:
        x = block(x)
    return x


def masked_window_batch(
    model: nn.Module,
    block_input: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    patch_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature masking at the last block: per image, a random window of 1x1 to 3x3 patches keeps
    its tokens with random weights in (0, 1]; every other patch token is zeroed (prefix kept), the
    mask applied to the block's norm1 output and its residual input alike. Target: the class in
    proportion to the share of the object inside the window (saturating at one half), the rest
    uniform; no object in the window, uniform. Returns logits and soft targets (B, C)."""
    batch, tokens, _ = block_input.shape
    prefix = int(model.num_prefix_tokens)
    grid_h, grid_w = (int(v) for v in model.patch_embed.grid_size)
    classes = len(SHAPE_CLASSES)
    size = torch.randint(1, 4, (batch,), generator=generator)
    top = (torch.rand(batch, generator=generator) * (grid_h - size + 1)).long()
    left = (torch.rand(batch, generator=generator) * (grid_w - size + 1)).long()
    rows = torch.arange(grid_h).view(1, grid_h, 1)
    cols = torch.arange(grid_w).view(1, 1, grid_w)
    inside = (
        (rows >= top.view(-1, 1, 1))
        & (rows < (top + size).view(-1, 1, 1))
        & (cols >= left.view(-1, 1, 1))
        & (cols < (left + size).view(-1, 1, 1))
    )
    weights = inside.float() * (0.05 + 0.95 * torch.rand(batch, grid_h, grid_w, generator=generator))
    flat = weights.flatten(1).to(block_input.dtype)
    scale = torch.cat([torch.ones(batch, prefix, dtype=flat.dtype), flat], dim=1)[..., None]
    block = model.blocks[-1]
    z = block.norm1(block_input) * scale
    y = block_input * scale + block.ls1(block.attn(z))
    y = y + block.ls2(block.mlp(block.norm2(y)))
    logits = model.forward_head(model.norm(y))
    pixel_window = inside.float().repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
    area = masks.flatten(1).sum(1).clamp(min=1)
    share = (masks.float() * pixel_window).flatten(1).sum(1) / area
    evidence = (share / 0.5).clamp(max=1.0) * (labels >= 0).float()
    targets = torch.full((batch, classes), 1.0 / classes)
    known = labels >= 0
    targets[known] = (
        targets[known] * (1 - evidence[known, None])
        + evidence[known, None] * F.one_hot(labels[known], classes).float()
    )
    assert tokens == prefix + grid_h * grid_w
    return logits, targets


def soft_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy with label smoothing; a label of -1 (no object) targets the uniform distribution."""
    classes = logits.shape[-1]
    known = labels >= 0
    target = torch.full_like(logits, smoothing / classes)
    target[known] += F.one_hot(labels[known], classes).to(logits.dtype) * (1 - smoothing)
    target[~known] = 1.0 / classes
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def named_params(named: list[tuple[str, nn.Parameter]]) -> list[nn.Parameter]:
    return [param for _, param in named]


def save_weights(model: nn.Module, path: Path, config: TrainConfig, result: TrainResult) -> Path:
    """Write a self-describing safetensors file (see :func:`app.engine.models.load_model`)."""
    from safetensors.torch import save

    metadata = {
        "arch": ARCH,
        "model_kwargs": json.dumps(config.model_kwargs),
        "labels": json.dumps(list(SHAPE_CLASSES)),
        "data_config": json.dumps(DATA_CONFIG),
        "training": json.dumps(
            {
                "dataset": "app.eval.shapes",
                "seed": config.seed,
                "train_count": config.train_count,
                "val_seed": config.val_seed,
                "val_count": config.val_count,
                "epochs": config.epochs,
                "val_accuracy": round(result.val_accuracy, 4),
                "seconds": round(result.seconds, 1),
            }
        ),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    # written by Python, not by safetensors' save_file, which makes the file readable by its owner
    # only (0600): a model is meant to be read by the service's user too (0644 under umask 022)
    path.write_bytes(save(state, metadata=metadata))
    return path


def config_dict(config: TrainConfig) -> dict[str, Any]:
    return asdict(config)


def model_card(config: TrainConfig, result: TrainResult, weights: Path, command: str) -> str:
    """Markdown model card for a trained shapes model (the committed card is this output)."""
    size_mb = weights.stat().st_size / 1e6
    kwargs = json.dumps(config.model_kwargs)
    params = _parameter_count(weights)
    history = "\n".join(
        f"| {int(row['epoch'])} | {row['loss']:.4f} | {100 * row['val_accuracy']:.1f}% |"
        for row in result.history
    )
    empty = round(config.empty_fraction * config.train_count)
    return f"""# Shapes ViT (`{weights.name}`)

A small timm Vision Transformer with a class token, trained from scratch on the synthetic shapes
dataset of `app/eval/shapes.py`. It is the model the service can serve when nothing can be
downloaded, and the model the localisation tests and `docs/evaluation.md` use: its ground truth
says where the object is, so a saliency map can be checked.

| | |
|---|---|
| Architecture | `{ARCH}` with `{kwargs}` ({grid_text(config)} patch grid, 1 class token, token pooling, {params / 1e6:.2f} M parameters) |
| Classes | {", ".join(SHAPE_CLASSES)} |
| Input | {config.image_size}x{config.image_size} RGB, mean {list(MEAN)}, std {list(STD)}, bilinear, crop_pct 1.0 |
| Weights | {size_mb:.1f} MB safetensors, self-describing (arch, kwargs, labels, data config in metadata): `load_model(None, "{weights.as_posix()}")` |
| Validation accuracy | **{100 * result.val_accuracy:.1f}%** on {config.val_count} images of seed {config.val_seed} (training images: {100 * result.train_accuracy:.1f}%) |
| Training time | {result.seconds / 60:.1f} min on the CPU ({config.threads} threads), data generation included |

## Data
{config.train_count} images generated with seed {config.seed} (validation: {config.val_count} images of
seed {config.val_seed}); one object per image (circle, square, triangle, star, cross or arrow) at a
random position, scale, colour and quarter-turn orientation (tilted by up to about 14 degrees), over
a textured background (gradient, stripes, noise) with clutter: small dots and strokes, and one or two
decoys (shapes of the object's size and contrast that are no class: rings, bars, crescents and
hollow outlines of the class shapes, at least 5 px clear of the object). Plus {empty} images without an object (see below). Augmentation:
horizontal flips and quarter turns. Tests and evaluations use other seeds (1000 for
`docs/evaluation.md`, 20250 for the tests).

## Training
One command (deterministic for a given seed, torch build and thread count):

```bash
{command}
```

AdamW (lr {config.lr}, weight decay {config.weight_decay}), batch {config.batch_size}, {config.epochs}
epochs, linear warm-up ({config.warmup_epochs:g} epoch) then cosine decay, label smoothing
{config.label_smoothing}, gradient clipping at 1.0. The attention weights start from a mimetic
initialisation and the position embeddings from 2-D sine-cosine values
(`mimetic_init={config.mimetic_init}`); every parameter is trained.

Training-only parts (none of them is in the saved model):

{auxiliary_text(config)}- {config.empty_fraction:.0%} extra images hold no object (decoys and clutter only) and have a uniform
  target, so that no class is the model's answer for "nothing there".{masked_text(config)}

These losses shape what the network computes, and so what any explanation method sees: auxiliary
patch heads make patch tokens object-centred, which helps attention-based maps as well; the
feature-masking loss gives the property ViT-ReciproCAM relies on (zeroed tokens read as missing
evidence). Keep this in mind when comparing methods on this model (`docs/evaluation.md`).

| epoch | class loss | validation accuracy |
|---:|---:|---:|
{history}

## Intended use
A demonstration and offline default for the service, and a test of map localisation (pointing game,
ADCC, insertion/deletion on images whose object mask is known). It knows six synthetic shapes and
nothing else: its predictions on natural images are meaningless.
"""


def _parameter_count(weights: Path) -> int:
    """Number of values in a safetensors file, from its header (no tensor is loaded)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        names = list(handle.keys())
        return sum(math.prod(handle.get_slice(name).get_shape()) for name in names)


def auxiliary_text(config: TrainConfig) -> str:
    parts = []
    if config.token_loss_weight > 0:
        parts.append(
            f"token labels (the object's class where it covers at least {config.token_coverage:.0%} of a "
            f"patch, else background; weight {config.token_loss_weight})"
        )
    if config.pattern_loss_weight > 0:
        parts.append(f"the object's pixel mask inside each patch (weight {config.pattern_loss_weight})")
    if not parts:
        return "- No auxiliary heads: the patch tokens get no supervision of their own.\n"
    return "- Auxiliary heads on the patch tokens: " + " and ".join(parts) + ".\n"


def masked_text(config: TrainConfig) -> str:
    parts = []
    if config.masked_loss_weight > 0:
        parts.append(
            "\n- A feature-masking loss at the last block (weight "
            f"{config.masked_loss_weight}): per image a random window of 1x1 to 3x3 patch tokens is "
            "kept with random weights, the other patch tokens are zeroed (the class token kept), and "
            "the target is the class in proportion to the share of the object inside the window "
            "(uniform otherwise), so that the last block reads zeroed tokens as missing evidence. "
            "Without it, a model trained on this data may treat mostly-zero token sequences as evidence "
            "for some class, which inverts masking-based maps for that class."
        )
    if config.init_weights:
        parts.append(f"\n- Training continued from `{config.init_weights}`.")
    return "".join(parts)


def grid_text(config: TrainConfig) -> str:
    side = config.image_size // int(config.model_kwargs["patch_size"])
    return f"{side}x{side}"
