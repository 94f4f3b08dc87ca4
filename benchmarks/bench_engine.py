"""Engine benchmark: explanation throughput against the plain forward pass, in one run.

For every model and dtype, on the same batch of random images and the same randomly initialised
timm model, measures images/s of

(a) the plain forward pass (``model(images)``),
(b) the reduced explanation (``ReciproCAM(model).explain(images, CamOptions(), top_k=1)``, which
    includes the prediction), and
(c) the reference explanation (the same call with ``path="reference"``),

and the peak memory of (b) against (a). Prints a markdown table with the ratios b/a and b/c.
(a) and (b) are timed in alternating rounds; images/s are medians over rounds and b/a is the
median of the per-round ratios (each pair runs back to back, under the same machine load).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (weights included; the activation part,
peak minus what was allocated before the call, is shown too). On CPU the process's peak resident
set (``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident set before the call,
with glibc's allocator told to return large blocks to the system; without that support: n/a.

    python benchmarks/bench_engine.py                       # CPU: deit tiny/small/base, fp32, batch 8
    python benchmarks/bench_engine.py --device cuda         # GPU: batch 64, fp32/fp16/bf16
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine.options import CamOptions
from app.engine.reciprocam import ReciproCAM

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU_MODELS = "deit_tiny_patch16_224,deit_small_patch16_224,deit_base_patch16_224"


@dataclass
class Row:
    """One benchmark result line."""

    model: str
    dtype: str
    batch: int
    forward_ips: float
    reduced_ips: float
    reference_ips: float | None
    ratio_ba: float  # median over rounds of forward time / explanation time
    forward_peak: float | None  # MiB
    reduced_peak: float | None
    forward_act: float | None  # MiB above what was allocated before the call
    reduced_act: float | None
    path: str


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_interleaved(
    fns: list[Callable[[], object]], device: torch.device, iters: int, warmup: int
) -> list[list[float]]:
    """Seconds of every call of each of ``fns``, calls interleaved round by round.

    Interleaving exposes every function to the same machine load (other processes on a shared
    CPU); medians over rounds discard rounds disturbed by them.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(max(1, iters)):
        for index, fn in enumerate(fns):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[index].append(time.perf_counter() - start)
    return times


def _configure_glibc() -> bool:
    """Make glibc return freed large blocks to the system, so peak RSS tracks live memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 64 * 1024)) and bool(libc.mallopt(m_trim_threshold, 0))
    except OSError:
        return False


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _peak(fn: Callable[[], object], device: torch.device, cpu_ok: bool) -> tuple[float | None, float | None]:
    """(peak MiB including resident weights or None, peak MiB above the start) of one call."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak / 2**20, (peak - before) / 2**20
    if not cpu_ok:
        return None, None
    try:
        before = _rss_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        fn()
        peak = _rss_kib("VmHWM")
    except (OSError, KeyError):
        return None, None
    return None, (peak - before) / 1024


