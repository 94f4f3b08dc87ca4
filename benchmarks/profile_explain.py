"""Where an explanation waits and spends its time on a device, in one run.

1. Host waits: with CUDA's sync debug mode, every point where ``explain`` makes the host wait for
   the device (a copy to the host, a blocking copy to the device), counted by call site, for a
   tiny model with mixed options and for deit_small with the default options.
2. A ``torch.profiler`` table of ``explain`` and of the plain forward (deit_small, batch 64):
   device time and host time by operation, and the number of kernel launches.

On a CPU only the profiler tables are printed.

    python benchmarks/profile_explain.py                 # cuda if present, else cpu
    python benchmarks/profile_explain.py --dtype fp16 --batch 64
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.engine.options import CamOptions  # noqa: E402
from app.engine.reciprocam import ReciproCAM  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _ours(filename: str) -> bool:
    """Whether a frame is this project's code (not an installed package under the project root)."""
    return filename.startswith(str(ROOT)) and "site-packages" not in filename


def host_waits(cam: ReciproCAM, images: torch.Tensor, options: object, targets: object, top_k: int) -> None:
    """Print the call sites where one ``explain`` call makes the host wait for the device."""
    cam.explain(images, options, targets=targets, top_k=top_k)  # warm-up: per-engine caches
    torch.cuda.synchronize()
    sites: collections.Counter[str] = collections.Counter()

    def record(message: object, *_: object, **__: object) -> None:
        if str(message).startswith("called a synchronizing"):
            frames = [f for f in traceback.extract_stack()[:-1] if _ours(f.filename)]
            sites[" <- ".join(f"{Path(f.filename).name}:{f.lineno}: {f.line}" for f in frames[::-1][:2])] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # type: ignore[assignment]
        torch.cuda.set_sync_debug_mode("warn")
        try:
            cam.explain(images, options, targets=targets, top_k=top_k)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(f"{sum(sites.values())} host waits")
    for site, count in sites.most_common():
        print(f"{count:4d}  {site}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--dtype", default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on CUDA, 4 on CPU")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rows", type=int, default=20, help="rows of each profiler table")
    args = parser.parse_args(argv)
    import timm
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("fp16" if cuda else "fp32")]
    batch = args.batch or (64 if cuda else 4)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval().to(device=device, dtype=dtype)
    size = model.patch_embed.img_size
    images = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    cam = ReciproCAM(model)
    print(f"torch {torch.__version__}, {args.model} {dtype} batch {batch} on {device}, path {cam.path}")

    if cuda:
        tiny = timm.create_model(
            "deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3
        )
        tiny = tiny.eval().to(device)
        few = torch.randn(6, 3, 32, 32, device=device)
        mixed = [
            CamOptions(),
            None,
            CamOptions(kernel="dirac", keep_prefix=False, score="probability"),
            CamOptions(target_block=0),
            CamOptions(),
            CamOptions(score="probability"),
        ]
        print("\n== host waits: tiny distilled model, mixed options, targets and top-k, 6 images")
        host_waits(ReciproCAM(tiny), few, mixed, [None, None, [1, 2], None, [0], None], 2)
        print(f"\n== host waits: {args.model}, default options, top-1, {batch} images")
        host_waits(cam, images, CamOptions(), None, 1)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    for label, call in (
        ("explain (top-1)", lambda: cam.explain(images, CamOptions(), top_k=1)),
        ("forward", lambda: model(images)),
    ):
        with torch.inference_mode():
            for _ in range(3):
                call()
            if cuda:
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                for _ in range(args.iters):
                    call()
                if cuda:
                    torch.cuda.synchronize()
        events = prof.key_averages()
        launches = sum(
            e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
        )
        print(
            f"\n== {label}: {args.iters} calls"
            + (f", {launches / args.iters:.0f} kernel launches per call" if cuda else "")
        )
        print(events.table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
