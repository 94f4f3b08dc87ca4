"""The evaluation behind ``python -m app eval``: data, the per-method loop, tables and the figure.

For every batch and method: the class ``c`` is the ground-truth label (or the prediction, by option
or when no labels exist); the method's map for ``c`` is min-max normalised on the patch grid and fed
to the metrics of :mod:`app.eval.metrics` (ADCC and its parts, insertion and deletion AUC, and the
pointing game where object masks exist; also over only the images the model classifies
correctly, where labels exist, since a map of the true class on a misclassified image explains a
class the model did not see). :func:`evaluate_pairs` runs the pointing game on two-object images
instead, for the map of each object's class.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from app.engine.maps import normalize_maps, upsample_maps
from app.engine.models import LoadedModel
from app.eval import metrics
from app.eval.baselines import make_method
from app.serving.render import overlay_rgb

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
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


@dataclass
class Batch:
    """Model inputs (B, 3, H, W), labels (B,) or None, masks (B, H, W) or None, pixels (B, H, W, 3)."""

    inputs: torch.Tensor
    labels: torch.Tensor | None
    masks: torch.Tensor | None
    pixels: np.ndarray
    names: list[str]


@dataclass
class MethodScores:
    """Per-image values of one method, and their summary."""

    drop: list[float] = field(default_factory=list)
    increase: list[float] = field(default_factory=list)
    coherency: list[float] = field(default_factory=list)
    complexity: list[float] = field(default_factory=list)
    insertion: list[float] = field(default_factory=list)
    deletion: list[float] = field(default_factory=list)
    pointing: list[float] = field(default_factory=list)
    pointing_correct: list[float] = field(default_factory=list)  # images the model classifies right

    def summary(self) -> dict[str, float]:
        def mean(values: list[float]) -> float:
            return float(np.mean(values)) if values else math.nan

        result = {
            "drop": mean(self.drop),
            "increase": mean(self.increase),
            "coherency": mean(self.coherency),
            "complexity": mean(self.complexity),
            "insertion": mean(self.insertion),
            "deletion": mean(self.deletion),
            "pointing": mean(self.pointing),
            "pointing_correct": mean(self.pointing_correct),
        }
        result["adcc"] = metrics.adcc(result["drop"], result["coherency"], result["complexity"])
        return result


@dataclass
class EvalReport:
    methods: list[str]
    scores: dict[str, MethodScores]
    images: int
    accuracy: float | None
    target: str
    figure_pixels: np.ndarray | None = None
    figure_maps: dict[str, np.ndarray] = field(default_factory=dict)
    figure_names: list[str] = field(default_factory=list)

    def rows(self) -> list[dict[str, float | str]]:
        return [{"method": name, **self.scores[name].summary()} for name in self.methods]

    def pointing_pairs(self, reference: str) -> list[dict[str, float | int | str]]:
        """Every other method's pointing hits against ``reference``'s on the same images, over all
        images and over the correctly classified ones: misses, wins (only the method hits), losses
        (only the reference hits) and the exact McNemar p-value. Empty without pointing data."""
        if reference not in self.scores or not self.scores[reference].pointing:
            return []
        base = self.scores[reference]
        rows: list[dict[str, float | int | str]] = []
        for name in self.methods:
            if name == reference:
                continue
            row: dict[str, float | int | str] = {"method": name}
            for suffix, hits, base_hits in (
                ("", self.scores[name].pointing, base.pointing),
                ("_correct", self.scores[name].pointing_correct, base.pointing_correct),
            ):
                wins, losses = metrics.paired_hits(hits, base_hits)
                row[f"images{suffix}"] = len(hits)
                row[f"misses{suffix}"] = len(hits) - round(sum(hits))
                row[f"reference_misses{suffix}"] = len(base_hits) - round(sum(base_hits))
                row[f"wins{suffix}"] = wins
                row[f"losses{suffix}"] = losses
                row[f"p{suffix}"] = metrics.exact_mcnemar(wins, losses)
            rows.append(row)
        return rows


# ---------------------------------------------------------------------------------------------- data


def _mask_to_input(mask: np.ndarray, loaded: LoadedModel) -> np.ndarray:
    """An (h, w) bool mask through the same resize and crop as its image."""
    image = Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB")
    pixels, _ = loaded.preprocessor.to_pixels(image)
    return pixels[..., 0] >= 128


def _to_inputs(pixels: np.ndarray, loaded: LoadedModel) -> torch.Tensor:
    config = loaded.data_config
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    return (tensor - mean) / std


def _model_pixels(images: np.ndarray, loaded: LoadedModel) -> np.ndarray:
    """(N, H0, W0, 3) uint8 generated images -> (N, H, W, 3) uint8 model input pixels."""
    return np.stack([loaded.preprocessor.to_pixels(Image.fromarray(image))[0] for image in images])


def synthetic_batches(loaded: LoadedModel, seed: int, limit: int, batch_size: int) -> Iterator[Batch]:
    """Freshly generated shapes images (with labels and object masks), preprocessed for the model."""
    from app.eval.shapes import generate

    for start in range(0, limit, batch_size):
        count = min(batch_size, limit - start)
        data = generate(seed, count, start=start)
        stacked = _model_pixels(data.images, loaded)
        masks = np.stack([_mask_to_input(mask, loaded) for mask in data.masks])
        yield Batch(
            inputs=_to_inputs(stacked, loaded),
            labels=torch.from_numpy(data.labels),
            masks=torch.from_numpy(masks),
            pixels=stacked,
            names=[f"shapes-{seed}-{start + i}" for i in range(count)],
        )


def read_labels_file(path: Path) -> dict[str, int]:
    """``NAME CLASS_ID`` per line (whitespace or comma separated; NAME relative to the image dir)."""
    mapping: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.replace(",", " ").split()
        if len(parts) < 2:
            raise ValueError(f"{path}:{number}: expected 'NAME CLASS_ID', got {text!r}")
        try:
            mapping[parts[0]] = int(parts[1])
        except ValueError as exc:
            if number == 1:  # a header line
                continue
            raise ValueError(f"{path}:{number}: class id {parts[1]!r} is not an integer") from exc
    return mapping


def list_image_dir(root: Path, labels_file: Path | None = None) -> list[tuple[Path, int | None]]:
    """Images under ``root`` with their class ids.

    With a labels file, ids come from it (files it does not name are skipped). Otherwise, when
    ``root`` holds class folders, the id is the folder's index in sorted order (the ImageNet
    convention: sorted synset folders are class 0..999); a flat folder has no labels.
    """
    if labels_file is not None:
        mapping = read_labels_file(labels_file)
        items = []
        for name, class_id in sorted(mapping.items()):
            path = root / name
            if path.is_file():
                items.append((path, class_id))
            else:
                matches = sorted(root.rglob(Path(name).name))
                if matches:
                    items.append((matches[0], class_id))
        if not items:
            raise ValueError(f"none of the images named in {labels_file} exist under {root}")
        return items
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if folders:
        return [
            (path, index)
            for index, folder in enumerate(folders)
            for path in sorted(folder.rglob("*"))
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
    return [(path, None) for path in sorted(root.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]


def folder_batches(
    loaded: LoadedModel,
    items: Sequence[tuple[Path, int | None]],
    limit: int,
    batch_size: int,
    seed: int,
) -> Iterator[Batch]:
    """Preprocessed images of an image folder; ``limit`` picks a seeded random subset."""
    chosen = list(items)
    if 0 < limit < len(chosen):
        chosen = sorted(random.Random(seed).sample(chosen, limit), key=lambda item: str(item[0]))
    for start in range(0, len(chosen), batch_size):
        part = chosen[start : start + batch_size]
        pixels = []
        for path, _ in part:
            with Image.open(path) as image:
                pixel_array, _ = loaded.preprocessor.to_pixels(image.convert("RGB"))
            pixels.append(pixel_array)
        stacked = np.stack(pixels)
        labels = [label for _, label in part]
        yield Batch(
            inputs=_to_inputs(stacked, loaded),
            labels=None if any(label is None for label in labels) else torch.tensor(labels),
            masks=None,
            pixels=stacked,
            names=[path.name for path, _ in part],
        )


# ---------------------------------------------------------------------------------------- evaluation


def evaluate(
    loaded: LoadedModel,
    batches: Iterator[Batch],
    methods: Sequence[str],
    *,
    total: int,
    target: str = "label",
    steps: int = 32,
    tolerance: float = 4.0,
    figure_images: int = 6,
    progress: bool = True,
) -> EvalReport:
    """Run every method on every batch; see the module docstring."""
    from tqdm import tqdm

    if target not in ("label", "predicted"):
        raise ValueError("target must be 'label' or 'predicted'")
    model = loaded.model
    device = loaded.device
    dtype = next(model.parameters()).dtype
    map_functions = {name: make_method(name, model, loaded.engine) for name in methods}
    scores = {name: MethodScores() for name in methods}

    @torch.no_grad()
    def model_fn(images: torch.Tensor) -> torch.Tensor:
        return model(images.to(device=device, dtype=dtype)).float().cpu()

    correct, labelled, seen = 0, 0, 0
    explained: set[str] = set()  # which class each batch explained: its labels, or the prediction
    report = EvalReport(methods=list(methods), scores=scores, images=0, accuracy=None, target=target)
    figure_pixels: list[np.ndarray] = []
    figure_maps: dict[str, list[np.ndarray]] = {name: [] for name in methods}
    bar = tqdm(total=total, desc="eval", unit="img", disable=not progress)
    for batch in batches:
        inputs = batch.inputs.to(device=device, dtype=dtype)
        logits = model_fn(inputs)
        predicted = logits.argmax(-1)
        if batch.labels is not None:
            correct += int((predicted == batch.labels).sum())
            labelled += len(batch.labels)
        class_ids = batch.labels if target == "label" and batch.labels is not None else predicted
        explained.add("label" if target == "label" and batch.labels is not None else "predicted")
        confidence = logits.softmax(-1).gather(1, class_ids[:, None])[:, 0]
        height, width = inputs.shape[-2:]
        keep_for_figure = max(0, min(len(class_ids), figure_images - len(figure_pixels)))
        figure_pixels.extend(batch.pixels[:keep_for_figure])
        for name, map_fn in map_functions.items():
            grid = normalize_maps(map_fn(inputs, class_ids.to(device)).float().cpu())
            upsampled = upsample_maps(grid, (height, width))
            masked = metrics.mask_input(inputs.float().cpu(), upsampled)
            masked_confidence = model_fn(masked).softmax(-1).gather(1, class_ids[:, None])[:, 0]
            masked_grid = normalize_maps(
                map_fn(masked.to(device=device, dtype=dtype), class_ids.to(device)).float().cpu()
            )
            method_scores = scores[name]
            method_scores.drop += metrics.average_drop(confidence, masked_confidence).tolist()
            method_scores.increase += metrics.increase_in_confidence(confidence, masked_confidence).tolist()
            method_scores.coherency += metrics.coherency(grid, masked_grid).tolist()
            method_scores.complexity += metrics.complexity(grid).tolist()
            if steps > 0:
                cpu_inputs = inputs.float().cpu()
                method_scores.insertion += metrics.curve_auc(
                    metrics.insertion_curve(model_fn, cpu_inputs, upsampled, class_ids, steps)
                ).tolist()
                method_scores.deletion += metrics.curve_auc(
                    metrics.deletion_curve(model_fn, cpu_inputs, upsampled, class_ids, steps)
                ).tolist()
            if batch.masks is not None:
                hits = metrics.pointing_hits(upsampled, batch.masks, tolerance)
                method_scores.pointing += hits.tolist()
                if batch.labels is not None:
                    method_scores.pointing_correct += hits[predicted == batch.labels].tolist()
            figure_maps[name].extend(upsampled[:keep_for_figure].numpy())
        if keep_for_figure:
            report.figure_names.extend(batch.names[:keep_for_figure])
        seen += len(class_ids)
        bar.update(len(class_ids))
    bar.close()
    report.images = seen
    report.accuracy = correct / labelled if labelled else None
    if target == "label" and "predicted" in explained:
        # asked for labels, but some images have none: say what was explained instead
        report.target = (
            "predicted (the images have no labels)"
            if explained == {"predicted"}
            else "label, predicted for the images without one"
        )
    if figure_pixels:
        report.figure_pixels = np.stack(figure_pixels)
        report.figure_maps = {name: np.stack(maps) for name, maps in figure_maps.items()}
    return report


# ---------------------------------------------------------------------------------- two-object images


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
        pixels = _model_pixels(data.images, loaded)
        masks = [[_mask_to_input(mask, loaded) for mask in pair] for pair in data.masks]
        keep = max(0, min(count, figure_images - len(kept_pixels)))
        kept_pixels.extend(pixels[:keep])
        kept_labels.extend(data.labels[:keep])
        inputs = _to_inputs(pixels, loaded).to(device=device, dtype=dtype)
        object_masks = torch.from_numpy(np.array(masks))  # (b, 2, H, W)
        labels = torch.from_numpy(data.labels)  # (b, 2)
        with torch.no_grad():
            top2 = model(inputs).float().topk(2, dim=-1).indices.cpu()
        matches += int((top2.sort(dim=-1).values == labels.sort(dim=-1).values).all(dim=-1).sum())
        height, width = inputs.shape[-2:]
        for name, map_fn in map_functions.items():
            columns, maps = [], []
            for position in (0, 1):
                grid = normalize_maps(map_fn(inputs, labels[:, position].to(device)).float().cpu())
                upsampled = upsample_maps(grid, (height, width))
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
    return _tile_grid(titles, rows, tile)


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
        cells = [_cell(row[key]) for key in ("class_pointing", "both", "neither")] + comparison
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


# ------------------------------------------------------------------------------------------- output


def _cell(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return "–" if math.isnan(value) else f"{100 * value:.2f}"


def markdown_table(report: EvalReport) -> str:
    """Method x metric table, every value in percent."""
    header = "| Method | " + " | ".join(HEADERS[c] for c in COLUMNS) + " |"
    rule = "|---|" + "|".join("---:" for _ in COLUMNS) + "|"
    lines = [header, rule]
    for row in report.rows():
        lines.append(f"| {row['method']} | " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |")
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
        cells = " ".join(f"{_cell(row[c]):>{widths[c]}}" for c in COLUMNS)
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
    return _tile_grid(["input", *report.methods], rows, tile)


def _tile_grid(
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
