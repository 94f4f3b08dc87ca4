"""Model loading: a timm architecture plus a weights source, on a device, in a dtype.

Weights sources:

- ``hub``: timm's pretrained weights (downloaded from the Hugging Face hub by timm);
- a local file: ``.safetensors`` or a torch state dict (``.pth``/``.pt``/``.bin``, also checkpoints
  that wrap it under ``model``/``state_dict``/``model_state``); num_classes comes from the file;
- ``random:SEED``: seeded random weights, for tests and smoke runs.

A ``.safetensors`` file may describe itself in its metadata (``arch``, ``model_kwargs``, ``labels``,
``data_config``), as the bundled model does, so that no architecture needs to be named.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from app.engine.anatomy import ModelAnatomy, TimmModule
from app.engine.options import DTYPE_NAMES, CamOptions, DType, EnginePath, HostWait
from app.engine.preprocess import DataConfig, Preprocessor
from app.engine.reciprocam import ReciproCAM
from app.engine.weights_source import RANDOM_SEED, ModelLoadError, WeightsSource

__all__ = [
    "RANDOM_SEED",
    "HubUnavailableError",
    "LoadedModel",
    "ModelLoadError",
    "WeightsSource",
    "load_model",
]

logger = logging.getLogger(__name__)

DTYPES: dict[DType, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_WRAPPER_KEYS = ("model", "state_dict", "model_state", "model_state_dict", "module")


class HubUnavailableError(ModelLoadError):
    """Pretrained weights could not be fetched from the model hub."""


@dataclass
class LoadedModel:
    """A resident model with everything needed to serve it."""

    name: str
    arch: str
    model: nn.Module
    labels: list[str]
    data_config: DataConfig
    device: torch.device
    dtype: DType
    weights: str
    engine: ReciproCAM
    extra: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def preprocessor(self) -> Preprocessor:
        """Built once per model: it sits on every request's path."""
        return Preprocessor(self.data_config)

    @property
    def anatomy(self) -> ModelAnatomy:
        return self.engine.anatomy

    @property
    def num_classes(self) -> int:
        return self.anatomy.num_classes

    def resolve_block(self, target_block: int) -> int:
        return self.engine.resolve_block(target_block)

    def label(self, index: int) -> str:
        return self.labels[index] if 0 <= index < len(self.labels) else str(index)

    def describe(self) -> dict[str, Any]:
        anatomy = self.anatomy
        return {
            "name": self.name,
            "arch": self.arch,
            "weights": self.weights,
            "device": str(self.device),
            "dtype": self.dtype,
            "num_classes": anatomy.num_classes,
            "input_size": list(self.data_config.input_size),
            "grid": list(anatomy.grid_size),
            "num_prefix_tokens": anatomy.num_prefix_tokens,
            "num_blocks": anatomy.num_blocks,
            "global_pool": anatomy.global_pool,
            "path": self.engine.path,
            "path_reason": self.engine.path_reason,
            "data_config": self.data_config.as_dict(),
        }


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was requested but CUDA is not available on this machine")
    return resolved


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and (safetensors) metadata of a local weights file."""
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        tensors: dict[str, torch.Tensor] = {}
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensors[key] = handle.get_tensor(key)
        except Exception as exc:  # the Rust reader's own error type, or an OSError
            raise ModelLoadError(f"cannot read {path} as a safetensors file: {exc}") from exc
        return tensors, metadata
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path} as a torch checkpoint: {exc}") from exc
    for key in _WRAPPER_KEYS:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ModelLoadError(f"{path} holds no state dict (expected a mapping of tensor names to tensors)")
    state = {k.removeprefix("module."): v for k, v in loaded.items()}
    return state, {}


def _num_classes_in(state: dict[str, torch.Tensor]) -> int | None:
    weight = state.get("head.weight")
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None


def load_labels(source: str | os.PathLike[str] | list[str] | None, num_classes: int) -> list[str] | None:
    """Labels from a list, a JSON list file, or a text file with one label a line."""
    if source is None:
        return None
    if isinstance(source, list):
        labels = [str(v) for v in source]
    else:
        path = Path(source)
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise ModelLoadError(f"labels file {path} {what}")
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".json":
                data = json.loads(text)
                labels = [str(v) for v in (data if isinstance(data, list) else data["labels"])]
            else:
                labels = [line.strip() for line in text.splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(
                f"labels file {path} is not UTF-8 text with one label a line, or a JSON list or "
                f'{{"labels": [...]}}: {type(exc).__name__}: {exc}'
            ) from exc
    if len(labels) != num_classes:
        raise ModelLoadError(f"{len(labels)} labels given for a model with {num_classes} classes")
    return labels


def default_labels(model: nn.Module, num_classes: int) -> list[str]:
    """ImageNet class names for ImageNet models (timm ships them), else the class indices."""
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset is not None:
            info = ImageNetInfo(subset)
            if len(info.label_names()) == num_classes:
                return [info.index_to_description(i) for i in range(num_classes)]
    except Exception as exc:  # pragma: no cover - label metadata is best effort
        logger.debug("no ImageNet labels for this model: %s", exc)
    return [str(i) for i in range(num_classes)]


def _hub_error(arch: str, exc: BaseException) -> HubUnavailableError:
    return HubUnavailableError(
        f"could not fetch pretrained weights for {arch!r} from the Hugging Face hub "
        f"({type(exc).__name__}: {exc}). Without network access, download the weights elsewhere and "
        f"pass a local file instead: --weights /path/to/{arch}.safetensors (or .pth), "
        "or RECIPROCAM_MODELS__0__WEIGHTS=/path/... in the service configuration; use --weights random:0 "
        "for a smoke test with random weights"
    )


def create_model(
    arch: str | None,
    weights: str | os.PathLike[str] | None = "hub",
    *,
    num_classes: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, str, dict[str, str], WeightsSource]:
    """Build the timm model and load its weights on the CPU in fp32."""
    source = WeightsSource.parse(weights)
    kwargs = dict(model_kwargs or {})
    metadata: dict[str, str] = {}
    state: dict[str, torch.Tensor] | None = None
    if source.kind == "file":
        assert source.path is not None
        state, metadata = read_state_dict(source.path)
        if "model_kwargs" in metadata:
            try:
                kwargs = {**json.loads(metadata["model_kwargs"]), **kwargs}
            except (json.JSONDecodeError, TypeError) as exc:
                raise ModelLoadError(
                    f"{source.path}: its model_kwargs metadata is not a JSON object"
                ) from exc
        arch = arch or metadata.get("arch")
        file_classes = _num_classes_in(state)
        if num_classes is None and file_classes is not None:
            num_classes = file_classes
    if not arch:
        raise ModelLoadError("no architecture given, and the weights file does not name one")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if arch not in timm.list_models() and arch.split(".")[0] not in timm.list_models():
        raise ModelLoadError(f"unknown timm architecture {arch!r}")
    try:
        if source.kind == "hub":
            try:
                model = timm.create_model(arch, pretrained=True, **kwargs)
            except (OSError, ConnectionError, TimeoutError) as exc:
                raise _hub_error(arch, exc) from exc
            except Exception as exc:
                if _looks_like_network_error(exc):
                    raise _hub_error(arch, exc) from exc
                raise
        else:
            if source.kind == "random":
                torch.manual_seed(int(source.seed or 0))
                logger.warning(
                    "model %s uses RANDOM weights (seed %s): maps are not meaningful", arch, source.seed
                )
            model = timm.create_model(arch, pretrained=False, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot create {arch!r} with {kwargs}: {exc}") from exc
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"{source.path} does not fit {arch!r}: {exc}") from exc
    return model, arch, metadata, source


def _looks_like_network_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        name = type(current).__name__
        text = str(current).lower()
        if any(word in name for word in ("Connection", "Timeout", "Offline", "LocalEntryNotFound", "HTTP")):
            return True
        if any(word in text for word in ("offline", "connection", "resolve", "network", "huggingface.co")):
            return True
        current = current.__cause__ or current.__context__
    return False


def load_model(
    arch: str | None,
    weights: str | os.PathLike[str] | None = "hub",
    *,
    name: str | None = None,
    device: str | torch.device | None = "auto",
    dtype: DType = "fp32",
    labels: str | os.PathLike[str] | list[str] | None = None,
    num_classes: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    path: EnginePath = "auto",
    warmup: bool = True,
    host_wait: HostWait = "block",
) -> LoadedModel:
    """Create, load, move and warm a model; the result is ready to serve."""
    if dtype not in DTYPE_NAMES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_NAMES)}")
    target_device = resolve_device(device)
    model, arch, metadata, source = create_model(
        arch, weights, num_classes=num_classes, model_kwargs=model_kwargs
    )
    model.eval().requires_grad_(False)
    model.to(device=target_device, dtype=DTYPES[dtype])
    engine = ReciproCAM(model, path=path, host_wait=host_wait)
    count = engine.anatomy.num_classes
    resolved_labels = load_labels(labels, count)
    if resolved_labels is None and "labels" in metadata:
        resolved_labels = load_labels(json.loads(metadata["labels"]), count)
    if resolved_labels is None:
        resolved_labels = default_labels(model, count)
    timm_config = timm.data.resolve_model_data_config(model)
    # The pretrained config describes the hub weights; the model built here may use another size.
    vit: TimmModule = model
    timm_config["input_size"] = (3, *(int(v) for v in vit.patch_embed.img_size))
    if "data_config" in metadata:
        timm_config = {**timm_config, **json.loads(metadata["data_config"])}
    data_config = DataConfig.from_timm(timm_config)
    loaded = LoadedModel(
        name=name or arch,
        arch=arch,
        model=model,
        labels=resolved_labels,
        data_config=data_config,
        device=target_device,
        dtype=dtype,
        weights=source.describe(),
        engine=engine,
        extra={"metadata": {k: v for k, v in metadata.items() if k != "labels"}},
    )
    if warmup:
        warm_up(loaded)
    return loaded


def warm_up(loaded: LoadedModel, batch: int = 1) -> None:
    """One prediction and one explanation on a blank input, to settle lazy initialisation."""
    height, width = loaded.data_config.input_size
    blank = torch.zeros(batch, 3, height, width)
    loaded.engine.explain(blank, CamOptions(), top_k=1)
