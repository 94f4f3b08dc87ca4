"""The evaluation's output: method x metric tables (Markdown, text, CSV), the paired pointing
comparison, and the figure of maps over the first images."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from app.eval.evaluate import EvalReport
from app.serving.render import overlay_rgb

COLUMNS: tuple[str, ...] = (
    "drop",
    "increase",
    "coherency",
    "complexity",
    "adcc",
    "insertion",
    "deletion",
    "pointing",
    "pointing_correct",
)
HEADERS: dict[str, str] = {
    "drop": "Drop ↓",
    "increase": "Increase ↑",
    "coherency": "Coherency ↑",
    "complexity": "Complexity ↓",
    "adcc": "ADCC ↑",
    "insertion": "Insertion ↑",
    "deletion": "Deletion ↓",
    "pointing": "Pointing ↑",
    "pointing_correct": "Pointing, correct ↑",
}


def percent_cell(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return "–" if math.isnan(value) else f"{100 * value:.2f}"


def markdown_table(report: EvalReport) -> str:
    """Method x metric table, every value in percent."""
    header = "| Method | " + " | ".join(HEADERS[c] for c in COLUMNS) + " |"
    rule = "|---|" + "|".join("---:" for _ in COLUMNS) + "|"
    lines = [header, rule]
    for row in report.rows():
        lines.append(f"| {row['method']} | " + " | ".join(percent_cell(row[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def pointing_pairs_table(report: EvalReport, reference: str) -> str:
    """Markdown: the paired pointing comparison against ``reference`` ('' without pointing data)."""
    rows = report.pointing_pairs(reference)
    if not rows:
        return ""
    lines = [
        f"| Method | misses | {reference} misses | wins | losses | p | misses, correct | "
        f"{reference} misses, correct | wins, correct | losses, correct | p, correct |",
        "|---|" + "|".join("---:" for _ in range(10)) + "|",
    ]
    for row in rows:
        cells = []
        for suffix in ("", "_correct"):
            cells += [str(row[f"{key}{suffix}"]) for key in ("misses", "reference_misses", "wins", "losses")]
            cells.append(f"{float(row[f'p{suffix}']):.3g}")
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def text_table(report: EvalReport) -> str:
    names = [str(row["method"]) for row in report.rows()]
    width = max(len("method"), *(len(n) for n in names))
    widths = {c: max(10, len(c)) for c in COLUMNS}
    header = f"{'method':<{width}} " + " ".join(f"{c:>{widths[c]}}" for c in COLUMNS)
    lines = [header, "-" * len(header)]
    for row in report.rows():
        cells = " ".join(f"{percent_cell(row[c]):>{widths[c]}}" for c in COLUMNS)
        lines.append(f"{row['method']!s:<{width}} {cells}")
    return "\n".join(lines)


def csv_text(report: EvalReport) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", *COLUMNS, "images"])
    for row in report.rows():
        writer.writerow([row["method"], *(f"{float(row[c]):.6f}" for c in COLUMNS), report.images])
    return buffer.getvalue()


PAIR_COLUMNS: tuple[str, ...] = tuple(
    f"{key}{suffix}"
    for suffix in ("", "_correct")
    for key in ("images", "misses", "reference_misses", "wins", "losses", "p")
)


def pointing_pairs_csv(report: EvalReport, reference: str) -> str:
    """The paired pointing comparison against ``reference`` as CSV ('' without pointing data)."""
    rows = report.pointing_pairs(reference)
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "reference", *PAIR_COLUMNS])
    for row in rows:
        writer.writerow([row["method"], reference, *(row[column] for column in PAIR_COLUMNS)])
    return buffer.getvalue()


def figure(report: EvalReport, tile: int = 112, labels: Sequence[str] | None = None) -> Image.Image:
    """Rows of images: the input, then each method's map over it (jet colour map)."""
    if report.figure_pixels is None:
        raise ValueError("the report holds no images for a figure")
    rows = []
    for row, pixels in enumerate(report.figure_pixels):
        caption = labels[row] if labels is not None and row < len(labels) else None
        maps = [overlay_rgb(pixels, report.figure_maps[name][row], opacity=0.5) for name in report.methods]
        rows.append([(pixels, caption)] + [(array, None) for array in maps])
    return tile_grid(["input", *report.methods], rows, tile)


def tile_grid(
    titles: Sequence[str], rows: Sequence[Sequence[tuple[np.ndarray, str | None]]], tile: int
) -> Image.Image:
    """Square tiles (RGB arrays, scaled to ``tile`` px) under a row of column titles; an empty title
    widens the one before it. A tile's caption, if any, is written at its bottom left."""
    header = 16
    canvas = Image.new("RGB", (tile * len(titles), header + tile * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(titles):
        if title:
            span = 1
            while column + span < len(titles) and not titles[column + span]:
                span += 1
            draw.text((column * tile + 3, 2), title[: span * tile // 6], fill=(0, 0, 0))
    for row, tiles in enumerate(rows):
        top = header + row * tile
        for column, (array, _) in enumerate(tiles):
            image = Image.fromarray(array).resize((tile, tile), Image.Resampling.NEAREST)
            canvas.paste(image, (column * tile, top))
        for column, (_, caption) in enumerate(tiles):  # after the tiles: a caption may run past its own
            if caption is not None:
                draw.text((column * tile + 3, top + tile - 12), caption, fill=(255, 255, 255))
    return canvas
