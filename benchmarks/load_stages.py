"""Per-stage figures from the server's ``/metrics``: a histogram family of stage times (one label
names the stage) scraped before and after a level; the difference of its sums, divided by the
images served in between, is the milliseconds each image spent in each stage."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

STAGE_LABEL = "stage"
IMAGES_COUNTER = "reciprocam_images_total"  # images computed, every model and kind


@dataclass
class StageSnapshot:
    """A histogram family's sums and counts by stage (other labels summed), and the images counter."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    images: float | None = None


@dataclass
class StageFigures:
    """One level's stages: milliseconds and observations per image, in the server's order."""

    ms_per_image: dict[str, float]
    observations_per_image: dict[str, float]
    images: float


def parse_stages(text: str, metric: str) -> StageSnapshot | None:
    """The stage sums and counts of histogram ``metric`` in a Prometheus text exposition, or None
    when the text has no such samples."""
    snapshot = StageSnapshot()
    found = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == IMAGES_COUNTER:
                snapshot.images = (snapshot.images or 0.0) + sample.value
                continue
            if sample.name not in (f"{metric}_sum", f"{metric}_count"):
                continue
            stage = sample.labels.get(STAGE_LABEL)
            if stage is None:
                continue
            found = True
            target = snapshot.sums if sample.name.endswith("_sum") else snapshot.counts
            target[stage] = target.get(stage, 0.0) + sample.value
    return snapshot if found else None


def scrape_stages(url: str, metric: str, api_key: str | None = None) -> StageSnapshot | None:
    """``parse_stages`` of a server's ``/metrics``; None when it cannot be read or lacks ``metric``."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{url}/metrics", headers=headers, timeout=30)
    except httpx.TransportError:
        return None
    if response.status_code != 200:
        return None
    return parse_stages(response.text, metric)


def stage_figures(
    before: StageSnapshot | None, after: StageSnapshot | None, served_images: int
) -> StageFigures | None:
    """Per-image stage milliseconds between two snapshots. The images come from the server's counter
    when both snapshots have it (the scrape sees every client), else from ``served_images``."""
    if after is None:
        return None
    before = before or StageSnapshot()
    images: float = served_images
    if before.images is not None and after.images is not None and after.images > before.images:
        images = after.images - before.images
    if images <= 0:
        return None
    ms, observations = {}, {}
    for stage, total in after.sums.items():
        ms[stage] = 1000 * (total - before.sums.get(stage, 0.0)) / images
        observations[stage] = (after.counts.get(stage, 0.0) - before.counts.get(stage, 0.0)) / images
    return StageFigures(ms, observations, images)


def stage_table(rows: list[tuple[str, StageFigures]]) -> str:
    """A markdown table, one row per labelled level, one column per stage (ms per image), with the
    total of the stages; empty without rows."""
    if not rows:
        return ""
    stages: list[str] = []
    for _, figures in rows:
        stages += [stage for stage in figures.ms_per_image if stage not in stages]
    lines = [
        "| level | images | " + " | ".join(stages) + " | sum of stages |",
        "|---|---:|" + "---:|" * (len(stages) + 1),
    ]
    for label, figures in rows:
        cells = [
            f"{figures.ms_per_image[stage]:.2f} ({figures.observations_per_image[stage]:.2g}/img)"
            if stage in figures.ms_per_image
            else "–"
            for stage in stages
        ]
        total = sum(figures.ms_per_image.values())
        lines.append(f"| {label} | {figures.images:.0f} | " + " | ".join(cells) + f" | {total:.2f} |")
    return "\n".join(lines)
