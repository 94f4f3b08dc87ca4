"""Download hub weights into the Hugging Face cache (HF_HOME), e.g. while building the image.

    python docker/bake_weights.py deit_small_patch16_224 [more timm names ...]

Uses the service's own model loading, so the files land exactly where the service looks for them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="timm architecture names with hub weights")
    args = parser.parse_args(argv)
    if not args.models:
        print("nothing to bake (no model names given)")
        return 0
    from app.engine.models import ModelLoadError, create_model

    cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
    for name in args.models:
        try:
            model, arch, _metadata, _source = create_model(name, "hub")
        except ModelLoadError as exc:
            print(f"error: {name}: {exc}", file=sys.stderr)
            return 2
        parameters = sum(p.numel() for p in model.parameters())
        print(f"baked {arch}: {parameters / 1e6:.1f}M parameters into {cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
