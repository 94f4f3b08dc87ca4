"""Prometheus metrics of one service instance (its own registry, so several apps can coexist).

With several worker processes (``serve --workers N``), ``PROMETHEUS_MULTIPROC_DIR`` names a
directory where every process keeps its values (prometheus_client's multiprocess mode, chosen when
the library is imported); ``/metrics`` then reports the sum over all workers, whichever worker
answers the scrape.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from app.config_errors import MULTIPROC_DIR_ENV

__all__ = ["MULTIPROC_DIR_ENV", "ServiceMetrics", "multiprocess_dir", "timed"]

T = TypeVar("T")


def timed(function: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """``function``'s result and the CPU seconds the calling thread spent in it."""
    started = time.thread_time()
    result = function(*args, **kwargs)
    return result, time.thread_time() - started


def multiprocess_dir() -> str | None:
    """The shared metrics directory of a multi-worker server, or None."""
    return os.environ.get(MULTIPROC_DIR_ENV) or None


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# A request's stages, in order (see docs/service.md, "Where the time goes").
STAGES = ("parse", "decode", "preprocess", "queue", "compute", "render", "encode")


class ServiceMetrics:
    """Every metric the service exports; names start with ``reciprocam_``."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "reciprocam_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "reciprocam_http_request_duration_seconds",
            "HTTP request latency by route",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "reciprocam_queue_wait_seconds",
            "time from enqueue to the start of the batch compute",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_time = Histogram(
            "reciprocam_batch_compute_seconds",
            "model compute time per batch",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "reciprocam_batch_size_images",
            "images per computed batch",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_sources = Histogram(
            "reciprocam_batch_workers",
            "HTTP worker processes whose requests one computed batch holds (shared-engine servers)",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.engine_starts = Counter(
            "reciprocam_engine_starts",
            "starts of the shared engine process (restarts after the first)",
            registry=r,
        )
        self.queue_depth = Gauge(
            "reciprocam_queue_depth_images",
            "images waiting in the queue",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",  # all workers' queues together
        )
        self.rejections = Counter(
            "reciprocam_rejections", "requests refused or dropped, by reason", ["model", "reason"], registry=r
        )
        self.overloaded = Counter(
            "reciprocam_overloaded",
            "requests refused because limits.max_concurrent_requests were in progress",
            registry=r,
        )
        self.batch_retries = Counter(
            "reciprocam_batch_splits", "failed batches split in halves and retried", ["model"], registry=r
        )
        self.item_failures = Counter(
            "reciprocam_image_failures", "images that failed even when computed alone", ["model"], registry=r
        )
        self.out_of_memory = Counter(
            "reciprocam_out_of_memory",
            "engine calls that ran out of memory (the batch is then split and retried)",
            ["model"],
            registry=r,
        )
        self.images = Counter(
            "reciprocam_images",
            "images computed, by kind (predict or explain)",
            ["model", "kind"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "reciprocam_stage_seconds",
            "time per image in each stage of a request: CPU time of the thread doing the work for "
            "parse, decode, preprocess, render and encode; waiting time for queue; the batch's compute "
            "time divided by its images for compute",
            ["model", "stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.model_ready = Gauge(
            "reciprocam_model_ready",
            "1 when the model is loaded and serving",
            ["model"],
            registry=r,
            multiprocess_mode="livemin",  # 1 only when every live worker serves it
        )

    def observe_stage(self, model: str, stage: str, seconds: float, images: int = 1) -> None:
        """Record ``seconds`` spent on ``images`` images in ``stage``, as one observation per image."""
        if images < 1:
            return
        child = self.stage_seconds.labels(model, stage)
        for _ in range(images):
            child.observe(seconds / images)

    def render(self) -> bytes:
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry)
        _forget_dead_workers(directory)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=directory)
        return generate_latest(merged)

    @staticmethod
    def process_exited() -> None:
        """Drop this process's live gauges from the shared directory (multi-worker servers)."""
        directory = multiprocess_dir()
        if directory is not None:
            multiprocess.mark_process_dead(os.getpid(), path=directory)


_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db")


def _forget_dead_workers(directory: str) -> None:
    """Drop the live gauges of worker processes that are gone without a clean shutdown (killed,
    crashed, replaced by the server's supervisor); counters and histograms keep their values."""
    matches = (_LIVE_GAUGE_FILE.fullmatch(name) for name in os.listdir(directory))
    for pid in {int(match.group(1)) for match in matches if match}:
        if not _process_exists(pid):
            with contextlib.suppress(OSError):
                multiprocess.mark_process_dead(pid, path=directory)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return True
