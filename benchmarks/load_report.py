"""The load test's markdown report: a table per kind of level, per-stage figures, and the ratios."""

from __future__ import annotations

import argparse
import os
import statistics
from typing import TYPE_CHECKING, Any

from benchmarks.load_stages import StageFigures, stage_table

if TYPE_CHECKING:
    from benchmarks.load_test import LevelResult


def _ms(value: float) -> str:
    return "–" if value != value else f"{value:.1f}"


def _rounds(values: list[float]) -> str:
    return " ".join(f"{value:.1f}" for value in values)


def closed_table(results: list[LevelResult]) -> str:
    lines = [
        "| configuration | endpoint | concurrency | client processes | requests | errors | req/s | images/s "
        "| p50 ms | p90 ms | p95 ms | p99 ms | mean batch | server CPU ms/image | client CPU ms/request "
        "| client CPU, busiest process |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.config} | {r.endpoint} | {r.level:.0f} | {r.processes} | {r.requests} | {r.errors} "
            f"| {r.requests_per_s:.2f} | {r.images_per_s:.2f} | {r.percentile(50):.0f} | {r.percentile(90):.0f} "
            f"| {r.percentile(95):.0f} | {r.percentile(99):.0f} | {r.mean_batch:.1f} "
            f"| {_ms(r.server_cpu_ms_per_image)} | {_ms(r.client_cpu_ms_per_request)} "
            f"| {100 * r.client_core_share:.0f}% of a core |"
        )
    return "\n".join(lines)


def open_table(results: list[LevelResult], arrivals: str) -> str:
    lines = [
        "| configuration | endpoint | offered req/s | arrivals | client processes | sent | errors | sent/s "
        "| answered req/s | images/s | p50 ms | p90 ms | p99 ms | send lag p99 ms | peak in flight "
        "| mean batch | server CPU ms/image | client CPU ms/request | client CPU, busiest process |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.config} | {r.endpoint} | {r.level:g} | {arrivals} | {r.processes} | {r.requests} | {r.errors} "
            f"| {r.sent_per_s:.2f} | {r.requests_per_s:.2f} | {r.images_per_s:.2f} | {r.percentile(50):.0f} "
            f"| {r.percentile(90):.0f} | {r.percentile(99):.0f} | {r.send_lag_percentile(99):.1f} "
            f"| {r.max_in_flight} | {r.mean_batch:.1f} | {_ms(r.server_cpu_ms_per_image)} "
            f"| {_ms(r.client_cpu_ms_per_request)} | {100 * r.client_core_share:.0f}% of a core |"
        )
    return "\n".join(lines)


def combined_stages(figures: list[StageFigures]) -> StageFigures | None:
    """Several rounds' stage figures as one, each round weighted by its images."""
    images = sum(f.images for f in figures)
    if not figures or images <= 0:
        return None
    stages: list[str] = []
    for f in figures:
        stages += [stage for stage in f.ms_per_image if stage not in stages]
    ms = {s: sum(f.ms_per_image.get(s, 0.0) * f.images for f in figures) / images for s in stages}
    seen = {s: sum(f.observations_per_image.get(s, 0.0) * f.images for f in figures) / images for s in stages}
    return StageFigures(ms, seen, images)


def label(result: LevelResult) -> str:
    load = f"concurrency {result.level:.0f}" if result.mode == "closed" else f"{result.level:g} req/s"
    return f"{result.config}, {result.endpoint}, {load}"


def report_tables(results: list[LevelResult], arrivals: str) -> list[str]:
    """The report's tables: closed-loop levels, open-loop levels, stages (each only when present),
    followed by the errors by kind and the warnings."""
    lines: list[str] = []
    closed = [r for r in results if r.mode == "closed"]
    opened = [r for r in results if r.mode == "open"]
    if closed:
        lines += ["Closed loop (a fixed number of requests in flight):", "", closed_table(closed), ""]
    if opened:
        lines += [
            "Open loop (a fixed rate of requests, whatever the answers):",
            "",
            open_table(opened, arrivals),
            "",
        ]
    stage_rows = []
    for r in results:
        figures = combined_stages(r.stages)
        if figures is not None and figures.ms_per_image:
            stage_rows.append((label(r), figures))
    if stage_rows:
        lines += [
            "Server stages, ms per image (sum of the stage histogram over the images served; in brackets "
            "its observations per image):",
            "",
            stage_table(stage_rows),
            "",
        ]
    for r in results:
        for kind, count in r.error_kinds.items():
            lines.append(f"- errors, {label(r)}: {count} x `{kind}`")
        if r.workers_lost:
            lines.append(
                f"- {label(r)}: {r.workers_lost} server worker process(es) ended during the level "
                "(killed or crashed; their connections were lost)"
            )
        lines += [f"- **{note}** ({label(r)})" for note in r.warnings()]
    return lines


