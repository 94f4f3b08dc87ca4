"""Where a model's weights are: a relative file looked up from the project root as well, and hub
weights checked to be cached or reachable before a download is tried. Without torch, like
:mod:`app.engine.weights_source`, so that the command line can check a source before loading."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from app.engine.weights_source import ModelLoadError, WeightsSource

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def resolve_weights(weights: str) -> str:
    """A relative weights path that does not exist from the working directory is looked up from the
    project root, so the bundled model is found wherever the service is started."""
    source = WeightsSource.parse(weights)
    if source.kind != "file" or source.path is None or source.path.is_absolute() or source.path.exists():
        return weights
    candidate = PROJECT_ROOT / source.path
    return str(candidate) if candidate.exists() else weights


def check_hub_reachable(arch: str | None, timeout_s: float) -> None:
    """Fail fast, with a clear reason, when hub weights are neither cached nor reachable.

    Without this, an offline machine spends close to a minute in download retries per model.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or not arch:
        return
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # downloads go through a proxy: a direct connection says nothing
    if _hub_weights_cached(arch):
        return
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as exc:
        raise ModelLoadError(
            f"pretrained weights for {arch!r} are not in the local cache and the model hub ({host}) "
            f"cannot be reached ({exc}). Without network access, put the weights in a local file and "
            "set the model's weights to its path (e.g. RECIPROCAM_MODELS__0__WEIGHTS=/models/file.safetensors), "
            "or use weights random:0 for a smoke test"
        ) from exc


def _hub_weights_cached(arch: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg

        config = get_pretrained_cfg(arch)
        repo = getattr(config, "hf_hub_id", None)
        if not repo:
            return False
        for filename in ("model.safetensors", "pytorch_model.bin", getattr(config, "hf_hub_filename", None)):
            if filename and isinstance(try_to_load_from_cache(repo, filename), str):
                return True
    except Exception:
        return False
    return False
