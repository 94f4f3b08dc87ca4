"""What travels with an exported model: its metadata (labels, preprocessing, explanation options,
signature) and a Triton model-repository folder (``config.pbtxt`` with dynamic batching).

Each export writes two models into one repository: ``NAME`` explains the ``top_k`` most probable
classes (input ``pixel_values``; outputs ``logits``, ``targets``, ``maps``) and ``NAME_targets``
explains the classes the caller names (inputs ``pixel_values`` and ``targets``; outputs ``logits``
and ``maps``). Two fixed signatures are used because an optional input is not portable across ONNX
Runtime, OpenVINO and Triton.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from app.engine.options import CamOptions
from app.engine.preprocess import DataConfig

FORMATS: tuple[str, ...] = ("onnx", "openvino")
BACKENDS = {"onnx": "onnxruntime", "openvino": "openvino"}
MODEL_FILES = {"onnx": ("model.onnx",), "openvino": ("model.xml", "model.bin")}
METADATA_FILE = "metadata.json"
METADATA_VERSION = 1
TARGETS_SUFFIX = "_targets"


@dataclass(frozen=True)
class ExportedSignature:
    """The shapes of one exported graph (``-1``: dynamic)."""

    channels: int
    input_size: tuple[int, int]
    num_classes: int
    grid: tuple[int, int]
    top_k: int
    with_targets: bool

    @property
    def inputs(self) -> dict[str, dict[str, Any]]:
        inputs = {"pixel_values": {"dtype": "float32", "shape": [-1, self.channels, *self.input_size]}}
        if self.with_targets:
            inputs["targets"] = {"dtype": "int64", "shape": [-1, -1]}
        return inputs

    @property
    def outputs(self) -> dict[str, dict[str, Any]]:
        classes = -1 if self.with_targets else self.top_k
        outputs = {"logits": {"dtype": "float32", "shape": [-1, self.num_classes]}}
        if not self.with_targets:
            outputs["targets"] = {"dtype": "int64", "shape": [-1, classes]}
        outputs["maps"] = {"dtype": "float32", "shape": [-1, classes, *self.grid]}
        return outputs


def model_name(text: str) -> str:
    """A model-repository name from an architecture or file name: letters, digits, ``_``, ``-``, ``.``."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._-")
    if not cleaned:
        raise ValueError(f"cannot make a model name from {text!r}; pass --name")
    return cleaned


def metadata(
    *,
    name: str,
    arch: str,
    weights: str,
    fmt: str,
    labels: list[str],
    data_config: DataConfig,
    options: CamOptions,
    target_block: int,
    signature: ExportedSignature,
    exporter: str,
) -> dict[str, Any]:
    """The metadata of one exported graph (a JSON object; embedded in the model and written beside it)."""
    return {
        "metadata_version": METADATA_VERSION,
        "name": name,
        "arch": arch,
        "weights": weights,
        "format": fmt,
        "exporter": exporter,
        "labels": list(labels),
        "preprocessing": {
            "input_size": list(data_config.input_size),
            "mean": list(data_config.mean),
            "std": list(data_config.std),
            "crop_pct": data_config.crop_pct,
            "crop_mode": data_config.crop_mode,
            "interpolation": data_config.interpolation,
            "channel_order": "RGB",
            "pixel_scale": "pixel / 255, then (x - mean) / std",
        },
        "explanation": {
            "method": "vit-reciprocam",
            "evaluation": "reduced",
            "kernel": options.kernel,
            "keep_prefix": options.keep_prefix,
            "target_block": target_block,
            "score": options.score,
            "top_k": None if signature.with_targets else signature.top_k,
            "grid": list(signature.grid),
            "maps": "raw scores; per map: (m - min) / (max - min + 1e-12), then bilinear upsampling "
            "to the input size",
        },
        "inputs": signature.inputs,
        "outputs": signature.outputs,
    }


def embedded_properties(meta: dict[str, Any]) -> dict[str, str]:
    """The metadata as string properties (ONNX ``metadata_props``; OpenVINO ``rt_info``): strings stay
    as they are, everything else is JSON."""
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in meta.items()}


_TRITON_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}


def _tensors(entries: dict[str, dict[str, Any]]) -> str:
    """Triton tensor entries; the batch dimension is left out (``max_batch_size`` adds it)."""
    parts = []
    for tensor, spec in entries.items():
        dims = ", ".join(str(d) for d in spec["shape"][1:])
        parts.append(
            f'  {{\n    name: "{tensor}"\n    data_type: {_TRITON_TYPES[spec["dtype"]]}\n    dims: [ {dims} ]\n  }}'
        )
    return ",\n".join(parts)


def triton_config(
    name: str, fmt: str, signature: ExportedSignature, *, max_batch_size: int, queue_delay_us: int = 2000
) -> str:
    """``config.pbtxt`` for Triton's ONNX Runtime or OpenVINO backend, dynamic batching on."""
    if fmt not in BACKENDS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    lines = [
        f'name: "{name}"',
        f'backend: "{BACKENDS[fmt]}"',
        f"max_batch_size: {max_batch_size}",
        f"input [\n{_tensors(signature.inputs)}\n]",
        f"output [\n{_tensors(signature.outputs)}\n]",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {queue_delay_us}",
        "}",
        "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]",
    ]
    return "\n".join(lines) + "\n"
