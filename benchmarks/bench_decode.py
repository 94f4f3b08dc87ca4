"""Decode + preprocess cost of posted images: the exact path against the service's defaults.

For each format and image size the script encodes one photo-like image (smooth colour fields plus
fine noise; ``--noise`` sets how much texture, and so how many bytes, it has), then times
``prepare_image`` (decode, EXIF, resize and crop to the model input) in this process on one thread,
**exact** (``reduced_jpeg_decode``, ``two_step_resize``, ``tensor_resize`` and ``window_resize``
off: a whole decode and one Pillow resize of the whole image, then the crop, as timm's PIL pipeline)
and with the **defaults** (large JPEGs decoded at a reduced scale, large images of the other formats
resized in two steps, the resize run by torch's kernels; ``--pillow-resize``: by Pillow's, and with
``--window-resize`` also only the crop window resized), and prints the milliseconds per image,
their ratio, and how far the defaults' model input is from the exact one (mean and largest
difference in 8-bit levels).

Example:
    python benchmarks/bench_decode.py --formats JPEG PNG --sizes 320x320 1024x768 4032x3024
"""

from __future__ import annotations

import argparse
import io
import sys
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine.preprocess import DataConfig, Preprocessor
from app.serving.prepare import prepare_image
from benchmarks.timing import median_ms


def photo_image(
    width: int, height: int, noise: int, fmt: str = "JPEG", quality: int = 90, seed: int = 0
) -> bytes:
    """A photo-like image encoded as ``fmt`` (JPEG and WebP at ``quality``; PNG at Pillow's default level)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(
        rng.integers(0, 256, (max(1, height // 48), max(1, width // 48), 3), dtype=np.uint8)
    )
    base = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int64)
    pixels = np.clip(base + rng.integers(-noise, noise + 1, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, quality=quality)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--formats", nargs="+", default=["JPEG", "PNG", "WEBP"], choices=["JPEG", "PNG", "WEBP"]
    )
    parser.add_argument(
        "--sizes", nargs="+", default=["320x320", "640x480", "1024x768", "2048x1536", "4032x3024"]
    )
    parser.add_argument("--input-size", type=int, default=224, help="model input side (DeiT: 224)")
    parser.add_argument("--crop-pct", type=float, default=0.875)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--noise", type=int, default=8, help="fine noise amplitude, in levels (texture)")
    parser.add_argument(
        "--window-resize",
        action="store_true",
        help="the fast variant also resizes only the crop window (with --pillow-resize)",
    )
    parser.add_argument(
        "--pillow-resize",
        action="store_true",
        help="the fast variant resizes with Pillow (tensor_resize off)",
    )
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    preprocessor = Preprocessor(
        DataConfig(
            input_size=(args.input_size, args.input_size), interpolation="bicubic", crop_pct=args.crop_pct
        )
    )
    common = {"max_pixels": 10**9, "allowed_formats": frozenset(args.formats), "keep_original": False}
    lines = [
        f"Model input {args.input_size}x{args.input_size} (bicubic, crop_pct {args.crop_pct}); one thread; "
        f"median of {args.repeats}; fine noise +-{args.noise} levels"
        + ("; defaults with Pillow's resize" if args.pillow_resize else "")
        + ("; defaults plus window_resize" if args.window_resize else ""),
        "",
        "| format | size | bytes | exact ms | defaults ms | exact / defaults | mean diff | max diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for fmt in args.formats:
        for size in args.sizes:
            width, height = (int(v) for v in size.lower().split("x"))
            data = photo_image(width, height, args.noise, fmt)
            exact_call = partial(
                prepare_image,
                data,
                preprocessor,
                reduced_jpeg_decode=False,
                two_step_resize=False,
                window_resize=False,
                tensor_resize=False,
                **common,
            )
            fast_call = partial(
                prepare_image,
                data,
                preprocessor,
                reduced_jpeg_decode=True,
                two_step_resize=True,
                window_resize=args.window_resize,
                tensor_resize=not args.pillow_resize,
                **common,
            )
            exact, fast = exact_call(), fast_call()
            difference = np.abs(exact.input_pixels.astype(np.int64) - fast.input_pixels.astype(np.int64))
            exact_ms = median_ms(exact_call, args.repeats)
            fast_ms = median_ms(fast_call, args.repeats)
            lines.append(
                f"| {fmt} | {width}x{height} | {len(data)} | {exact_ms:.2f} | {fast_ms:.2f} | "
                f"{exact_ms / fast_ms:.2f}x | {difference.mean():.2f} | {int(difference.max())} |"
            )
            print(lines[-1], flush=True)
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
