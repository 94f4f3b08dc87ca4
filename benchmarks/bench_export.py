"""Exported explanation models (``python -m app export``) against the same runtime's plain forward
and against OpenVINO XAI's ViT-ReciproCAM, on the CPU.

For each model (timm architecture, seeded random weights: timing does not depend on the values):

* ``ort-plain`` / ``ov-plain``: the plain forward of the model (ONNX, and OpenVINO IR converted
  from the same ONNX file), logits only;
* ``ort-explained`` / ``ov-explained``: the exported graph (logits, top-1 class, its raw map);
* ``xai``: OpenVINO XAI's ViT-ReciproCAM (``insert_xai(..., Method.VITRECIPROCAM)``, defaults: 3x3
  Gaussian masks, class token kept, last block; ``embed_scaling=False``: raw maps, as exported)
  inserted into the plain model converted from the same ONNX file, compiled with OpenVINO on the
  CPU; batch 1 only (the inserted branch reshapes to one image). Its raw map of the predicted class
  is compared with the exported model's (the same definition gives the same numbers).

openvino-xai pins ``openvino-dev==2024.4`` and ``numpy<2``, which conflict with this project's
environment, so it runs in a separate virtual environment (``--xai-python``, default
``/work/xai-venv/bin/python``, made with ``python -m venv /work/xai-venv &&
/work/xai-venv/bin/pip install openvino-xai==1.1.0``): this script starts it as a worker process
that reads the plain ONNX file, and asks it for timed calls round by round.

Every variant runs with the same thread count (``--threads``, default: all cores). The machine is
shared, so variants alternate call by call within rounds, in a new (seeded random) order each
pass; times are medians over rounds (of each round's median call), and ratios are medians over
rounds of each round's ratio, all from one run. ONNX Runtime runs with ``ORT_ENABLE_ALL`` and, unless
``--ort-spinning``, without its threads spinning between runs (the spinning threads of one session
slow down whichever variant runs next).
Usage:

    python benchmarks/bench_export.py --models deit_tiny_patch16_224,deit_small_patch16_224
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The worker that runs inside the openvino-xai environment: prepare, then answer "N" with N timings.
XAI_WORKER = r"""
import json, sys, time
import numpy as np
import openvino as ov
import openvino_xai as xai

path, threads, height, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = ov.convert_model(path)
model = xai.insert_xai(
    model, task=xai.Task.CLASSIFICATION, explain_method=xai.Method.VITRECIPROCAM, embed_scaling=False
)
compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads})
image = np.random.default_rng(0).standard_normal((1, 3, height, width)).astype(np.float32)
outputs = compiled(image)
shapes = {str(o.get_any_name()): list(outputs[o].shape) for o in compiled.outputs}
print(json.dumps({"ready": True, "outputs": shapes, "openvino": ov.__version__}), flush=True)
for line in sys.stdin:
    if line.startswith("map "):
        saliency = [o for o in compiled.outputs if o.get_any_name() == "saliency_map"][0]
        print(json.dumps(compiled(image)[saliency][0, int(line.split()[1])].tolist()), flush=True)
        continue
    count = int(line)
    times = []
    for _ in range(count):
        start = time.perf_counter()
        compiled(image)
        times.append(time.perf_counter() - start)
    print(json.dumps(times), flush=True)
"""


class XaiWorker:
    """OpenVINO XAI in its own environment, driven over stdin/stdout."""

    def __init__(self, python: str, onnx_path: Path, threads: int, size: tuple[int, int]) -> None:
        args = [python, "-c", XAI_WORKER, str(onnx_path), str(threads), str(size[0]), str(size[1])]
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the openvino-xai worker ({python}) ended before it was ready")
        self.info = json.loads(line)

    def times(self, count: int) -> list[float]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{count}\n")
        self.process.stdin.flush()
        return [float(t) for t in json.loads(self.process.stdout.readline())]

    def raw_map(self, class_id: int) -> np.ndarray:
        """XAI's raw map of ``class_id`` for its input image (seeded normal noise, seed 0)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"map {class_id}\n")
        self.process.stdin.flush()
        return np.asarray(json.loads(self.process.stdout.readline()), dtype=np.float64)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def export_plain_onnx(model: object, path: Path, size: tuple[int, int]) -> Path:
    """The model's ordinary forward as ONNX (dynamic batch), the same exporter and opset."""
    import warnings

    import torch

    from app.export.writer import DEFAULT_OPSET

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,  # type: ignore[arg-type]
            (torch.zeros(2, 3, *size),),
            str(path),
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=DEFAULT_OPSET,
            dynamo=False,
        )
    return path


