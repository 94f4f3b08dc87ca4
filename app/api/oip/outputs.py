"""The protocol's outputs: which the client asked for, and their encoding as JSON data or binary data."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastapi import Response

from app.api.encoding import json_bytes
from app.api.oip.errors import bad_request
from app.api.oip.schemas import (
    HEADER_LENGTH,
    OUTPUT_LOGITS,
    OUTPUT_MAPS,
    OUTPUT_PROBABILITIES,
    OUTPUT_TARGETS,
    OUTPUTS,
    InferenceOptions,
    InferenceRequest,
)
from app.serving.request import InferenceResult

_NUMPY_TYPES = {"FP32": "<f4", "INT64": "<i8"}


@dataclass
class Output:
    name: str
    binary: bool
    classification: int


def wants_maps(outputs: list[Output]) -> bool:
    return any(output.name in (OUTPUT_MAPS, OUTPUT_TARGETS) for output in outputs)


def requested_outputs(inference: InferenceRequest, options: InferenceOptions) -> list[Output]:
    if inference.outputs is None:
        return [Output(name, options.binary_data_output, 0) for name in OUTPUTS]
    if not inference.outputs:
        raise bad_request("'outputs' is empty; leave it out to receive every output")
    outputs: list[Output] = []
    for requested in inference.outputs:
        if requested.name not in OUTPUTS:
            raise bad_request(f"unknown output {requested.name!r}; outputs: {', '.join(OUTPUTS)}")
        if any(output.name == requested.name for output in outputs):
            raise bad_request(f"output {requested.name!r} is requested twice")
        parameters = requested.parameters or {}
        if "shared_memory_region" in parameters:
            raise bad_request("shared memory outputs are not supported by this server")
        binary = parameters.get("binary_data", options.binary_data_output)
        if not isinstance(binary, bool):
            raise bad_request(f"output {requested.name!r}: binary_data must be true or false")
        classification = parameters.get("classification", 0)
        if isinstance(classification, bool) or not isinstance(classification, int) or classification < 0:
            raise bad_request(f"output {requested.name!r}: classification must be a class count")
        if classification and requested.name not in (OUTPUT_LOGITS, OUTPUT_PROBABILITIES):
            raise bad_request(
                f"classification applies to {OUTPUT_LOGITS!r} and {OUTPUT_PROBABILITIES!r}, "
                f"not {requested.name!r}"
            )
        outputs.append(Output(requested.name, binary, classification))
    return outputs


def encode_response(header: dict[str, Any], result: InferenceResult, outputs: list[Output]) -> Response:
    """The response: JSON, or JSON header + binary data when an output asks for binary data."""
    arrays = _output_arrays(result, outputs)
    tensors_out: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for output in outputs:
        array, datatype = arrays[output.name]
        if output.classification:
            array, datatype = _classification(array, output.classification, result.labels), "BYTES"
        entry: dict[str, Any] = {"name": output.name, "datatype": datatype, "shape": list(array.shape)}
        if output.binary:
            data = _serialize(array, datatype)
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = _json_data(array, datatype)
        tensors_out.append(entry)
    header["outputs"] = tensors_out
    head = json_bytes(header)
    if not chunks:
        return Response(head, media_type="application/json")
    return Response(
        b"".join([head, *chunks]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
    )


def _output_arrays(result: InferenceResult, outputs: list[Output]) -> dict[str, tuple[np.ndarray, str]]:
    logits = torch.stack([image.logits.float() for image in result.images])
    arrays: dict[str, tuple[np.ndarray, str]] = {
        OUTPUT_LOGITS: (logits.numpy(), "FP32"),
        OUTPUT_PROBABILITIES: (logits.softmax(-1).numpy(), "FP32"),
    }
    if wants_maps(outputs):
        maps, classes = [], []
        for image in result.images:
            if image.maps is None:
                raise RuntimeError("the engine returned no maps for an explained image")
            maps.append(torch.stack([entry.values for entry in image.maps]))
            classes.append(torch.tensor([entry.class_id for entry in image.maps], dtype=torch.long))
        arrays[OUTPUT_MAPS] = (torch.stack(maps).numpy(), "FP32")
        arrays[OUTPUT_TARGETS] = (torch.stack(classes).numpy(), "INT64")
    return arrays


def _classification(array: np.ndarray, count: int, labels: list[str]) -> np.ndarray:
    """The classification extension: the ``count`` highest values of each row as "score:index:label"."""
    count = min(count, array.shape[-1])
    rows = []
    for row in array.reshape(-1, array.shape[-1]):
        order = np.argsort(-row, kind="stable")[:count]
        rows.append(
            [
                f"{float(row[index]):f}:{int(index)}" + (f":{labels[index]}" if index < len(labels) else "")
                for index in order
            ]
        )
    return np.array(rows, dtype=object).reshape(*array.shape[:-1], count)


def _serialize(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for element in array.ravel():
            encoded = element if isinstance(element, bytes) else str(element).encode("utf-8")
            parts.append(struct.pack("<I", len(encoded)))
            parts.append(encoded)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=_NUMPY_TYPES[datatype]).tobytes()


def _json_data(array: np.ndarray, datatype: str) -> list[Any]:
    if datatype == "BYTES":
        return [str(element) for element in array.ravel()]
    values: list[Any] = array.ravel().tolist()
    if datatype == "FP32" and not np.isfinite(array).all():
        return [value if math.isfinite(value) else None for value in values]
    return values
