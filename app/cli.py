"""Command line: `python -m app explain|serve|...`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from app.engine.options import DTYPE_NAMES, ENGINE_PATHS, KERNELS, SCORES
from app.serving.options import (
    COLORMAPS,
    DEFAULT_JPEG_QUALITY,
    MAX_JPEG_QUALITY,
    MIN_JPEG_QUALITY,
    PICTURE_FORMATS,
)

Handler = Callable[[argparse.Namespace], int]


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default (argparse's own formatter skips options without help)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "%(default)" in text or _no_default(action.default):
            return text
        if not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".strip()


def _no_default(value: object) -> bool:
    """Nothing worth showing: no default, or the False of a flag (0 is a default like any other)."""
    return value is None or value is False or value is argparse.SUPPRESS


class Parser(argparse.ArgumentParser):
    """An argument parser whose help lists the defaults, for the program and each subcommand."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpWithDefaults)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        # the formatter only runs for options that have help text: give the others an empty one
        if not kwargs.get("help") and not _no_default(kwargs.get("default")):
            kwargs["help"] = "(default: %(default)s)"
        return super().add_argument(*args, **kwargs)


def device_name(text: str) -> str:
    """argparse type: auto, or a device torch knows by name (cpu, cuda, cuda:N, ...)."""
    if text == "auto":
        return text
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: write auto, cpu, cuda or cuda:N") from exc
    return text


def prepare_weights(arch: str | None, weights: str) -> str:
    """The weights source as the service would read it: a relative path that does not exist here is
    looked up from the project root; hub weights that are neither cached nor reachable fail within
    the service's quick probe (``hub_probe_timeout_s``), not after a minute of download retries."""
    from app.config import Settings
    from app.engine.models import ModelLoadError, WeightsSource
    from app.engine.weights_location import check_hub_reachable, resolve_weights

    resolved = resolve_weights(weights)
    timeout = float(Settings.model_fields["hub_probe_timeout_s"].default)
    if arch and WeightsSource.parse(resolved).kind == "hub":
        try:
            check_hub_reachable(arch, timeout)
        except ModelLoadError as exc:
            raise ModelLoadError(
                f"pretrained weights for {arch!r} are not in the local cache and the model hub cannot be "
                f"reached ({exc.__cause__}). Without network access, download the weights elsewhere and "
                f"pass the file: --weights /path/to/{arch}.safetensors (or .pth); --weights random:0 "
                "runs a smoke test with random weights"
            ) from exc
    return resolved


def _add_explain(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("explain", help="predict and explain image files, writing overlay pictures")
    parser.add_argument("images", nargs="+", type=Path, help="image files")
    parser.add_argument(
        "--model", default=None, help="timm architecture (optional for self-describing files)"
    )
    parser.add_argument(
        "--weights",
        default="hub",
        help="hub | PATH (.safetensors/.pth; relative paths also from the project root) | random:SEED",
    )
    parser.add_argument("--labels", default=None, help="labels file (one per line, or a JSON list)")
    parser.add_argument(
        "--top-k",
        type=positive_int,
        default=1,
        help="explain the K most probable classes (at most the model's number of classes)",
    )
    parser.add_argument("--kernel", choices=KERNELS, default="gaussian")
    parser.add_argument("--drop-prefix", action="store_true", help="zero the prefix tokens in masked copies")
    parser.add_argument("--score", choices=SCORES, default="logit")
    parser.add_argument("--target-block", type=int, default=-1)
    parser.add_argument("--colormap", choices=COLORMAPS, default="jet")
    parser.add_argument("--opacity", type=float, default=0.5)
    parser.add_argument(
        "--picture-format", choices=PICTURE_FORMATS, default="png", help="format of the overlay files"
    )
    parser.add_argument(
        "--jpeg-quality",
        type=jpeg_quality,
        default=DEFAULT_JPEG_QUALITY,
        help=f"JPEG quality ({MIN_JPEG_QUALITY}-{MAX_JPEG_QUALITY}) with --picture-format jpeg",
    )
    parser.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    parser.add_argument("--path", choices=ENGINE_PATHS, default="auto")
    parser.add_argument("--out", type=Path, default=Path("out"), help="directory for the overlays")
    parser.add_argument("--json", action="store_true", help="print the predictions as JSON")
    parser.set_defaults(handler=_run_explain)


def _run_explain(args: argparse.Namespace) -> int:
    import asyncio

    from app.config import ModelSettings
    from app.serving.explain_files import FileError, explain_files
    from app.serving.request import ExplainOptions

    model = ModelSettings(
        name="cli",
        arch=args.model,
        weights=prepare_weights(args.model, args.weights),
        device=args.device,
        dtype=args.dtype,
        labels=args.labels,
        path=args.path,
    )
    explain = ExplainOptions(
        kernel=args.kernel, keep_prefix=not args.drop_prefix, score=args.score, target_block=args.target_block
    )
    try:
        explained = asyncio.run(
            explain_files(
                model,
                list(args.images),
                top_k=args.top_k,
                explain=explain,
                colormap=args.colormap,
                opacity=args.opacity,
                picture_format=args.picture_format,
                jpeg_quality=args.jpeg_quality,
                out=args.out,
            )
        )
    except FileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"model": explained.model, "results": explained.results}, indent=2))
        return 0
    for result in explained.results:
        for entry in result["predictions"]:
            print(
                f"{result['image']}: #{entry['rank']} {entry['label']} (class {entry['class_id']}) "
                f"p={entry['probability']:.4f} -> {entry['overlay']}"
            )
    return 0


# The module that adds each command; only the command's own is imported when it is named (building
# every command's options imports torch, which `serve`'s supervising process does not need).
_COMMAND_MODULES: dict[str, str] = {
    "serve": "app.serving.cli",
    "train": "app.eval.cli",
    "eval": "app.eval.cli",
    "export": "app.export.cli",
}


LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "critical")  # trace: uvicorn's, below debug


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def jpeg_quality(text: str) -> int:
    """argparse type: a JPEG quality within the service's bounds."""
    value = int(text)
    if not MIN_JPEG_QUALITY <= value <= MAX_JPEG_QUALITY:
        raise argparse.ArgumentTypeError(
            f"must be from {MIN_JPEG_QUALITY} to {MAX_JPEG_QUALITY}, not {value}"
        )
    return value


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line; given ``argv`` naming one command, only that command's options."""
    parser = Parser(prog="python -m app", description=__doc__)
    parser.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    named = next((arg for arg in argv or () if not arg.startswith("-")), None)
    if named not in _COMMAND_MODULES:
        _add_explain(sub)
    modules = [_COMMAND_MODULES[named]] if named in _COMMAND_MODULES else _COMMAND_MODULES.values()
    for module_name in dict.fromkeys(modules):
        module = __import__(module_name, fromlist=["add_commands"])
        module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(arguments).parse_args(arguments)
    logging.addLevelName(5, "TRACE")  # uvicorn's level below DEBUG
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    handler: Handler = args.handler
    from app.engine.weights_source import ModelLoadError

    try:
        return int(handler(args) or 0)
    except (ModelLoadError, ValueError, OSError) as exc:
        # Mistakes in what was asked (settings, files, models, option values) end with their message,
        # not a traceback; with --log-level debug the traceback is kept.
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
