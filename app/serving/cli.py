"""`python -m app serve`: run the HTTP service with uvicorn."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from types import FrameType

from app.config_errors import CONFIG_FILE_ENV

ENGINE_MODES = ("shared", "per-worker")
# uvicorn kills a worker that does not answer its ping in time (default 5 s): a worker importing
# torch on a busy machine holds the interpreter longer than that while it starts.
WORKER_HEALTHCHECK_S = 60


def add_commands(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("serve", help="run the HTTP inference-and-explanation service")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 in containers)")
    from app.cli import LOG_LEVELS, positive_int

    parser.add_argument("--port", type=_port, default=8000)
    parser.add_argument("--config", default=None, help="settings file (JSON or YAML)")
    parser.add_argument("--workers", type=positive_int, default=1, help="HTTP worker processes")
    parser.add_argument(
        "--engine",
        choices=ENGINE_MODES,
        default=None,
        help="shared: one engine process holds the models and batches for all HTTP workers (the "
        "default with several workers; with one, it moves the compute out of the HTTP process); "
        "per-worker: every worker loads its own models (the default with one worker: one process)",
    )
    parser.add_argument(
        "--log-level",
        dest="serve_log_level",
        default=None,
        type=str.lower,
        choices=LOG_LEVELS,
        help="default: the log_level setting",
    )
    parser.set_defaults(handler=run_serve)


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0 to 65535, not {value}")
    return value


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    if args.config:
        # Through the environment, so that every worker process reads the same file.
        os.environ[CONFIG_FILE_ENV] = os.path.abspath(args.config)
    from app.config import load_settings
    from app.serving.logs import logging_config

    settings = load_settings()  # a mistake stops here, with one message (exit status 2)
    level = (args.serve_log_level or settings.log_level).lower()
    engine = args.engine or ("shared" if args.workers > 1 else "per-worker")
    shared = engine == "shared"
    with (
        _sigterm_exits_zero(enabled=args.workers == 1),
        _shared_metrics(enabled=args.workers > 1 or shared),
        _shared_threads(0 if shared else args.workers, settings.torch_threads),
        _engine_process(enabled=shared, stop_timeout_s=settings.drain_timeout_s + 5.0),
    ):
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_config=logging_config(level, settings.log_format),
            log_level=level,
            timeout_graceful_shutdown=max(1, math.ceil(settings.drain_timeout_s)),
            access_log=False,
            proxy_headers=True,
            http=_http_protocol(),
            timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
        )
    return 0


def _http_protocol() -> str:
    """uvicorn's httptools protocol with the service's JSON shape for unparsable requests (named by
    import path, as the application is), or uvicorn's own choice without httptools."""
    if importlib.util.find_spec("httptools") is None:
        return "auto"
    return "app.api.http_protocol:JsonErrorsHttpToolsProtocol"


TORCH_THREADS_ENV = "RECIPROCAM_TORCH_THREADS"


def worker_threads(workers: int) -> int:
    """torch threads per worker when ``workers`` processes share the cores this process may run on
    (its CPU affinity; a container's CPU quota is not seen, as torch's own default does not)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, workers))


@contextlib.contextmanager
def _shared_threads(workers: int, torch_threads: int | None) -> Iterator[None]:
    """With several workers and no thread count chosen (``torch_threads``, ``OMP_NUM_THREADS`` or
    ``MKL_NUM_THREADS``), each worker would start as many torch threads as there are cores: the
    workers inherit ``RECIPROCAM_TORCH_THREADS`` = cores // workers instead, removed afterwards."""
    chosen = torch_threads is not None or any(
        name in os.environ for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    )
    if workers <= 1 or chosen:
        yield
        return
    os.environ[TORCH_THREADS_ENV] = str(worker_threads(workers))
    try:
        yield
    finally:
        os.environ.pop(TORCH_THREADS_ENV, None)


@contextlib.contextmanager
def _engine_process(*, enabled: bool, stop_timeout_s: float) -> Iterator[None]:
    """The shared engine process, supervised, for the workers that inherit its socket's address;
    stopped after the workers (they drain first)."""
    if not enabled:
        yield
        return
    from app.serving.supervisor import ENGINE_SOCKET_ENV, EngineSupervisor

    supervisor = EngineSupervisor(stop_timeout_s=stop_timeout_s)
    supervisor.start()
    # The workers decode and render with one torch thread each; the engine keeps the cores.
    saved = {name: os.environ.get(name) for name in (ENGINE_SOCKET_ENV, TORCH_THREADS_ENV)}
    os.environ.update({ENGINE_SOCKET_ENV: supervisor.address, TORCH_THREADS_ENV: "1"})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        supervisor.stop()


@contextlib.contextmanager
def _shared_metrics(*, enabled: bool) -> Iterator[None]:
    """With several processes, a fresh PROMETHEUS_MULTIPROC_DIR (unless one is given) that they
    inherit, so /metrics sums over all of them; removed when the server stops."""
    from app.config_errors import MULTIPROC_DIR_ENV

    # prometheus_client is not imported yet (with one worker, this process is the worker)
    if not enabled or os.environ.get(MULTIPROC_DIR_ENV):
        yield
        return
    directory = tempfile.mkdtemp(prefix="reciprocam-metrics-")
    os.environ[MULTIPROC_DIR_ENV] = directory
    try:
        yield
    finally:
        os.environ.pop(MULTIPROC_DIR_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)


def _exit_zero(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


@contextlib.contextmanager
def _sigterm_exits_zero(*, enabled: bool) -> Iterator[None]:
    """SIGTERM ends the process with status 0.

    uvicorn takes SIGTERM over while it serves, drains, and then raises the signal again with the
    handler it found at start: the default one would kill the process (status -15) after a clean
    drain. With this handler in place, a drained shutdown (or a SIGTERM before uvicorn started)
    exits 0, as process supervisors expect of a graceful stop.
    """
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_zero)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
