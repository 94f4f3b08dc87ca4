"""Decode + preprocess cost of posted JPEGs: full decode against reduced-scale JPEG decoding.

For each image size the script encodes one photo-like JPEG (smooth colour fields plus fine noise;
``--noise`` sets how much texture, and so how many bytes, it has), then times ``prepare_image``
(decode, EXIF, resize and crop to the model input, normalise) with ``reduced_jpeg_decode`` off and
on, in this process on one thread, and prints the milliseconds per image, their ratio, and how far
the reduced decode's model input is from the full decode's (mean and largest difference in 8-bit
levels).

Example:
    python benchmarks/bench_decode.py --sizes 320x320 1024x768 4032x3024 --input-size 224
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine.preprocess import DataConfig, Preprocessor
from app.serving.pipeline import prepare_image


def photo_jpeg(width: int, height: int, noise: int, quality: int = 90, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(
        rng.integers(0, 256, (max(1, height // 48), max(1, width // 48), 3), dtype=np.uint8)
    )
    base = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int64)
    pixels = np.clip(base + rng.integers(-noise, noise + 1, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def time_ms(
    data: bytes, preprocessor: Preprocessor, reduced: bool, common: dict[str, Any], repeats: int
) -> float:
    """Median milliseconds of one prepare_image call."""
    samples = []
    for index in range(repeats + 1):
        started = time.perf_counter()
        prepare_image(data, preprocessor, reduced_jpeg_decode=reduced, **common)
        if index == 0:
            continue  # warm-up
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["320x320", "1024x768", "2048x1536", "4032x3024"])
    parser.add_argument("--input-size", type=int, default=224, help="model input side (DeiT: 224)")
    parser.add_argument("--crop-pct", type=float, default=0.875)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--noise", type=int, default=8, help="fine noise amplitude, in levels (texture)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    preprocessor = Preprocessor(
        DataConfig(
            input_size=(args.input_size, args.input_size), interpolation="bicubic", crop_pct=args.crop_pct
        )
    )
    common = {"max_pixels": 10**9, "allowed_formats": frozenset({"JPEG"}), "keep_original": False}
    lines = [
        f"Model input {args.input_size}x{args.input_size} (bicubic, crop_pct {args.crop_pct}); one thread; "
        f"median of {args.repeats}; fine noise +-{args.noise} levels",
        "",
        "| JPEG | bytes | full decode ms | reduced decode ms | full / reduced | mean diff | max diff |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for size in args.sizes:
        width, height = (int(v) for v in size.lower().split("x"))
        data = photo_jpeg(width, height, args.noise)
        full = prepare_image(data, preprocessor, reduced_jpeg_decode=False, **common)
        reduced = prepare_image(data, preprocessor, reduced_jpeg_decode=True, **common)
        difference = np.abs(full.input_pixels.astype(np.int64) - reduced.input_pixels.astype(np.int64))
        full_ms = time_ms(data, preprocessor, False, common, args.repeats)
        reduced_ms = time_ms(data, preprocessor, True, common, args.repeats)
        lines.append(
            f"| {width}x{height} | {len(data)} | {full_ms:.2f} | {reduced_ms:.2f} | {full_ms / reduced_ms:.2f}x | "
            f"{difference.mean():.2f} | {int(difference.max())} |"
        )
        print(lines[-1], flush=True)
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
