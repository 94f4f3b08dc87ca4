"""Command line: `python -m app explain|serve|...`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

Handler = Callable[[argparse.Namespace], int]


def _add_explain(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("explain", help="predict and explain image files, writing overlay PNGs")
    parser.add_argument("images", nargs="+", type=Path, help="image files")
    parser.add_argument(
        "--model", default=None, help="timm architecture (optional for self-describing files)"
    )
    parser.add_argument("--weights", default="hub", help="hub | PATH (.safetensors/.pth) | random:SEED")
    parser.add_argument("--labels", default=None, help="labels file (one per line, or a JSON list)")
    parser.add_argument("--top-k", type=int, default=1, help="explain the K most probable classes")
    parser.add_argument("--kernel", choices=["gaussian", "dirac"], default="gaussian")
    parser.add_argument("--drop-prefix", action="store_true", help="zero the prefix tokens in masked copies")
    parser.add_argument("--score", choices=["logit", "probability"], default="logit")
    parser.add_argument("--target-block", type=int, default=-1)
    parser.add_argument("--colormap", default="jet")
    parser.add_argument("--opacity", type=float, default=0.5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--path", choices=["auto", "reduced", "reference"], default="auto")
    parser.add_argument("--out", type=Path, default=Path("out"), help="directory for the overlay PNGs")
    parser.add_argument("--json", action="store_true", help="print the predictions as JSON")
    parser.set_defaults(handler=_run_explain)


def _run_explain(args: argparse.Namespace) -> int:
    import numpy as np

    from app.engine.models import ModelLoadError, load_model
    from app.engine.preprocess import project_to_original
    from app.engine.reciprocam import CamOptions, normalize_maps, upsample_maps
    from app.serving.images import ImageDecodeError, decode_image
    from app.serving.render import overlay_rgb, png_bytes

    try:
        loaded = load_model(
            args.model,
            args.weights,
            device=args.device,
            dtype=args.dtype,
            labels=args.labels,
            path=args.path,
            warmup=False,
        )
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    options = CamOptions(
        kernel=args.kernel, keep_prefix=not args.drop_prefix, score=args.score, target_block=args.target_block
    )
    preprocessor = loaded.preprocessor
    args.out.mkdir(parents=True, exist_ok=True)
    report = []
    for image_path in args.images:
        try:
            image = decode_image(image_path.read_bytes())
        except (OSError, ImageDecodeError) as exc:
            print(f"error: {image_path}: {exc}", file=sys.stderr)
            return 2
        tensor, geometry = preprocessor(image)
        (result,) = loaded.engine.explain(tensor[None], options, top_k=args.top_k)
        probabilities = result.probabilities
        assert result.score_maps is not None and result.targets is not None
        normalized = normalize_maps(result.score_maps)
        on_input = upsample_maps(normalized, geometry.input_size)
        on_original = project_to_original(on_input, geometry)
        original = np.asarray(image.convert("RGB"))
        entries = []
        for rank, class_id in enumerate(result.targets.tolist()):
            label = loaded.label(class_id)
            out_path = args.out / f"{image_path.stem}_top{rank + 1}_{class_id}.png"
            heat = on_original[rank].numpy()
            out_path.write_bytes(
                png_bytes(overlay_rgb(original, heat, colormap=args.colormap, opacity=args.opacity))
            )
            entry = {
                "rank": rank + 1,
                "class_id": class_id,
                "label": label,
                "probability": float(probabilities[class_id]),
                "logit": float(result.logits[class_id]),
                "overlay": str(out_path),
            }
            entries.append(entry)
            if not args.json:
                print(
                    f"{image_path}: #{rank + 1} {label} (class {class_id}) p={entry['probability']:.4f} -> {out_path}"
                )
        report.append({"image": str(image_path), "predictions": entries})
    if args.json:
        print(json.dumps({"model": loaded.describe(), "results": report}, indent=2))
    return 0


_EXTRA_COMMANDS: list[str] = ["app.serving.cli", "app.eval.cli", "app.export.cli"]


LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "critical")  # trace: uvicorn's, below debug


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    parser.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_explain(sub)
    for module_name in _EXTRA_COMMANDS:
        module = __import__(module_name, fromlist=["add_commands"])
        module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.addLevelName(5, "TRACE")  # uvicorn's level below DEBUG
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    handler: Handler = args.handler
    from app.engine.models import ModelLoadError

    try:
        return int(handler(args) or 0)
    except (ModelLoadError, ValueError, OSError) as exc:
        # Mistakes in what was asked (settings, files, models, option values) end with their message,
        # not a traceback; with --log-level debug the traceback is kept.
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