def ort_call(path: Path, threads: int, feed: np.ndarray, spinning: bool = False) -> Callable[[], object]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ONNX Runtime's worker threads keep spinning after a run; with the variants alternating on a few
    # cores, they take the cores from whichever variant runs next (a batch-1 ONNX Runtime call right
    # after another session's took up to twice as long), so the comparison turns that off
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"pixel_values": feed})


def ov_call(path: Path, threads: int, feed: np.ndarray) -> Callable[[], object]:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    return lambda: request.infer({0: feed})


def openvino_plain(onnx_path: Path, xml_path: Path) -> Path:
    import openvino as ov

    ov.save_model(ov.Core().read_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)
    return xml_path


def map_difference(xai: XaiWorker, explained_xml: Path, size: tuple[int, int]) -> float:
    """Max |difference| between XAI's raw map and the exported model's, over the exported map's largest
    magnitude, for the predicted class of the XAI worker's input image: the same definition (3x3
    Gaussian masks, class token kept, last block, raw logits) must give the same numbers."""
    import openvino as ov

    image = np.random.default_rng(0).standard_normal((1, 3, *size)).astype(np.float32)
    compiled = ov.Core().compile_model(str(explained_xml), "CPU")
    result = compiled(image)
    outputs = {o.get_any_name(): result[o] for o in compiled.outputs}
    ours = outputs["maps"][0, 0].astype(np.float64)
    theirs = xai.raw_map(int(outputs["targets"][0, 0]))
    return float(np.abs(ours - theirs).max() / max(1e-12, float(np.abs(ours).max())))


