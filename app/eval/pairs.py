"""Which object a class is: the pointing game on two-object images (:func:`evaluate_pairs`), for the
map of each object's class, with its tables and figure."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from app.engine.models import LoadedModel
from app.eval import metrics
from app.eval.baselines import make_method
from app.eval.batches import mask_to_input, model_pixels, to_inputs
from app.eval.report import percent_cell, tile_grid
from app.serving.maps import shape_maps
from app.serving.render import overlay_rgb


@dataclass
class PairReport:
    """Which object a class is, on two-object images (:func:`app.eval.shapes.render_pair`): per
    method, one pointing hit (0/1) per image and object, for the map of that object's class."""

    methods: list[str]
    hits: dict[str, np.ndarray]  # method -> (N, 2)
    images: int
    top2_match: float  # share of images whose two most probable classes are the two objects'
    # the first images, for a figure: pixels (k, H, W, 3), labels (k, 2), maps (k, 2, H, W) per method
    figure_pixels: np.ndarray | None = None
    figure_labels: np.ndarray | None = None
    figure_maps: dict[str, np.ndarray] = field(default_factory=dict)

    def rows(self) -> list[dict[str, float | str]]:
        """Per method: class pointing (share of (image, object) hits), both objects hit, neither."""
        rows: list[dict[str, float | str]] = []
        for name in self.methods:
            hits = self.hits[name]
            per_image = hits.sum(axis=1)
            rows.append(
                {
                    "method": name,
                    "class_pointing": float(hits.mean()) if hits.size else math.nan,
                    "both": float((per_image == 2).mean()) if hits.size else math.nan,
                    "neither": float((per_image == 0).mean()) if hits.size else math.nan,
                }
            )
        return rows

    def paired(self, reference: str) -> dict[str, tuple[int, int, float]]:
        """Per other method: (wins, losses, exact McNemar p) over the (image, object) pairs against
        ``reference`` (wins: only the method hits)."""
        if reference not in self.hits:
            return {}
        base = self.hits[reference].ravel().tolist()
        result = {}
        for name in self.methods:
            if name != reference:
                wins, losses = metrics.paired_hits(self.hits[name].ravel().tolist(), base)
                result[name] = (wins, losses, metrics.exact_mcnemar(wins, losses))
        return result


def evaluate_pairs(
    loaded: LoadedModel,
    methods: Sequence[str],
    *,
    seed: int,
    limit: int,
    batch_size: int = 25,
    tolerance: float = 4.0,
    figure_images: int = 0,
    progress: bool = True,
) -> PairReport:
    """Pointing game on ``limit`` two-object images of ``seed``: for each object, the method's map
    of that object's class (ground truth) must peak within ``tolerance`` px of that object. The two
    objects are :data:`app.eval.shapes.PAIR_GAP` px apart, so no peak is a hit on both: a
    class-independent map (attention rollout) scores at most 50%."""
    from tqdm import tqdm

    from app.eval.shapes import generate_pairs

    model, device = loaded.model, loaded.device
    dtype = next(model.parameters()).dtype
    map_functions = {name: make_method(name, model, loaded.engine) for name in methods}
    hits: dict[str, list[np.ndarray]] = {name: [] for name in methods}
    kept_pixels: list[np.ndarray] = []
    kept_labels: list[np.ndarray] = []
    kept_maps: dict[str, list[np.ndarray]] = {name: [] for name in methods}
    matches = 0
    bar = tqdm(total=limit, desc="pairs", unit="img", disable=not progress)
    for start in range(0, limit, batch_size):
        count = min(batch_size, limit - start)
        data = generate_pairs(seed, count, start=start)
        pixels = model_pixels(data.images, loaded)
        masks = [[mask_to_input(mask, loaded) for mask in pair] for pair in data.masks]
        keep = max(0, min(count, figure_images - len(kept_pixels)))
        kept_pixels.extend(pixels[:keep])
        kept_labels.extend(data.labels[:keep])
        inputs = to_inputs(pixels, loaded).to(device=device, dtype=dtype)
        object_masks = torch.from_numpy(np.array(masks))  # (b, 2, H, W)
        labels = torch.from_numpy(data.labels)  # (b, 2)
        with torch.no_grad():
            top2 = model(inputs).float().topk(2, dim=-1).indices.cpu()
        matches += int((top2.sort(dim=-1).values == labels.sort(dim=-1).values).all(dim=-1).sum())
        height, width = inputs.shape[-2:]
        for name, map_fn in map_functions.items():
            columns, maps = [], []
            for position in (0, 1):
                raw = map_fn(inputs, labels[:, position].to(device)).float().cpu()
                upsampled = shape_maps(raw, "input", input_size=(height, width))
                columns.append(metrics.pointing_hits(upsampled, object_masks[:, position], tolerance))
                maps.append(upsampled[:keep].numpy())
            hits[name].append(torch.stack(columns, dim=1).numpy())
            if keep:
                kept_maps[name].extend(np.stack(maps, axis=1))
        bar.update(count)
    bar.close()
    return PairReport(
        methods=list(methods),
        hits={name: np.concatenate(parts) if parts else np.zeros((0, 2)) for name, parts in hits.items()},
        images=limit,
        top2_match=matches / limit if limit else math.nan,
        figure_pixels=np.stack(kept_pixels) if kept_pixels else None,
        figure_labels=np.stack(kept_labels) if kept_labels else None,
        figure_maps={name: np.stack(maps) for name, maps in kept_maps.items() if maps},
    )


def pairs_figure(report: PairReport, labels: Sequence[str], tile: int = 112) -> Image.Image:
    """Rows of two-object images: the input, then per method its maps of the two objects' classes
    (jet colour map over the image; the class named on the tile)."""
    if report.figure_pixels is None or report.figure_labels is None:
        raise ValueError("the report holds no images for a figure")
    titles = ["input"] + [title for name in report.methods for title in (name, "")]
    rows = []
    for row, (pixels, pair) in enumerate(zip(report.figure_pixels, report.figure_labels, strict=True)):
        names = [labels[int(c)] if int(c) < len(labels) else str(int(c)) for c in pair]
        tiles: list[tuple[np.ndarray, str | None]] = [(pixels, None)]
        for name in report.methods:  # the method's maps of the two classes
            maps = report.figure_maps[name][row]
            tiles += [(overlay_rgb(pixels, maps[k], opacity=0.5), names[k]) for k in (0, 1)]
        rows.append(tiles)
    return tile_grid(titles, rows, tile)


def pairs_markdown(report: PairReport, reference: str) -> str:
    """Method x (class pointing, both, neither, paired against ``reference``), in percent."""
    paired = report.paired(reference)
    lines = [
        f"| Method | Class pointing ↑ | Both objects ↑ | Neither ↓ | wins over {reference} | "
        f"losses to {reference} | p |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report.rows():
        name = str(row["method"])
        wins, losses, p = paired.get(name, (0, 0, math.nan))
        comparison = ["–", "–", "–"] if name not in paired else [str(wins), str(losses), f"{p:.3g}"]
        cells = [percent_cell(row[key]) for key in ("class_pointing", "both", "neither")] + comparison
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pairs_csv(report: PairReport, reference: str) -> str:
    paired = report.paired(reference)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        ["method", "class_pointing", "both", "neither", "reference", "wins", "losses", "p", "images"]
    )
    for row in report.rows():
        wins, losses, p = paired.get(str(row["method"]), (0, 0, math.nan))
        values = [f"{float(row[key]):.6f}" for key in ("class_pointing", "both", "neither")]
        writer.writerow([row["method"], *values, reference, wins, losses, p, report.images])
    return buffer.getvalue()
