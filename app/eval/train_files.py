"""The files a training run leaves: the self-describing ``.safetensors`` weights and the Markdown
model card."""

from __future__ import annotations

import json
import math
from pathlib import Path

from torch import nn

from app.eval.shapes import MEAN, SHAPE_CLASSES, STD
from app.eval.shapes_vit import ARCH, DATA_CONFIG
from app.eval.train import TrainConfig, TrainResult


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