def timed(call: Callable[[], object], count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def bench_model(arch: str, args: argparse.Namespace, scratch: Path) -> list[dict[str, object]]:
    import torch

    from app.engine.models import load_model
    from app.export.writer import export_model

    torch.set_num_threads(args.threads)
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else None
    loaded = load_model(arch, "random:0", device="cpu", warmup=False, model_kwargs=kwargs)
    # timm initialises norms to weight 1, bias 0, which OpenVINO folds away, and XAI's graph parser
    # then cannot find the last block's LayerNorm: seeded noise makes them ordinary parameters
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in loaded.model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    size = loaded.data_config.input_size
    folder = scratch / arch
    onnx_models = export_model(loaded, "onnx", folder / "onnx", top_k=1)
    ov_models = export_model(loaded, "openvino", folder / "openvino", top_k=1)
    plain_onnx = export_plain_onnx(loaded.model, folder / "plain.onnx", size)
    plain_xml = openvino_plain(plain_onnx, folder / "plain.xml")
    rows: list[dict[str, object]] = []
    xai = None
    if args.xai_python and Path(args.xai_python).exists():
        xai = XaiWorker(args.xai_python, plain_onnx, args.threads, size)
        print(f"  openvino-xai worker ready: {xai.info}", flush=True)
    else:
        print(f"  no openvino-xai environment at {args.xai_python}: xai skipped", flush=True)
    try:
        for batch in args.batch_sizes:
            feed = np.random.default_rng(batch).standard_normal((batch, 3, *size)).astype(np.float32)
            variants: dict[str, Callable[[], object]] = {
                "ort-plain": ort_call(plain_onnx, args.threads, feed, args.ort_spinning),
                "ort-explained": ort_call(onnx_models[0].model_file, args.threads, feed, args.ort_spinning),
                "ov-plain": ov_call(plain_xml, args.threads, feed),
                "ov-explained": ov_call(ov_models[0].model_file, args.threads, feed),
            }
            for call in variants.values():
                timed(call, args.warmup)
            use_xai = xai is not None and batch == 1
            if use_xai:
                assert xai is not None
                xai.times(1)
            rounds: dict[str, list[float]] = {name: [] for name in variants}
            shuffler = random.Random(batch)
            if use_xai:
                rounds["xai"] = []
            for index in range(args.rounds):
                # calls alternate within the round too, so that load changes hit every variant alike
                calls: dict[str, list[float]] = {name: [] for name in variants}
                for _ in range(args.iters):
                    # in a new order each pass, so that no variant always follows the same one
                    order = list(variants)
                    shuffler.shuffle(order)
                    for name in order:
                        calls[name].extend(timed(variants[name], 1))
                for name, values in calls.items():
                    rounds[name].append(statistics.median(values) / batch)
                if use_xai:
                    assert xai is not None
                    rounds["xai"].append(statistics.median(xai.times(args.xai_iters)))
                summary = ", ".join(f"{k} {1000 * v[-1]:.1f}" for k, v in rounds.items())
                print(f"  {arch} batch {batch} round {index + 1}: {summary} (ms per image)", flush=True)
            medians = {name: statistics.median(values) for name, values in rounds.items()}
            row: dict[str, object] = {
                "model": arch,
                "batch": batch,
                **{k: 1000 * v for k, v in medians.items()},
            }
            # ratios: the median over rounds of each round's ratio (paired, so drift in the machine's
            # load between rounds cancels)
            pairs = [
                ("ort_vs_plain", "ort-plain", "ort-explained"),
                ("ov_vs_plain", "ov-plain", "ov-explained"),
            ]
            if use_xai:
                pairs += [("xai_vs_ov", "xai", "ov-explained"), ("xai_vs_ort", "xai", "ort-explained")]
            for key, slow, fast in pairs:
                row[key] = statistics.median(a / b for a, b in zip(rounds[slow], rounds[fast], strict=True))
            if use_xai:
                assert xai is not None
                row["xai_map_difference"] = map_difference(xai, ov_models[0].model_file, size)
            rows.append(row)
    finally:
        if xai is not None:
            xai.close()
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    head = (
        "| model | batch | ORT plain | ORT explained | ratio | OV plain | OV explained | ratio | "
        "OV XAI | XAI / OV explained | XAI / ORT explained | maps: XAI vs exported |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )

    def ms(value: object) -> str:
        return "–" if value is None else f"{float(value):.1f} ms"  # type: ignore[arg-type]

    def ratio(value: object) -> str:
        return "–" if value is None else f"{float(value):.2f}x"  # type: ignore[arg-type]

    def diff(value: object) -> str:
        return "–" if value is None else f"{float(value):.1e}"  # type: ignore[arg-type]

    lines = [
        f"| {r['model']} | {r['batch']} | {ms(r['ort-plain'])} | {ms(r['ort-explained'])} | "
        f"{ratio(r['ort_vs_plain'])} | {ms(r['ov-plain'])} | {ms(r['ov-explained'])} | "
        f"{ratio(r['ov_vs_plain'])} | {ms(r.get('xai'))} | {ratio(r.get('xai_vs_ov'))} | "
        f"{ratio(r.get('xai_vs_ort'))} | {diff(r.get('xai_map_difference'))} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="deit_tiny_patch16_224,deit_small_patch16_224")
    parser.add_argument("--batch-sizes", default="1,8", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=5, help="calls per variant and round (median)")
    parser.add_argument("--xai-iters", type=int, default=2, help="XAI calls per round (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--ort-spinning",
        action="store_true",
        help="let ONNX Runtime's threads spin between runs (its default)",
    )
    parser.add_argument("--xai-python", default="/work/xai-venv/bin/python")
    parser.add_argument("--model-kwargs", default=None, help="JSON keyword arguments for timm.create_model")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as scratch:
        for arch in args.models.split(","):
            print(f"{arch}: exporting", flush=True)
            rows.extend(bench_model(arch, args, Path(scratch)))
    print()
    print(markdown(rows).rstrip("\n"))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
