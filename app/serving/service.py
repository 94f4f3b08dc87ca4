"""One running service instance: settings, metrics, models, the I/O pool, and its lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any, TypeVar

import torch

from app.config import DEFAULT_INLINE_IO_PIXELS, Settings
from app.engine.preprocess import Preprocessor
from app.serving.device_decode import ImageHeader
from app.serving.errors import ServiceError
from app.serving.images import ImageDecodeError
from app.serving.metrics import ServiceMetrics
from app.serving.prepare import PreparedImage, prepare_image, prepare_on_device
from app.serving.registry import ModelRegistry, Models
from app.serving.remote import RemoteModels
from app.serving.supervisor import ENGINE_SOCKET_ENV
from app.serving.threads import IO_THREAD_NAME, name_this_thread

logger = logging.getLogger(__name__)
T = TypeVar("T")


async def gather_all(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Await every one, then raise the first failure (a cancellation included) if there is one.

    Unlike ``asyncio.gather`` without ``return_exceptions``, nothing is left running when this
    raises: steps of :meth:`Service.run_io` that hold a request's memory have all returned.
    """
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [result for result in results if not isinstance(result, BaseException)]


def _indexed(
    index: int, step: Callable[..., PreparedImage], data: bytes, header: ImageHeader | None
) -> PreparedImage:
    """``step(data, header=header)``, its ``ImageDecodeError`` marked with the image's ``index``."""
    try:
        return step(data, header=header)
    except ImageDecodeError as exc:
        exc.index = index
        raise


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.registry = self._new_registry()
        self.io_pool = self._new_io_pool()
        self.draining = False
        self._stopped = False
        self._drain_started = time.monotonic()
        self.allowed_formats = frozenset(fmt.upper() for fmt in settings.limits.allowed_formats)
        self._previous_sigterm: Any = None
        self.original_pixels_held = 0  # pixels of originals kept for overlays, over requests in flight

    def _new_registry(self) -> Models:
        """The models in this process, or, in an HTTP worker of a shared-engine server, the engine
        process's (``serve --workers N``)."""
        address = os.environ.get(ENGINE_SOCKET_ENV)
        if address:
            return RemoteModels(self.settings, address)
        return ModelRegistry(self.settings, self.metrics)

    def _new_io_pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(
            max_workers=self.settings.io_workers,
            thread_name_prefix="io",
            initializer=name_this_thread,
            initargs=(IO_THREAD_NAME,),
        )

    @contextlib.contextmanager
    def hold_original_pixels(self, pixels: int, model: str) -> Iterator[None]:
        """Reserve ``pixels`` of decoded originals (kept for overlays on the posted image) for the
        duration of a request, or refuse it with 503 ``overloaded`` (Retry-After) when that would
        exceed ``limits.max_original_pixels_in_flight``. A request is always taken when no other
        holds any, so that one larger than the budget can still be served alone. Runs on the event
        loop only, so no lock is needed."""
        if pixels <= 0:
            yield
            return
        limit = self.settings.limits.max_original_pixels_in_flight
        if self.original_pixels_held > 0 and self.original_pixels_held + pixels > limit:
            self.metrics.rejections.labels(model, "originals_in_flight").inc()
            retry_after = self.settings.batch.retry_after_s
            raise ServiceError(
                "overloaded",
                f"too many posted images are held for overlays on the original right now ({pixels} more "
                f"pixels would exceed {limit}); retry after {retry_after} s",
                retry_after_s=retry_after,
            )
        self.original_pixels_held += pixels
        try:
            yield
        finally:
            self.original_pixels_held -= pixels

    def inline_io(self, device: torch.device, pixels: int) -> bool:
        """Whether the I/O steps of a request for a model on ``device``, with ``pixels`` image and
        map pixels in all, run on the event loop's thread (``inline_io_max_pixels``)."""
        limit = self.settings.inline_io_max_pixels
        if limit is None:
            limit = DEFAULT_INLINE_IO_PIXELS if device.type == "cpu" else 0
        return limit > 0 and pixels <= limit

    async def run_io(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking decode/encode step in the I/O pool.

        When the caller is cancelled (in practice: uvicorn's graceful-shutdown timeout; a client
        that goes away is noticed by the batcher, not by cancellation), a step that has not started
        yet is dropped; one already running cannot be stopped, so the cancellation waits for it to
        return. Until then its memory is in use, and budgets held by the caller (such as
        :meth:`hold_original_pixels`) are released only after it. A second cancellation ends the
        wait.
        """
        job = self.io_pool.submit(functools.partial(function, *args, **kwargs))
        done = asyncio.wrap_future(job)
        # Once the caller is gone nobody reads the step's outcome: read it here, so that an error
        # of an abandoned step is not logged as "Future exception was never retrieved".
        done.add_done_callback(lambda future: future.cancelled() or future.exception())
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            if not job.cancel():  # running (or just finished): wait for the thread to let go
                await asyncio.wait([done])
            raise

    async def prepare_images(
        self,
        blobs: Sequence[bytes],
        preprocessor: Preprocessor,
        *,
        keep_original: bool = False,
        device: torch.device | None = None,
        inline: bool = False,
        headers: Sequence[ImageHeader | None] | None = None,
    ) -> list[PreparedImage]:
        """Decode and preprocess posted images in the I/O pool: with Pillow, each image its own job
        (or, with ``inline``, one after the other on the event loop's thread), or with ``device`` as
        tensor code on that device, the request's images in one batch. ``headers``: the images'
        headers as already read (see :func:`app.serving.prepare.read_headers`), used by Pillow's path.

        Raises the first failure; an ``ImageDecodeError`` carries the failing image's ``index``.
        """
        limits = self.settings.limits
        if device is not None:
            return await self.run_io(
                prepare_on_device,
                list(blobs),
                preprocessor,
                device,
                max_pixels=limits.max_pixels,
                allowed_formats=self.allowed_formats,
                keep_original=keep_original,
            )

        step = functools.partial(
            prepare_image,
            preprocessor=preprocessor,
            max_pixels=limits.max_pixels,
            allowed_formats=self.allowed_formats,
            keep_original=keep_original,
            reduced_jpeg_decode=self.settings.reduced_jpeg_decode,
            two_step_resize=self.settings.two_step_resize,
            window_resize=self.settings.window_resize,
            tensor_resize=self.settings.tensor_resize,
        )
        pairs = list(zip(blobs, headers or [None] * len(blobs), strict=True))
        if inline:
            # Behind what is already waiting on the loop (the batcher handing a batch to a compute
            # thread that just freed, among others), not ahead of it.
            await asyncio.sleep(0)
            return [_indexed(index, step, data, header) for index, (data, header) in enumerate(pairs)]
        return await gather_all(
            self.run_io(_indexed, index, step, data, header) for index, (data, header) in enumerate(pairs)
        )

    @property
    def ready(self) -> bool:
        return not self.draining and self.registry.settled and self.registry.any_ready

    def readiness(self, *, reasons: bool = True) -> dict[str, Any]:
        """The readiness answer: overall status and each model's; ``reasons`` adds why a model is
        unavailable (server paths, error texts: only for callers who may read /v1/models too)."""
        if self.draining:
            status = "draining"
        elif not self.registry.settled:
            status = "loading"
        elif not self.registry.any_ready:
            status = "unavailable"
        else:
            status = "ready"
        return {
            "status": status,
            "models": [
                {"name": entry.name, "status": entry.status, **({"reason": entry.reason} if reasons else {})}
                for entry in self.registry.entries.values()
            ],
        }

    async def start(self) -> None:
        if self._stopped:
            # A second lifespan of the same app (test clients do this): the models, the device threads
            # and the I/O pool went with stop(), so start over with fresh ones. Metrics carry on.
            self.registry = self._new_registry()
            self.io_pool = self._new_io_pool()
            self.draining = False
            self._stopped = False
        if self.settings.torch_threads is not None:
            torch.set_num_threads(self.settings.torch_threads)
        self.registry.start_loading()
        self._watch_sigterm()

    def begin_drain(self) -> None:
        if not self.draining:
            logger.info("draining: readiness now fails; in-flight and queued work continues")
            self._drain_started = time.monotonic()
        self.draining = True

    async def stop(self) -> None:
        self._stopped = True  # even if closing fails below, a later start() begins afresh
        self.begin_drain()
        # One deadline for the whole drain: the server's graceful shutdown already used part of it
        # since SIGTERM, so the queues get what is left (a batch already computing still ends first).
        elapsed = time.monotonic() - self._drain_started
        await self.registry.close(max(0.0, self.settings.drain_timeout_s - elapsed))
        self.io_pool.shutdown(wait=False, cancel_futures=True)
        self._restore_sigterm()
        logger.info("service stopped")

    # The server (uvicorn) owns SIGTERM and stops accepting connections when it comes; this hook only
    # turns readiness off at that moment, then hands the signal on.
    def _watch_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):  # default or ignored: nobody to hand over to, leave it alone
            return

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            self.begin_drain()
            previous(signum, frame)

        self._previous_sigterm = previous
        signal.signal(signal.SIGTERM, on_sigterm)

    def _restore_sigterm(self) -> None:
        if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
