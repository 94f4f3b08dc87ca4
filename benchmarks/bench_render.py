"""Encoding cost of maps: heatmap PNGs (RGB against palette, the service's PNG writer against
Pillow's) and maps as JSON numbers (json against orjson).

For each map size the script builds a smooth map like the service's (a random patch-grid map
upsampled bilinearly), then times, in this process on one thread, encoding its colour heatmap as an
RGB PNG (``heatmap_rgb`` then ``png_bytes``), as a palette PNG (``heatmap_png``, what the service
returns; with ISA-L's deflate where it is installed, and again with zlib's, the writer's fallback)
and as the same palette PNG written by Pillow's encoder, and prints the milliseconds per map, their
ratios, the PNG sizes, and whether all of them decode to the same pixels. A second table times the ``json`` encoding of the same map (six decimals) in a
response body: the standard library's ``json.dumps`` of the nested lists, as Starlette's
``JSONResponse`` writes it, against the service's ``json_bytes`` (orjson, straight from the numpy
array), and checks that both give the same numbers.

Example:
    python benchmarks/bench_render.py --sizes 14x14 224x224 1024x768 4032x3024
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.api.encoding import json_bytes
from app.serving import png
from app.serving.render import colormap_lut, heatmap_png, heatmap_rgb, png_bytes, to_uint8
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


@contextlib.contextmanager
def zlib_deflate() -> Iterator[None]:
    """The service's PNG writer with zlib's deflate, its fallback where ISA-L is not installed."""
    saved, png._isal = png._isal, None
    try:
        yield
    finally:
        png._isal = saved


def pillow_palette_png(values: np.ndarray, colormap: str) -> bytes:
    """The same palette heatmap written by Pillow's PNG encoder (no row filter), at the same zlib level."""
    levels = to_uint8(values)
    image = Image.frombytes("P", (levels.shape[1], levels.shape[0]), levels.tobytes())
    image.putpalette(colormap_lut(colormap).tobytes())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


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
    deflater = "ISA-L" if png._isal is not None else "zlib"
    lines = [
        f"Colour map {args.colormap}; one thread; median of {args.repeats}",
        "",
        f"| map | RGB PNG ms | palette PNG ms | RGB / palette | {deflater} / zlib | Pillow's palette PNG ms | "
        "Pillow / ours | RGB bytes | palette bytes | palette bytes, zlib | Pillow's palette bytes | same pixels |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for size in args.sizes:
        width, height = (int(v) for v in size.lower().split("x"))
        values = smooth_map(width, height)
        rgb = png_bytes(heatmap_rgb(values, args.colormap))
        palette = heatmap_png(values, args.colormap)
        pillow = pillow_palette_png(values, args.colormap)
        with zlib_deflate():
            by_zlib = heatmap_png(values, args.colormap)
            zlib_ms = median_ms(lambda: heatmap_png(values, args.colormap), args.repeats)  # noqa: B023
        images = (rgb, palette, by_zlib, pillow)
        decoded = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in images]
        same = all(np.array_equal(decoded[0], other) for other in decoded[1:])
        rgb_ms = median_ms(lambda: png_bytes(heatmap_rgb(values, args.colormap)), args.repeats)  # noqa: B023
        palette_ms = median_ms(lambda: heatmap_png(values, args.colormap), args.repeats)  # noqa: B023
        pillow_ms = median_ms(lambda: pillow_palette_png(values, args.colormap), args.repeats)  # noqa: B023
        lines.append(
            f"| {width}x{height} | {rgb_ms:.2f} | {palette_ms:.2f} | {rgb_ms / palette_ms:.2f}x | "
            f"{zlib_ms / palette_ms:.2f}x | {pillow_ms:.2f} | {pillow_ms / palette_ms:.2f}x | "
            f"{len(rgb)} | {len(palette)} | {len(by_zlib)} | {len(pillow)} | {'yes' if same else 'NO'} |"
        )
        print(lines[-1], flush=True)
    print()
    print("\n".join(lines))
    print()
    print("\n".join(json_table(args.sizes, args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
