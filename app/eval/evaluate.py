"""The evaluation behind ``python -m app eval``: the per-method loop and its scores.

For every batch and method: the class ``c`` is the ground-truth label (or the prediction, by option
or when no labels exist); the method's map for ``c`` is min-max normalised on the patch grid and fed
to the metrics of :mod:`app.eval.metrics` (ADCC and its parts, insertion and deletion AUC, and the
pointing game where object masks exist; also over only the images the model classifies
correctly, where labels exist, since a map of the true class on a misclassified image explains a
class the model did not see). The batches come from :mod:`app.eval.batches`, the tables and the
figure from :mod:`app.eval.report`; :mod:`app.eval.pairs` runs the pointing game on two-object
images instead, for the map of each object's class.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from app.engine.models import LoadedModel
from app.eval import metrics
from app.eval.baselines import make_method
from app.eval.batches import Batch
from app.serving.maps import shape_maps


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
        logits: torch.Tensor = model(images.to(device=device, dtype=dtype))
        return logits.float().cpu()

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
            raw = map_fn(inputs, class_ids.to(device)).float().cpu()
            grid = shape_maps(raw, "grid", input_size=(height, width))
            upsampled = shape_maps(raw, "input", input_size=(height, width))
            masked = metrics.mask_input(inputs.float().cpu(), upsampled)
            masked_confidence = model_fn(masked).softmax(-1).gather(1, class_ids[:, None])[:, 0]
            masked_raw = map_fn(masked.to(device=device, dtype=dtype), class_ids.to(device)).float().cpu()
            masked_grid = shape_maps(masked_raw, "grid", input_size=(height, width))
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