def ratio_lines(results: list[LevelResult], engine: Any, args: argparse.Namespace) -> list[str]:
    """Batching on / off, variant / on, HTTP / engine only (medians over rounds), CPU per image, and
    the clients' share of the machine's CPU, at the top closed-loop level of each endpoint (else the
    last open-loop one)."""
    lines = []
    for endpoint in args.endpoint:
        mine = [r for r in results if r.endpoint == endpoint]
        if not mine:
            continue
        last = ([r for r in mine if r.mode == "closed"] or mine)[-1]
        at = {r.config: r for r in mine if (r.mode, r.level) == (last.mode, last.level)}
        where = label(last).split(", ", 1)[1]
        on, off, variant = at.get("batching on"), at.get("batching off"), at.get("variant")
        if on and off and off.median_images_per_s > 0:
            lines.append(
                f"- {where}: batching on / off = {on.median_images_per_s:.2f} / {off.median_images_per_s:.2f} "
                f"images/s (medians of rounds) = **{on.median_images_per_s / off.median_images_per_s:.2f}x**"
            )
        if on and variant and on.median_images_per_s > 0:
            lines.append(
                f"- {where}: variant ({_variant_name(args)}) / batching on = {variant.median_images_per_s:.2f} / "
                f"{on.median_images_per_s:.2f} images/s = **{variant.median_images_per_s / on.median_images_per_s:.2f}x**; "
                f"server CPU per image {_ms(variant.server_cpu_ms_per_image)} / {_ms(on.server_cpu_ms_per_image)} ms"
            )
        best = on or at.get("given server")
        if best and engine is not None and engine.rates.get(endpoint):
            rate = statistics.median(engine.rates[endpoint])
            cpu_ms = statistics.median(engine.cpu_ms[endpoint])
            lines.append(
                f"- {where}: HTTP / engine only ({engine.described}) = {best.median_images_per_s:.2f} / "
                f"{rate:.2f} images/s (medians of {len(best.round_images_per_s)} and "
                f"{len(engine.rates[endpoint])} rounds) = **{best.median_images_per_s / rate:.2f}x**; by round, "
                f"HTTP {_rounds(best.round_images_per_s)}, engine only {_rounds(engine.rates[endpoint])}, "
                f"engine CPU ms/image {_rounds(engine.cpu_ms[endpoint])}"
            )
            served_ms = best.server_cpu_ms_per_image
            if served_ms == served_ms:  # measured (not NaN)
                lines.append(
                    f"- {where}: CPU per image, server / engine only = {served_ms:.1f} / {cpu_ms:.1f} ms: "
                    f"{served_ms - cpu_ms:.1f} ms per image outside the model"
                )
        for r in (best, variant):
            if r is not None and r.compute_cpu_ms_per_image == r.compute_cpu_ms_per_image:  # measured
                lines.append(
                    f"- {where}, {r.config}: server CPU per image {r.server_cpu_ms_per_image:.1f} ms, of which "
                    f"its compute threads {r.compute_cpu_ms_per_image:.1f} ms (the model) and "
                    f"**{r.server_cpu_ms_per_image - r.compute_cpu_ms_per_image:.1f} ms** the rest (HTTP, "
                    "decoding, rendering: outside the model, in the same run)"
                )
        if best and best.seconds > 0:
            cores = os.cpu_count() or 1
            share = best.client_cpu_s / (best.seconds * cores)
            lines.append(
                f"- {where}: the load generator used {best.client_cpu_s:.2f} CPU s "
                f"({_ms(best.client_cpu_ms_per_request)} ms per request, {100 * share:.0f}% of the machine's "
                f"{cores} cores; busiest client process {100 * best.client_core_share:.0f}% of a core), the "
                f"server {_ms(best.server_cpu_ms_per_image)} ms per image"
            )
    return lines


def print_level(result: LevelResult) -> None:
    load = f"c={result.level:.0f}" if result.mode == "closed" else f"{result.level:g}/s"
    print(
        f"{result.config:>13} {result.endpoint:>7} {load:>8} x{result.processes} "
        f"{result.images_per_s:7.2f} images/s (median {result.median_images_per_s:.2f}) "
        f"p50 {result.percentile(50):6.0f} p99 {result.percentile(99):6.0f} ms batch {result.mean_batch:5.1f} "
        f"server {result.server_cpu_ms_per_image:5.1f} ms/img (compute {result.compute_cpu_ms_per_image:4.1f}) "
        f"client {result.client_cpu_ms_per_request:4.1f} "
        f"ms/req ({100 * result.client_core_share:.0f}% core) errors {result.errors}",
        flush=True,
    )
    for kind, count in result.error_kinds.items():
        print(f"{'':>13} error x{count}: {kind}", flush=True)
    if result.workers_lost:
        print(f"{'':>13} {result.workers_lost} server worker process(es) ended", flush=True)
    for note in result.warnings():
        print(f"!!!!! {note}", flush=True)


def _variant_name(args: argparse.Namespace) -> str:
    """The variant's settings and serve options, as given."""
    parts = [args.variant or "", getattr(args, "variant_serve", "") or ""]
    return " ".join(part for part in parts if part)
