"""Host CPU cost per image of the Pillow image path and the tensor image path, both on the CPU.

Two stages are timed for one photo-like JPEG (320x320 by default) and two model configs (a
deit_small-like 112-pixel bicubic config with crop_pct 0.875 and a 7x7 grid, and the shipped shapes
model's 64-pixel bilinear config with an 8x8 grid):

* decode + preprocess: Pillow decode, ``Preprocessor.to_pixels`` and ``normalize``, against
  ``decode_batch`` + ``preprocess_batch`` (torchvision decode, tensor resize, crop, normalise);
* render + encode of one map at input size as heatmap and overlay PNGs: ``render.heatmap_png`` and
  ``overlay_rgb`` + ``png_bytes``, against ``device_render.render_maps`` (PNG, and JPEG).

Each round times ``--batch`` images through each path in turn (rounds alternate the paths, so a
change of machine load hits both alike); the script prints the medians over rounds of the per-image
CPU time of this process (``time.process_time``, torch on one thread) and of the wall time, and the
ratio Pillow / tensor from the same run.

Example:
    python benchmarks/bench_device_images.py --rounds 15 --batch 16
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine.maps import normalize_maps, upsample_maps
from app.engine.preprocess import DataConfig, Preprocessor
from app.serving import render
from app.serving.device_decode import DeviceImage, decode_batch
from app.serving.device_preprocess import preprocess_batch
from app.serving.device_render import render_maps
from app.serving.images import decode

CONFIGS: dict[str, tuple[DataConfig, int]] = {
    "deit_small-like 112 px": (DataConfig((112, 112), "bicubic", 0.875), 7),
    "shapes 64 px": (DataConfig((64, 64), "bilinear", 1.0, "center", (0.5,) * 3, (0.25,) * 3), 8),
}


def photo_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(
        rng.integers(0, 256, (max(1, height // 48), max(1, width // 48), 3), dtype=np.uint8)
    )
    base = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int64)
    pixels = np.clip(base + rng.integers(-16, 17, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def pillow_prepare(blobs: list[bytes], pre: Preprocessor) -> Any:
    return [pre.normalize(pre.to_pixels(decode(data).image)[0]) for data in blobs]


def tensor_prepare(blobs: list[bytes], pre: Preprocessor) -> Any:
    images = [image for image in decode_batch(blobs, "cpu") if isinstance(image, DeviceImage)]
    return preprocess_batch(images, pre, "cpu")


def pillow_render(maps: torch.Tensor, pixels: np.ndarray, size: tuple[int, int], count: int) -> Any:
    out = []
    for _ in range(count):
        sized = upsample_maps(maps, size).clamp_(0.0, 1.0)[0].numpy()
        levels = render.to_uint8(sized)
        heatmap = render.heatmap_png(levels)
        overlay = render.png_bytes(render.overlay_rgb(pixels, sized))
        out.append((heatmap, overlay))
    return out


def tensor_render(maps: torch.Tensor, pixels: torch.Tensor, pre: Preprocessor, fmt: str, count: int) -> Any:
    geometry = pre.geometry((320, 320))
    return [
        render_maps(maps, geometry, encodings=("heatmap", "overlay"), input_pixels=pixels, image_format=fmt)
        for _ in range(count)
    ]


def timed(function: Callable[[], Any]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return (time.process_time() - cpu) * 1000, (time.perf_counter() - wall) * 1000


def run(name: str, paths: dict[str, Callable[[], Any]], rounds: int, batch: int) -> None:
    for function in paths.values():
        function()  # warm-up
    cpu: dict[str, list[float]] = {key: [] for key in paths}
    wall: dict[str, list[float]] = {key: [] for key in paths}
    for round_index in range(rounds):
        order = list(paths) if round_index % 2 == 0 else list(reversed(paths))
        for key in order:
            cpu_ms, wall_ms = timed(paths[key])
            cpu[key].append(cpu_ms / batch)
            wall[key].append(wall_ms / batch)
    reference = statistics.median(cpu["pillow"])
    for key in paths:
        median_cpu = statistics.median(cpu[key])
        print(
            f"| {name} | {key} | {median_cpu:.3f} | {statistics.median(wall[key]):.3f} | "
            f"{reference / median_cpu:.2f} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="320x320", help="posted JPEG, WIDTHxHEIGHT")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=16, help="images per timed call")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    width, height = (int(v) for v in args.size.lower().split("x"))
    blobs = [photo_jpeg(width, height, seed=i) for i in range(args.batch)]
    print(f"{args.size} JPEG, {args.batch} images per call, {args.rounds} rounds, torch threads 1")
    print("| config | stage: path | CPU ms / image | wall ms / image | Pillow / this (CPU) |")
    print("|---|---|---|---|---|")
    for name, (config, _grid) in CONFIGS.items():
        pre = Preprocessor(config)
        run(
            name,
            {
                "pillow": partial(pillow_prepare, blobs, pre),
                "tensor": partial(tensor_prepare, blobs, pre),
            },
            args.rounds,
            args.batch,
        )
    for name, (config, grid) in CONFIGS.items():
        pre = Preprocessor(config)
        maps = normalize_maps(torch.randn(1, grid, grid, generator=torch.Generator().manual_seed(0)))
        pixels = tensor_prepare(blobs[:1], pre).pixels[0]
        pixels_hwc = np.ascontiguousarray(pixels.permute(1, 2, 0).numpy())
        size = config.input_size
        run(
            f"{name}, render",
            {
                "pillow": partial(pillow_render, maps, pixels_hwc, size, args.batch),
                "tensor": partial(tensor_render, maps, pixels, pre, "png", args.batch),
                "tensor-jpeg": partial(tensor_render, maps, pixels, pre, "jpeg", args.batch),
            },
            args.rounds,
            args.batch,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
