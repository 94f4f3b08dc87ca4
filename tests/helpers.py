"""Shared test helpers: tiny seeded timm ViTs, an independent, naive ViT-ReciproCAM, and photo-like
test images."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

TINY = {"depth": 3, "embed_dim": 32, "num_heads": 2, "num_classes": 7}

# name -> (timm architecture, extra kwargs); every model has a 4x4 or 4x6 grid and 3 blocks.
TINY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "deit_tiny": ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}),
    "deit_tiny_distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 32, "patch_size": 8}),
    "vit_registers": ("vit_small_patch16_224", {"img_size": 32, "patch_size": 8, "reg_tokens": 4}),
    "vit_nonsquare": ("vit_small_patch16_224", {"img_size": (32, 48), "patch_size": 8}),
    "vit_avgpool_regs": (
        "vit_small_patch16_224",
        {
            "img_size": 32,
            "patch_size": 8,
            "reg_tokens": 2,
            "global_pool": "avg",
            "class_token": False,
            "fc_norm": True,
        },
    ),
    "vit_layerscale_qknorm": (
        "vit_small_patch16_224",
        {"img_size": 32, "patch_size": 8, "init_values": 0.5, "qk_norm": True},
    ),
}


def perturb_(model: nn.Module, seed: int) -> nn.Module:
    """Seeded, non-trivial weights: timm's init leaves norms at 1/0 and tokens near 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1:
                param.add_(0.2 * noise)
            else:
                param.add_(0.1 * noise)
    return model


def make_tiny(name: str, seed: int = 0, **overrides: Any) -> nn.Module:
    arch, kwargs = TINY_MODELS[name]
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, **{**TINY, **kwargs, **overrides})
    return perturb_(model, seed).eval()


def save_self_describing(path: Path, name: str, seed: int = 0, labels: list[str] | None = None) -> Path:
    """A .safetensors file that names its architecture and kwargs in its metadata."""
    from safetensors.torch import save_file

    arch, kwargs = TINY_MODELS[name]
    model = make_tiny(name, seed)
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in {**TINY, **kwargs}.items()}
    kwargs.pop("num_classes")
    metadata = {"arch": arch, "model_kwargs": json.dumps(kwargs)}
    if labels is not None:
        metadata["labels"] = json.dumps(labels)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)
    return path


def naive_reciprocam(
    model: nn.Module,
    image: torch.Tensor,
    *,
    kernel: str = "gaussian",
    keep_prefix: bool = True,
    block_index: int = -1,
    score: str = "logit",
) -> torch.Tensor:
    """Spec, written out with plain loops for ONE image (3, H, W). Returns (C, h, w) raw score maps."""
    gauss = [[1 / 16, 1 / 8, 1 / 16], [1 / 8, 1 / 4, 1 / 8], [1 / 16, 1 / 8, 1 / 16]]
    p = model.num_prefix_tokens
    h, w = model.patch_embed.grid_size
    blocks = list(model.blocks)
    b = block_index % len(blocks)
    with torch.no_grad():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image[None]))))
        for blk in blocks[:b]:
            x = blk(x)
        x = x[0]
        z = blocks[b].norm1(x)
        maps = torch.zeros(model.num_classes, h, w, dtype=torch.float64)
        for i in range(h):
            for j in range(w):
                weight = torch.zeros(h * w, dtype=x.dtype)
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        ii, jj = i + di, j + dj
                        if 0 <= ii < h and 0 <= jj < w:
                            value = (
                                gauss[di + 1][dj + 1] if kernel == "gaussian" else float(di == 0 and dj == 0)
                            )
                            weight[ii * w + jj] = value
                rows_x, rows_z = [], []
                for t in range(p):
                    rows_x.append(x[t] if keep_prefix else torch.zeros_like(x[t]))
                    rows_z.append(z[t] if keep_prefix else torch.zeros_like(z[t]))
                for q in range(h * w):
                    rows_x.append(weight[q] * x[p + q])
                    rows_z.append(weight[q] * z[p + q])
                x_k = torch.stack(rows_x)[None]
                z_k = torch.stack(rows_z)[None]
                blk = blocks[b]
                y = x_k + blk.ls1(blk.attn(z_k))
                y = y + blk.ls2(blk.mlp(blk.norm2(y)))
                for later in blocks[b + 1 :]:
                    y = later(y)
                logits = model.forward_head(model.norm(y))[0]
                if score == "probability":
                    logits = logits.softmax(-1)
                maps[:, i, j] = logits.double()
    return maps


def photo_like(width: int, height: int, *, seed: int = 0, cell: int = 64, noise: int = 24) -> Image.Image:
    """A photo-like RGB image with detail at two scales: random colours on a ``cell``-pixel grid,
    smoothly interpolated, plus pixel noise of up to ``noise`` levels."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (height // cell, width // cell, 3), dtype=np.uint8))
    fine = rng.integers(-noise, noise + 1, (height, width, 3))
    base = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int64)
    return Image.fromarray(np.clip(base + fine, 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, quality: int = 90, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, **options)
    return buffer.getvalue()


_PORTS_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now and that this process has not handed out
    before: the OS may offer the same free port to two calls in a row, and two servers of one test
    must not get the same one."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _PORTS_HANDED_OUT:
            _PORTS_HANDED_OUT.add(port)
            return port
    raise RuntimeError("no fresh free port found")
