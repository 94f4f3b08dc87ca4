"""The resident models: loading (in the background), status, one batcher and device thread each."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from app.config import ModelSettings, Settings
from app.engine.models import LoadedModel, ModelLoadError, WeightsSource, load_model
from app.engine.weights_location import check_hub_reachable, resolve_weights
from app.serving.batch import run_engine_batch
from app.serving.batcher import Batcher, BatchQueue
from app.serving.errors import ServiceError
from app.serving.metrics import ServiceMetrics
from app.serving.model_card import ServedModel
from app.serving.threads import COMPUTE_THREAD_NAME, name_this_thread

logger = logging.getLogger(__name__)

DEFAULT_TORCH_THREADS = torch.get_num_threads()  # torch's own choice, before this process changes it

ModelStatus = Literal["loading", "ready", "unavailable", "disabled"]


@dataclass
class ModelEntry:
    settings: ModelSettings
    status: ModelStatus = "loading"
    reason: str | None = None
    loaded: ServedModel | None = None
    batcher: BatchQueue | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.settings.name

    def describe(self, *, with_labels: bool = False) -> dict[str, Any]:
        info: dict[str, Any] = {
            "name": self.name,
            "status": self.status,
            "reason": self.reason,
            "arch": self.settings.arch,
            "weights": self.settings.weights,
            "device": self.settings.device,
            "dtype": self.settings.dtype,
        }
        if self.loaded is not None:
            described = self.loaded.describe()
            info.update(
                arch=described["arch"],
                weights=described["weights"],
                device=described["device"],
                dtype=described["dtype"],
                num_classes=described["num_classes"],
                input_size=described["input_size"][-2:],
                grid=described["grid"],
                num_prefix_tokens=described["num_prefix_tokens"],
                num_blocks=described["num_blocks"],
                path=described["path"],
                path_reason=described["path_reason"],
                target_block=self.settings.target_block,
                data_config=described["data_config"],
            )
            if with_labels:
                info["labels"] = list(self.loaded.labels)
        return info


class Models:
    """Every configured model and its status; where the models compute is the subclass's business."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.entries: dict[str, ModelEntry] = {}
        for model_settings in settings.models:
            entry = ModelEntry(model_settings)
            if not model_settings.enabled:
                entry.status, entry.reason = "disabled", "disabled in the configuration"
            self.entries[model_settings.name] = entry

    @property
    def settled(self) -> bool:
        """No model is still loading."""
        return all(entry.status != "loading" for entry in self.entries.values())

    @property
    def any_ready(self) -> bool:
        return any(entry.status == "ready" for entry in self.entries.values())

    def get(self, name: str) -> ModelEntry:
        entry = self.entries.get(name)
        if entry is None:
            known = ", ".join(sorted(self.entries)) or "none"
            raise ServiceError("model_not_found", f"no model named {name!r} (models: {known})")
        return entry

    def require_ready(self, name: str) -> tuple[ServedModel, BatchQueue]:
        entry = self.get(name)
        if entry.status == "loading":
            why = f": {entry.reason}" if entry.reason else ""
            raise ServiceError(
                "model_loading",
                f"model {name!r} is still loading{why}",
                retry_after_s=self.settings.batch.retry_after_s,
            )
        if entry.status != "ready" or entry.loaded is None or entry.batcher is None:
            raise ServiceError(
                "model_unavailable",
                f"model {name!r} is {entry.status}: {entry.reason or 'unknown reason'}",
            )
        return entry.loaded, entry.batcher

    def start_loading(self) -> asyncio.Task[None]:
        raise NotImplementedError

    async def close(self, timeout_s: float) -> None:
        raise NotImplementedError