def bench_model(
    name: str,
    dtype_name: str,
    batch: int,
    device: torch.device,
    iters: int,
    warmup: int,
    reference_iters: int,
    cpu_memory: bool,
) -> Row:
    """Measure (a), (b), (c) for one model and dtype."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval().to(device=device, dtype=DTYPES[dtype_name])
    size = model.patch_embed.img_size
    images = torch.randn(batch, 3, size[0], size[1], generator=torch.Generator().manual_seed(0))
    images = images.to(device=device, dtype=DTYPES[dtype_name])
    reduced = ReciproCAM(model)
    reference = ReciproCAM(model, path="reference")
    options = CamOptions()

    @torch.inference_mode()
    def forward() -> object:
        return model(images)

    def explain_reduced() -> object:
        return reduced.explain(images, options, top_k=1)

    def explain_reference() -> object:
        return reference.explain(images, options, top_k=1)

    forward_times, reduced_times = _time_interleaved([forward, explain_reduced], device, iters, warmup)
    t_forward, t_reduced = statistics.median(forward_times), statistics.median(reduced_times)
    # b/a from the rounds' paired calls, each pair run back to back under the same load.
    paired = statistics.median(f / r for f, r in zip(forward_times, reduced_times, strict=True))
    t_reference = None
    if reference_iters > 0:
        reference_warmup = min(warmup, 1) if device.type == "cuda" else 0  # minutes per call on CPU
        (reference_times,) = _time_interleaved([explain_reference], device, reference_iters, reference_warmup)
        t_reference = statistics.median(reference_times)
    forward_peak, forward_act = _peak(forward, device, cpu_memory)
    reduced_peak, reduced_act = _peak(explain_reduced, device, cpu_memory)
    row = Row(
        model=name,
        dtype=dtype_name,
        batch=batch,
        forward_ips=batch / t_forward,
        reduced_ips=batch / t_reduced,
        reference_ips=None if t_reference is None else batch / t_reference,
        ratio_ba=paired,
        forward_peak=forward_peak,
        reduced_peak=reduced_peak,
        forward_act=forward_act,
        reduced_act=reduced_act,
        path=reduced.path,
    )
    return row


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def table(rows: list[Row], device: torch.device) -> str:
    """The markdown table of the results."""
    if device.type == "cuda":
        header = (
            "| model | dtype | batch | (a) forward img/s | (b) reduced img/s | (c) reference img/s | b/a | b/c "
            "| peak (a) MiB | peak (b) MiB | peak b/a | activations (a) MiB | activations (b) MiB |"
        )
    else:
        header = (
            "| model | dtype | batch | (a) forward img/s | (b) reduced img/s | (c) reference img/s | b/a | b/c "
            "| peak RSS above start (a) MiB | peak RSS above start (b) MiB | peak b/a |"
        )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        cells = [
            r.model,
            r.dtype,
            str(r.batch),
            _fmt(r.forward_ips, 2),
            _fmt(r.reduced_ips, 2),
            _fmt(r.reference_ips, 2),
            _fmt(r.ratio_ba, 2),
            _fmt(_ratio(r.reduced_ips, r.reference_ips), 1),
        ]
        if device.type == "cuda":
            cells += [
                _fmt(r.forward_peak, 0),
                _fmt(r.reduced_peak, 0),
                _fmt(_ratio(r.reduced_peak, r.forward_peak), 2),
                _fmt(r.forward_act, 0),
                _fmt(r.reduced_act, 0),
            ]
        else:
            cells += [
                _fmt(r.forward_act, 0),
                _fmt(r.reduced_act, 0),
                _fmt(_ratio(r.reduced_act, r.forward_act), 2),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=CPU_MODELS, help="comma-separated timm names")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 64 on CUDA")
    parser.add_argument("--dtypes", default=None, help="default: fp32 on CPU, fp32,fp16,bf16 on CUDA")
    parser.add_argument("--iters", type=int, default=None, help="timed rounds (default: 5 CPU, 20 CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (default: 1 CPU, 5 CUDA)")
    parser.add_argument("--reference-iters", type=int, default=None, help="0 skips the reference path")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch or (64 if gpu else 8)
    dtypes = (args.dtypes or ("fp32,fp16,bf16" if gpu else "fp32")).split(",")
    iters = args.iters or (20 if gpu else 5)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    reference_iters = args.reference_iters if args.reference_iters is not None else (3 if gpu else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_memory = not gpu and _configure_glibc()

    print(
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if gpu else f" ({platform.processor() or 'cpu'})")
        + f", threads {torch.get_num_threads()}, batch {batch}, iters {iters}, warmup {warmup}, "
        f"reference iters {reference_iters}",
        flush=True,
    )
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        for dtype_name in dtypes:
            row = bench_model(name, dtype_name, batch, device, iters, warmup, reference_iters, cpu_memory)
            print(
                f"{name} {dtype_name}: forward {row.forward_ips:.1f} img/s, reduced {row.reduced_ips:.1f} "
                f"img/s ({row.path}), reference {_fmt(row.reference_ips)} img/s",
                flush=True,
            )
            rows.append(row)
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
    print()
    print(table(rows, device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
