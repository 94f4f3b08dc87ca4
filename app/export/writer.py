"""Writing an explanation graph as ONNX or OpenVINO IR, into a Triton model repository.

The graph is :class:`app.export.graph.ExplainedViT`, traced in float32 on the CPU with a dynamic
batch dimension; the OpenVINO IR is converted from the ONNX file (weights kept in float32). The
metadata of :func:`app.export.repository.metadata` is embedded in the model (ONNX ``metadata_props``,
OpenVINO ``rt_info`` under ``reciprocam``) and written beside it as ``metadata.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.engine.models import LoadedModel
from app.engine.options import CamOptions
from app.export.graph import ExplainedViT, ExportError
from app.export.repository import (
    FORMATS,
    METADATA_FILE,
    MODEL_FILES,
    TARGETS_SUFFIX,
    ExportedSignature,
    embedded_properties,
    metadata,
    model_name,
    triton_config,
)

logger = logging.getLogger(__name__)

EXPORTERS: tuple[str, ...] = ("torchscript", "dynamo")
DEFAULT_OPSET = 17
RT_INFO_SECTION = "reciprocam"


@dataclass(frozen=True)
class ExportedModel:
    """One model folder of the repository: ``NAME/config.pbtxt``, ``NAME/1/model.*``, metadata."""

    name: str
    folder: Path
    files: tuple[Path, ...]
    metadata: dict[str, object]

    @property
    def model_file(self) -> Path:
        return self.files[0]


class _TopK(nn.Module):
    """``pixel_values -> logits, targets (top k), maps``."""

    def __init__(self, graph: ExplainedViT) -> None:
        super().__init__()
        self.explained = graph  # not "graph": torch.fx's GraphModule reserves that attribute

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = self.explained(pixel_values)
        return outputs


class _Targets(nn.Module):
    """``pixel_values, targets -> logits, maps`` (the targets are the caller's own)."""

    def __init__(self, graph: ExplainedViT) -> None:
        super().__init__()
        self.explained = graph  # not "graph": torch.fx's GraphModule reserves that attribute

    def forward(self, pixel_values: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _, maps = self.explained(pixel_values, targets)
        return logits, maps


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress and warn about timm's shape assertions (the input size is fixed
    by design): keep that out of the command's output."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield


def export_onnx(
    graph: ExplainedViT,
    path: Path,
    *,
    with_targets: bool,
    exporter: str = "torchscript",
    opset: int = DEFAULT_OPSET,
    properties: dict[str, str] | None = None,
) -> Path:
    """Write ``graph`` (one of its two signatures) as an ONNX file with a dynamic batch dimension."""
    import onnx

    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; expected one of {', '.join(EXPORTERS)}")
    height, width = (int(v) for v in graph.model.patch_embed.img_size)
    # batch 2, not 1: torch.export specialises dimensions of size 1
    pixels = torch.zeros(2, 3, height, width)
    classes = min(2, graph.num_classes)
    # in eval mode: the exporter restores the wrapper's mode afterwards, and a new module's is train
    module: nn.Module = (_Targets(graph) if with_targets else _TopK(graph)).eval()
    inputs: tuple[torch.Tensor, ...] = (
        (pixels, torch.zeros(2, classes, dtype=torch.long)) if with_targets else (pixels,)
    )
    input_names = ["pixel_values", "targets"] if with_targets else ["pixel_values"]
    output_names = ["logits", "maps"] if with_targets else ["logits", "targets", "maps"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet(), torch.no_grad():
        if exporter == "torchscript":
            axes: dict[str, dict[int, str]] = {name: {0: "batch"} for name in (*input_names, *output_names)}
            if with_targets:
                axes["targets"] = {0: "batch", 1: "classes"}
                axes["maps"] = {0: "batch", 1: "classes"}
            torch.onnx.export(
                module,
                inputs,
                str(path),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
        else:
            batch = torch.export.Dim("batch", min=1, max=65536)
            shapes: dict[str, dict[int, object]] = {"pixel_values": {0: batch}}
            if with_targets:
                shapes["targets"] = {0: batch, 1: torch.export.Dim("classes", min=1, max=65536)}
            program = torch.onnx.export(
                module,
                inputs,
                None,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=shapes,
                opset_version=max(opset, 18),
                dynamo=True,
                external_data=False,
            )
            assert program is not None
            program.save(str(path), external_data=False)
    model = onnx.load(str(path))
    if properties:
        onnx.helper.set_model_props(model, properties)
    model.doc_string = "ViT-ReciproCAM: predictions and saliency maps in one graph"
    onnx.save(model, str(path))
    return path


def onnx_to_openvino(onnx_path: Path, xml_path: Path, properties: dict[str, str] | None = None) -> Path:
    """Convert an ONNX file to OpenVINO IR (``.xml`` + ``.bin``, float32 weights) with ``properties`` in
    its ``rt_info``."""
    import openvino as ov

    # the ONNX frontend as it is (convert_model's offline passes take ten times longer, and the
    # runtime optimises the graph when it compiles it anyway)
    model = ov.Core().read_model(str(onnx_path))
    for key, value in (properties or {}).items():
        model.set_rt_info(value, [RT_INFO_SECTION, key])
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return xml_path


def export_model(
    loaded: LoadedModel,
    fmt: str,
    out: Path,
    *,
    options: CamOptions = CamOptions(),
    top_k: int = 1,
    name: str | None = None,
    max_batch_size: int = 32,
    exporter: str = "torchscript",
    opset: int = DEFAULT_OPSET,
) -> list[ExportedModel]:
    """Export ``loaded`` (on the CPU, float32) as the two models ``NAME`` and ``NAME_targets`` of a Triton
    model repository in ``out``; the folders of these two models are replaced, nothing else in
    ``out`` is touched."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if max_batch_size < 1:
        raise ExportError(f"max_batch_size must be at least 1, not {max_batch_size}")
    model: Any = loaded.model  # a timm ViT, read through its attributes
    parameter = next(model.parameters())
    if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        raise ExportError(
            "export needs the model on the CPU in float32 (load it with device='cpu', dtype='fp32')"
        )
    graph = ExplainedViT(model, options, top_k=top_k).eval()
    base = model_name(name or loaded.name)
    results = []
    for with_targets in (False, True):
        graph_name = base + (TARGETS_SUFFIX if with_targets else "")
        signature = ExportedSignature(
            channels=3,
            input_size=(int(model.patch_embed.img_size[0]), int(model.patch_embed.img_size[1])),
            num_classes=graph.num_classes,
            grid=graph.grid,
            top_k=top_k,
            with_targets=with_targets,
        )
        meta = metadata(
            name=graph_name,
            arch=loaded.arch,
            weights=loaded.weights,
            fmt=fmt,
            labels=loaded.labels,
            data_config=loaded.data_config,
            options=options,
            target_block=graph.block,
            signature=signature,
            exporter=exporter,
        )
        properties = embedded_properties(meta)
        folder = out / graph_name
        if folder.exists():
            shutil.rmtree(folder)
        version = folder / "1"
        if fmt == "onnx":
            export_onnx(
                graph,
                version / "model.onnx",
                with_targets=with_targets,
                exporter=exporter,
                opset=opset,
                properties=properties,
            )
        else:
            with tempfile.TemporaryDirectory(prefix="reciprocam-export-") as scratch:
                onnx_path = export_onnx(
                    graph,
                    Path(scratch) / "model.onnx",
                    with_targets=with_targets,
                    exporter=exporter,
                    opset=opset,
                )
                onnx_to_openvino(onnx_path, version / "model.xml", properties)
        (folder / "config.pbtxt").write_text(
            triton_config(graph_name, fmt, signature, max_batch_size=max_batch_size), encoding="utf-8"
        )
        (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        files = tuple(version / file for file in MODEL_FILES[fmt])
        logger.info("exported %s to %s", graph_name, folder)
        results.append(ExportedModel(graph_name, folder, files, meta))
    return results
