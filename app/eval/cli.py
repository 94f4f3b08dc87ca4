"""``python -m app train`` (the shipped shapes model) and ``python -m app eval`` (saliency metrics)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.cli import device_name, positive_int, prepare_weights

if TYPE_CHECKING:  # the model code loads only when a command runs
    from app.engine.models import LoadedModel

logger = logging.getLogger(__name__)

# the shipped model, as the service names it (a relative path is also looked up from the project root)
DEFAULT_WEIGHTS = "app/weights/shapes_vit.safetensors"
DEFAULT_TRAIN_OUT = Path("out") / "shapes_vit.safetensors"  # not the shipped model: see --force
DEFAULT_EVAL_SEED = 1000  # training uses seeds 0 (train) and 1 (validation)


def _safetensors_path(text: str) -> Path:
    """argparse type: the weights are written as safetensors, so the name must say so (a .pth name
    would be read back as a torch checkpoint, and fail)."""
    path = Path(text)
    if path.suffix != ".safetensors":
        raise argparse.ArgumentTypeError(
            f"{text}: the weights are written as safetensors; name the file *.safetensors"
        )
    return path


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


class _Explicit(argparse.Action):
    """Stores the value and notes that it was given, so that an option that does not apply can be
    refused instead of ignored."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        given = set(getattr(namespace, "explicit", set()))
        namespace.explicit = given | {option_string or self.dest}


def add_commands(sub: argparse._SubParsersAction) -> None:
    _add_train(sub)
    _add_eval(sub)


def _add_train(sub: argparse._SubParsersAction) -> None:
    from app.eval.shapes_vit import MODEL_KWARGS
    from app.eval.train import TrainConfig

    defaults = TrainConfig()
    parser = sub.add_parser("train", help="train the small shapes ViT on synthetic data")
    parser.add_argument(
        "--out",
        type=_safetensors_path,
        default=DEFAULT_TRAIN_OUT,
        help="output .safetensors file; its model card is written next to it (.md)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite --out and its card if they exist (to replace the shipped model: "
        f"--out {DEFAULT_WEIGHTS} --force)",
    )
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="training data and init seed")
    parser.add_argument("--train-count", type=int, default=defaults.train_count)
    parser.add_argument("--val-seed", type=int, default=defaults.val_seed)
    parser.add_argument("--val-count", type=int, default=defaults.val_count)
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs)
    parser.add_argument(
        "--masked-loss-weight",
        type=float,
        default=defaults.masked_loss_weight,
        help="weight of the last-block feature-masking loss (0: off)",
    )
    parser.add_argument(
        "--token-loss-weight",
        type=float,
        default=defaults.token_loss_weight,
        help="patch-label head (0: off)",
    )
    parser.add_argument(
        "--pattern-loss-weight",
        type=float,
        default=defaults.pattern_loss_weight,
        help="patch-mask head (0: off)",
    )
    parser.add_argument("--depth", type=int, default=MODEL_KWARGS["depth"], help="transformer blocks")
    parser.add_argument("--embed-dim", type=int, default=MODEL_KWARGS["embed_dim"], help="token width")
    parser.add_argument("--heads", type=int, default=MODEL_KWARGS["num_heads"], help="attention heads")
    parser.add_argument("--init", default=None, help="continue from these weights (.safetensors)")
    parser.add_argument("--threads", type=positive_int, default=defaults.threads, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from app.eval.shapes_vit import MODEL_KWARGS
    from app.eval.train import TrainConfig, train
    from app.eval.train_files import model_card, save_weights

    card = args.out.with_suffix(".md")
    existing = [str(path) for path in (args.out, card) if path.exists()]
    if existing and not args.force:
        print(
            f"error: {' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
            "add --force to overwrite, or write elsewhere with --out",
            file=sys.stderr,
        )
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails now, not after training

    config = TrainConfig(
        seed=args.seed,
        train_count=args.train_count,
        val_seed=args.val_seed,
        val_count=args.val_count,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        threads=args.threads,
        warmup_epochs=args.warmup_epochs,
        masked_loss_weight=args.masked_loss_weight,
        token_loss_weight=args.token_loss_weight,
        pattern_loss_weight=args.pattern_loss_weight,
        init_weights=prepare_weights(None, args.init) if args.init else None,
        model_kwargs={
            **MODEL_KWARGS,
            "depth": args.depth,
            "embed_dim": args.embed_dim,
            "num_heads": args.heads,
        },
    )
    model, result = train(config, progress=not args.no_progress)
    path = save_weights(model, args.out, config, result)
    options = [
        f"--out {args.out}",
        f"--epochs {args.epochs} --seed {args.seed} --train-count {args.train_count}",
        f"--batch-size {args.batch_size} --lr {args.lr} --warmup-epochs {args.warmup_epochs}",
        f"--masked-loss-weight {args.masked_loss_weight} --token-loss-weight {args.token_loss_weight}",
        f"--pattern-loss-weight {args.pattern_loss_weight} --threads {args.threads}",
        f"--depth {args.depth} --embed-dim {args.embed_dim} --heads {args.heads}",
    ]
    if args.init:
        options.append(f"--init {args.init}")
    if args.force:
        options.append("--force")
    command = " \\\n    ".join(["python -m app train", *options])
    card.write_text(model_card(config, result, path, command.strip()), encoding="utf-8")
    size_mb = path.stat().st_size / 1e6
    print(
        json.dumps(
            {
                "out": str(path),
                "size_mb": round(size_mb, 2),
                "val_accuracy": result.val_accuracy,
                "train_accuracy": result.train_accuracy,
                "seconds": round(result.seconds, 1),
                "history": result.history,
            },
            indent=2,
        )
    )
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from app.eval.baselines import DEFAULT_METHODS, METHODS

    parser = sub.add_parser("eval", help="saliency metrics (ADCC, insertion/deletion, pointing game)")
    parser.add_argument(
        "--model",
        default=str(DEFAULT_WEIGHTS),
        help="a weights file (self-describing .safetensors, or with --arch) or a timm architecture name "
        "(hub weights unless --weights is given); default: the shipped shapes model",
    )
    parser.add_argument(
        "--arch", default=None, help="timm architecture for a weights file that does not name one"
    )
    parser.add_argument("--weights", default=None, help="weights for an architecture given by --model")
    parser.add_argument(
        "--data",
        default="synthetic",
        help="'synthetic', 'synthetic-pairs' (two objects of different classes per image: class "
        "pointing only) or an image folder",
    )
    parser.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="for an image folder: a file of 'NAME CLASS_ID' lines (else class folders give the ids)",
    )
    parser.add_argument(
        "--limit",
        type=_non_negative_int,
        default=200,
        help="number of images (0: all of a folder; synthetic data needs at least 1)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, from: {', '.join(METHODS)}",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED, help="synthetic data / subset seed")
    parser.add_argument(
        "--target",
        choices=["label", "predicted"],
        default="label",
        action=_Explicit,
        help="class explained (the prediction for images without a label)",
    )
    parser.add_argument(
        "--steps",
        type=_non_negative_int,
        default=32,
        action=_Explicit,
        help="insertion/deletion steps (0: skip them)",
    )
    parser.add_argument("--tolerance", type=float, default=4.0, help="pointing-game tolerance in pixels")
    parser.add_argument(
        "--pointing-reference",
        default="rollout",
        help="method the others' pointing hits are paired against (wins, losses, exact McNemar p)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=25)
    parser.add_argument("--figure-images", type=int, default=6, help="rows in the PNG grid")
    parser.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("eval-out"), help="directory for CSV, markdown, PNG")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(handler=_run_eval)


