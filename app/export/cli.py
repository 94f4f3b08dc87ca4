"""``python -m app export MODEL --format onnx|openvino --out DIR``: a model that returns predictions
and ViT-ReciproCAM maps in one graph, in a Triton model repository."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from app.engine.options import KERNELS, SCORES

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def add_commands(sub: argparse._SubParsersAction) -> None:
    from app.cli import positive_int
    from app.export.repository import FORMATS
    from app.export.writer import DEFAULT_OPSET, EXPORTERS

    parser = sub.add_parser(
        "export",
        help="export predictions + ViT-ReciproCAM maps as one ONNX or OpenVINO model (Triton repository)",
    )
    parser.add_argument(
        "model", help="a timm architecture (weights from --weights) or a self-describing .safetensors file"
    )
    parser.add_argument("--weights", default="hub", help="hub | PATH (.safetensors/.pth) | random:SEED")
    parser.add_argument("--arch", default=None, help="timm architecture for a weights file that names none")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, required=True)
    parser.add_argument("--out", type=Path, required=True, help="model repository folder (created)")
    parser.add_argument(
        "--name", default=None, help="model name in the repository (default: the architecture)"
    )
    parser.add_argument("--labels", default=None, help="labels file (one per line, or a JSON list)")
    parser.add_argument("--top-k", type=positive_int, default=1, help="classes explained without targets")
    parser.add_argument("--kernel", choices=KERNELS, default="gaussian")
    parser.add_argument("--drop-prefix", action="store_true", help="zero the prefix tokens in masked copies")
    parser.add_argument("--score", choices=SCORES, default="logit")
    parser.add_argument("--target-block", type=int, default=-1)
    parser.add_argument("--max-batch-size", type=positive_int, default=32, help="Triton max_batch_size")
    parser.add_argument(
        "--exporter", choices=EXPORTERS, default="torchscript", help="torch.onnx exporter (torchscript: fast)"
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (dynamo: at least 18)")
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from app.engine.models import load_model
    from app.engine.options import CamOptions
    from app.export.writer import export_model

    needed = [
        "onnx",
        *(["openvino"] if args.fmt == "openvino" else []),
        *(["onnxscript"] if args.exporter == "dynamo" else []),
    ]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"error: export needs {', '.join(missing)}: pip install 'vit-reciprocam-service[export]' "
            "(or -e '.[export]' in a checkout)",
            file=sys.stderr,
        )
        return 2
    model = str(args.model)
    name = args.name
    if Path(model).suffix in WEIGHT_SUFFIXES or Path(model).is_file():
        arch, weights = args.arch, model
        name = name or Path(model).stem
    else:
        arch, weights = model, args.weights
    loaded = load_model(arch, weights, device="cpu", dtype="fp32", labels=args.labels, warmup=False)
    options = CamOptions(
        kernel=args.kernel, keep_prefix=not args.drop_prefix, score=args.score, target_block=args.target_block
    )
    exported = export_model(
        loaded,
        args.fmt,
        args.out,
        options=options,
        top_k=args.top_k,
        name=name,
        max_batch_size=args.max_batch_size,
        exporter=args.exporter,
        opset=args.opset,
    )
    for item in exported:
        print(f"{item.name}: {', '.join(str(f) for f in item.files)}", file=sys.stdout)
    return 0
