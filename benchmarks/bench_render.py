"""Encoding cost of maps: heatmap PNGs (RGB against palette) and maps as JSON numbers (json against orjson).

For each map size the script builds a smooth map like the service's (a random patch-grid map
upsampled bilinearly), then times, in this process on one thread, encoding its colour heatmap as an
RGB PNG (``heatmap_rgb`` then ``png_bytes``) and as a palette PNG (``heatmap_png``, what the service
returns), and prints the milliseconds per map, their ratio, the PNG sizes, and whether the two decode
to the same pixels. A second table times the ``json`` encoding of the same map (six decimals) in a
response body: the standard library's ``json.dumps`` of the nested lists, as Starlette's
``JSONResponse`` writes it, against the service's ``json_bytes`` (orjson, straight from the numpy
array), and checks that both give the same numbers.

Example:
    python benchmarks/bench_render.py --sizes 14x14 224x224 1024x768 4032x3024
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.api.encoding import json_bytes
from app.serving.render import heatmap_png, heatmap_rgb, png_bytes
from benchmarks.timing import median_ms


def smooth_map(width: int, height: int, grid: int = 14, seed: int = 0) -> np.ndarray:
    """A (height, width) map in [0, 1]: a random grid x grid map upsampled bilinearly."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, grid, grid, generator=generator)
    values = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    values = (values - values.min()) / (values.max() - values.min())
    return values.numpy().astype(np.float64)


def json_table(sizes: list[str], repeats: int) -> list[str]:
    import json

    lines = [
        "| map | json.dumps ms | json_bytes ms | json / json_bytes | bytes | same numbers |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for size in sizes:
        width, height = (int(v) for v in size.lower().split("x"))
        values = smooth_map(width, height).round(6)
        rows = values.tolist()

        def standard(rows: list[list[float]] = rows) -> bytes:
            body = {"explanations": [{"json": rows}]}
            return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()

        def fast(values: np.ndarray = values) -> bytes:
            return json_bytes({"explanations": [{"json": values}]})

        same = json.loads(standard()) == json.loads(fast())
        standard_ms, fast_ms = median_ms(standard, repeats), median_ms(fast, repeats)
        lines.append(
            f"| {width}x{height} | {standard_ms:.2f} | {fast_ms:.2f} | {standard_ms / fast_ms:.2f}x | "
            f"{len(fast())} | {'yes' if same else 'NO'} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["14x14", "224x224", "1024x768", "4032x3024"])
    parser.add_argument("--colormap", default="jet")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    lines = [
        f"Colour map {args.colormap}; one thread; median of {args.repeats}",
        "",
        "| map | RGB PNG ms | palette PNG ms | RGB / palette | RGB bytes | palette bytes | same pixels |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for size in args.sizes:
        width, height = (int(v) for v in size.lower().split("x"))
        values = smooth_map(width, height)
        rgb = png_bytes(heatmap_rgb(values, args.colormap))
        palette = heatmap_png(values, args.colormap)
        same = np.array_equal(
            np.asarray(Image.open(io.BytesIO(rgb)).convert("RGB")),
            np.asarray(Image.open(io.BytesIO(palette)).convert("RGB")),
        )
        rgb_ms = median_ms(lambda: png_bytes(heatmap_rgb(values, args.colormap)), args.repeats)  # noqa: B023
        palette_ms = median_ms(lambda: heatmap_png(values, args.colormap), args.repeats)  # noqa: B023
        lines.append(
            f"| {width}x{height} | {rgb_ms:.2f} | {palette_ms:.2f} | {rgb_ms / palette_ms:.2f}x | "
            f"{len(rgb)} | {len(palette)} | {'yes' if same else 'NO'} |"
        )
        print(lines[-1], flush=True)
    print()
    print("\n".join(lines))
    print()
    print("\n".join(json_table(args.sizes, args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