class ModelRegistry(Models):
    """The models resident in this process, and the threads that compute them."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        super().__init__(settings)
        self.metrics = metrics
        for name in self.entries:
            metrics.model_ready.labels(name).set(0)
        self._device_threads: dict[str, ThreadPoolExecutor] = {}
        self._load_task: asyncio.Task[None] | None = None
        self.resident: dict[str, LoadedModel] = {}
        self.batchers: dict[str, Batcher] = {}

    # ---------------------------------------------------------------- loading
    def start_loading(self) -> asyncio.Task[None]:
        if not any(entry.settings.enabled for entry in self.entries.values()):
            logger.warning("no model is configured and enabled: readiness will stay 503 (unavailable)")
        self._load_task = asyncio.get_running_loop().create_task(self.load_all(), name="model-loading")
        return self._load_task

    async def load_all(self) -> None:
        """Load every enabled model, local files first (they are quick), then hub downloads."""
        pending = [entry for entry in self.entries.values() if entry.status == "loading"]
        pending.sort(key=lambda entry: _is_hub(entry.settings.weights))
        for entry in pending:
            await self._load_one(entry)

    async def _load_one(self, entry: ModelEntry) -> None:
        model_settings = entry.settings
        try:
            loaded = await asyncio.to_thread(self._load_blocking, model_settings)
        except asyncio.CancelledError:
            entry.status, entry.reason = "unavailable", "loading was interrupted by shutdown"
            raise
        except Exception as exc:
            entry.status = "unavailable"
            entry.reason = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
            logger.error("model %s is unavailable: %s", entry.name, entry.reason)
            return
        device_key = str(loaded.device)
        executor = self._device_threads.get(device_key)
        threads = self.settings.torch_threads or DEFAULT_TORCH_THREADS
        streams = compute_streams(self.settings.batch.compute_streams, loaded.device, threads)
        if executor is None:
            if loaded.device.type == "cpu" and streams > 1:
                # each batch runs its ops on as many threads of its own
                torch.set_num_threads(stream_threads(threads, streams, loaded.device))
            executor = ThreadPoolExecutor(
                max_workers=streams,
                thread_name_prefix=f"compute-{device_key}",
                initializer=name_this_thread,
                initargs=(COMPUTE_THREAD_NAME,),
            )
            self._device_threads[device_key] = executor
        engine, normalize, device = loaded.engine, loaded.preprocessor.normalize, loaded.device
        batcher = Batcher(
            entry.name,
            lambda items: run_engine_batch(engine, items, normalize, device),
            executor,
            self.settings.batch,
            self.metrics,
            streams=streams,
        )
        batcher.start()
        entry.loaded, entry.batcher = loaded, batcher
        self.resident[entry.name] = loaded
        self.batchers[entry.name] = batcher
        entry.status, entry.reason = "ready", None
        self.metrics.model_ready.labels(entry.name).set(1)
        logger.info(
            "model %s ready: %s on %s (%s), %s path",
            entry.name,
            loaded.arch,
            loaded.device,
            loaded.dtype,
            loaded.engine.path,
        )

    def _load_blocking(self, model_settings: ModelSettings) -> LoadedModel:
        weights = resolve_weights(model_settings.weights)
        if weights == "hub":
            # a misspelt or missing architecture is its own reason, not "the hub cannot be reached"
            import timm

            if not model_settings.arch:
                raise ModelLoadError(
                    "hub weights need an architecture (arch), such as deit_small_patch16_224"
                )
            if not timm.is_model(model_settings.arch):
                raise ModelLoadError(f"unknown timm architecture {model_settings.arch!r}")
            if self.settings.hub_probe_timeout_s > 0:
                check_hub_reachable(model_settings.arch, self.settings.hub_probe_timeout_s)
        loaded = load_model(
            model_settings.arch,
            weights,
            name=model_settings.name,
            device=model_settings.device,
            dtype=model_settings.dtype,
            labels=model_settings.labels,
            model_kwargs=model_settings.model_kwargs or None,
            path=model_settings.path,
            warmup=True,
            host_wait=self.settings.cuda_wait,
        )
        loaded.engine.resolve_block(model_settings.target_block)  # fails early on a bad block
        return loaded

    # ---------------------------------------------------------------- shutdown
    async def close(self, timeout_s: float) -> None:
        """Drain every batcher (bounded by ``timeout_s`` in total), then stop the device threads."""
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        for entry in self.entries.values():
            if entry.batcher is not None:
                await entry.batcher.close(max(0.0, deadline - loop.time()))
        for executor in self._device_threads.values():
            executor.shutdown(wait=False, cancel_futures=True)
        self._device_threads.clear()


def compute_streams(configured: int | None, device: torch.device, threads: int) -> int:
    """Batches computed at once on ``device``: ``configured``, or 2 on a CPU with ``threads`` torch
    threads of 2 or more (one stream's preempted thread then does not hold up the other's), 1 on an
    accelerator."""
    if configured is not None:
        return configured
    return 2 if device.type == "cpu" and threads >= 2 else 1


def stream_threads(threads: int, streams: int, device: torch.device) -> int:
    """The torch threads each stream computes on: on a CPU the process's ``threads`` shared out among
    the ``streams``; on an accelerator the host threads are not what computes, so all of them."""
    return max(1, threads // streams) if device.type == "cpu" else threads


def _is_hub(weights: str | None) -> bool:
    """Whether a model's weights come from the hub (loaded last); an invalid source is not, so that
    its model fails quickly with its own reason instead of stopping the others from loading."""
    try:
        return WeightsSource.parse(weights).kind == "hub"
    except ModelLoadError:
        return False