def _load(args: argparse.Namespace) -> LoadedModel:
    from app.engine.models import load_model

    model = str(args.model)
    looks_like_file = Path(model).suffix in (".safetensors", ".pth", ".pt", ".bin") or Path(model).is_file()
    if looks_like_file:
        return load_model(args.arch, prepare_weights(args.arch, model), device=args.device, warmup=False)
    weights = prepare_weights(model, args.weights or "hub")
    return load_model(model, weights, device=args.device, warmup=False)


def _run_eval(args: argparse.Namespace) -> int:
    import torch

    from app.engine.models import ModelLoadError
    from app.eval.baselines import METHODS
    from app.eval.batches import folder_batches, list_image_dir, synthetic_batches
    from app.eval.evaluate import evaluate
    from app.eval.report import (
        csv_text,
        figure,
        markdown_table,
        pointing_pairs_csv,
        pointing_pairs_table,
        text_table,
    )

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails now, not after the work
    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in methods if name not in METHODS]
    if unknown or not methods:
        print(f"error: unknown methods {unknown}; expected some of {', '.join(METHODS)}", file=sys.stderr)
        return 2
    if args.pointing_reference not in METHODS:
        print(f"error: unknown --pointing-reference {args.pointing_reference!r}", file=sys.stderr)
        return 2
    synthetic = args.data in ("synthetic", "synthetic-pairs")
    if synthetic and args.limit == 0:
        print(
            "error: --limit 0 means every image of a folder; synthetic data has no end: write the "
            "number of images (--limit 200, say)",
            file=sys.stderr,
        )
        return 2
    explicit: set[str] = getattr(args, "explicit", set())
    given = sorted(explicit & {"--steps", "--target"})
    if args.data == "synthetic-pairs" and given:
        print(
            "error: --data synthetic-pairs measures class pointing only, always for each object's own "
            f"class: {' and '.join(given)} {'do' if len(given) > 1 else 'does'} not apply; drop {'them' if len(given) > 1 else 'it'}",
            file=sys.stderr,
        )
        return 2
    try:
        loaded = _load(args)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.data == "synthetic-pairs":
        return _run_pairs(args, loaded, methods)
    if args.data == "synthetic":
        total = args.limit
        batches = synthetic_batches(loaded, args.seed, total, args.batch_size)
        source = f"synthetic shapes, seed {args.seed}"
    else:
        root = Path(args.data)
        if not root.is_dir():
            print(f"error: {root} is not a directory (nor 'synthetic')", file=sys.stderr)
            return 2
        try:
            items = list_image_dir(root, args.labels)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if not items:
            print(f"error: no images under {root}", file=sys.stderr)
            return 2
        total = min(args.limit, len(items)) if args.limit > 0 else len(items)
        batches = folder_batches(loaded, items, total, args.batch_size, args.seed)
        source = str(root)
    report = evaluate(
        loaded,
        batches,
        methods,
        total=total,
        target=args.target,
        steps=args.steps,
        tolerance=args.tolerance,
        figure_images=args.figure_images,
        progress=not args.no_progress,
    )
    accuracy = "n/a" if report.accuracy is None else f"{100 * report.accuracy:.2f}%"
    summary = (
        f"model: {loaded.name} ({loaded.weights}); data: {source}; images: {report.images}; "
        f"top-1 accuracy: {accuracy}; class explained: {report.target}; insertion/deletion steps: "
        f"{args.steps}; pointing tolerance: {args.tolerance:g} px. All values in percent."
    )
    table = markdown_table(report)
    pairs = pointing_pairs_table(report, args.pointing_reference)
    missing_pairs = "" if pairs else _why_no_pairs(args, methods)
    if pairs:
        pairs = (
            f"Pointing game, paired against {args.pointing_reference} on the same images (wins: only "
            f"the method hits; losses: only {args.pointing_reference} hits; p: exact McNemar, "
            f"two-sided; 'correct': the correctly classified images):\n\n{pairs}\n"
        )
    written = [args.out / "results.csv", args.out / "results.md"]
    (args.out / "results.csv").write_text(csv_text(report), encoding="utf-8")
    pairs_csv = pointing_pairs_csv(report, args.pointing_reference)
    if pairs_csv:
        (args.out / "pointing_pairs.csv").write_text(pairs_csv, encoding="utf-8")
        written.append(args.out / "pointing_pairs.csv")
    (args.out / "results.md").write_text(
        f"{summary}\n\n{table}\n" + (f"\n{pairs}" if pairs else f"\n{missing_pairs}\n"), encoding="utf-8"
    )
    if report.figure_pixels is not None:
        figure(report).save(args.out / "eval_grid.png", optimize=True)
        written.append(args.out / "eval_grid.png")
    print(summary)
    print(text_table(report))
    print()
    print(pairs.rstrip() if pairs else missing_pairs)
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


