"""The load test's reference: the engine alone, in the load test's own process, on preprocessed
batches (no decoding, no encoding, no HTTP), computed as the server computes them: by default in as
many streams (threads, each with its share of torch's threads) as the server would use."""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any


class EngineOnly:
    """``ReciproCAM.explain`` alone, in this process, on preprocessed batches (decoding excluded)."""

    def __init__(self, args: argparse.Namespace, model_kwargs: dict[str, Any], images: list[bytes]) -> None:
        from app.engine.models import load_model
        from app.serving.images import decode_image
        from app.serving.registry import DEFAULT_TORCH_THREADS, compute_streams, stream_threads

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
        total = args.engine_threads or DEFAULT_TORCH_THREADS
        self.streams = compute_streams(args.engine_streams, self.loaded.device, total)
        self.threads = stream_threads(total, self.streams, self.loaded.device)
        self.rates: dict[str, list[float]] = {}
        self.cpu_ms: dict[str, list[float]] = {}

    @property
    def described(self) -> str:
        return f"batch {self.batch_size}, {self.streams} stream(s) of {self.threads} torch thread(s)"

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

        def compute(share: list[torch.Tensor]) -> None:
            for batch in share:
                self.loaded.engine.explain(batch, options, top_k=1)

        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            compute(batches[:1])  # warm-up at the measured batch size
            streams = [
                threading.Thread(target=compute, args=(batches[k :: self.streams],))
                for k in range(self.streams)
            ]
            started, cpu_started = time.perf_counter(), time.process_time()
            for stream in streams:
                stream.start()
            for stream in streams:
                stream.join()
            if self.loaded.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
        finally:
            torch.set_num_threads(threads)
        self.rates.setdefault(endpoint, []).append(total_images / seconds)
        self.cpu_ms.setdefault(endpoint, []).append(1000 * (time.process_time() - cpu_started) / total_images)
