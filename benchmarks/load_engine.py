"""The load test's reference: the engine alone, in the load test's own process, on preprocessed
batches (no decoding, no encoding, no HTTP)."""

from __future__ import annotations

import argparse
import time
from typing import Any


class EngineOnly:
    """``ReciproCAM.explain`` alone, in this process, on preprocessed batches (decoding excluded)."""

    def __init__(self, args: argparse.Namespace, model_kwargs: dict[str, Any], images: list[bytes]) -> None:
        from app.engine.models import load_model
        from app.serving.images import decode_image

        self.loaded = load_model(
            args.arch,
            args.weights,
            device=args.device,
            dtype=args.dtype,
            model_kwargs=model_kwargs or None,
            warmup=True,
        )
        self.tensors = [self.loaded.preprocessor(decode_image(data))[0] for data in images]
        self.batch_size = args.max_batch
        self.threads: int | None = args.engine_threads  # None: torch's default
        self.rates: dict[str, list[float]] = {}
        self.cpu_ms: dict[str, list[float]] = {}

    def measure(self, endpoint: str, total_images: int) -> None:
        """One measurement: images/s and this process's CPU ms per image (all its threads)."""
        import torch

        from app.engine.options import CamOptions

        total_images = max(total_images, 3 * self.batch_size)
        batches = []
        for start in range(0, total_images, self.batch_size):
            count = min(self.batch_size, total_images - start)
            batches.append(torch.stack([self.tensors[(start + k) % len(self.tensors)] for k in range(count)]))
        options = CamOptions() if endpoint == "explain" else None
        threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            self.loaded.engine.explain(batches[0], options, top_k=1)  # warm-up at the measured batch size
            started, cpu_started = time.perf_counter(), time.process_time()
            for batch in batches:
                self.loaded.engine.explain(batch, options, top_k=1)
            if self.loaded.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
        finally:
            torch.set_num_threads(threads)
        self.rates.setdefault(endpoint, []).append(total_images / seconds)
        self.cpu_ms.setdefault(endpoint, []).append(1000 * (time.process_time() - cpu_started) / total_images)