def _why_no_pairs(args: argparse.Namespace, methods: list[str]) -> str:
    """Why the paired pointing comparison is missing, in a line that says how to get it."""
    reference = args.pointing_reference
    if reference not in methods:
        return (
            f"No paired pointing comparison: its reference method, {reference}, was not run; add it to "
            f"--methods or name one of {', '.join(methods)} with --pointing-reference."
        )
    if len(methods) == 1:
        return f"No paired pointing comparison: {reference} is the only method run."
    return "No paired pointing comparison: the images have no object masks to point at."


def _run_pairs(args: argparse.Namespace, loaded: LoadedModel, methods: list[str]) -> int:
    """``--data synthetic-pairs``: which object each class is, on two-object images."""
    from app.eval.pairs import evaluate_pairs, pairs_csv, pairs_figure, pairs_markdown

    total = args.limit
    report = evaluate_pairs(
        loaded,
        methods,
        seed=args.seed,
        limit=total,
        batch_size=args.batch_size,
        tolerance=args.tolerance,
        figure_images=args.figure_images,
        progress=not args.no_progress,
    )
    summary = (
        f"model: {loaded.name} ({loaded.weights}); data: two-object synthetic shapes, seed {args.seed}; "
        f"images: {report.images} ({2 * report.images} objects); the two most probable classes are the "
        f"two objects' on {100 * report.top2_match:.2f}% of the images; class explained: each object's "
        f"label; pointing tolerance: {args.tolerance:g} px. Class pointing: share of objects on which the "
        f"map of their class peaks; both / neither: share of images. Paired over objects against "
        f"{args.pointing_reference} (exact McNemar p). Values in percent."
    )
    table = pairs_markdown(report, args.pointing_reference)
    (args.out / "pairs.md").write_text(f"{summary}\n\n{table}\n", encoding="utf-8")
    (args.out / "pairs.csv").write_text(pairs_csv(report, args.pointing_reference), encoding="utf-8")
    written = [args.out / "pairs.md", args.out / "pairs.csv"]
    if report.figure_pixels is not None:
        pairs_figure(report, loaded.labels).save(args.out / "pairs_grid.png", optimize=True)
        written.append(args.out / "pairs_grid.png")
    print(summary)
    print(table)
    print("wrote " + ", ".join(str(path) for path in written))
    return 0
