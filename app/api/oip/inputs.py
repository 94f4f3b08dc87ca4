"""The protocol's inputs: ``image`` (BYTES, encoded files) or ``pixel_values`` (FP32, preprocessed)."""

from __future__ import annotations

import math

import numpy as np
import torch

from app.api.oip.errors import OipError, bad_request
from app.api.oip.framing import bytes_from_json, shape_size, split_bytes
from app.api.oip.schemas import INPUT_BYTES, INPUT_TENSOR, MAX_PIXEL_VALUE, RequestInput
from app.serving.model_card import ServedModel
from app.serving.request import EncodedImages, PixelTensors


def read_images(
    tensor: RequestInput, raw: bytes | None, loaded: ServedModel, max_images: int
) -> EncodedImages | PixelTensors:
    """The images of the request's one input (``raw``: its binary data, None when in JSON)."""
    if tensor.name == INPUT_BYTES:
        return _encoded_files(tensor, raw, max_images)
    if tensor.name == INPUT_TENSOR:
        return _pixel_tensors(tensor, raw, loaded, max_images)
    raise bad_request(
        f"unknown input {tensor.name!r}; this model takes {INPUT_BYTES!r} (BYTES, encoded "
        f"image files) or {INPUT_TENSOR!r} (FP32 [N, 3, H, W])"
    )


def _encoded_files(tensor: RequestInput, raw: bytes | None, max_images: int) -> EncodedImages:
    if tensor.datatype != "BYTES":
        raise bad_request(f"input {INPUT_BYTES!r} must have datatype BYTES, not {tensor.datatype!r}")
    shape = tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise bad_request(f"input {INPUT_BYTES!r} must have shape [N] (or [N, 1]), not {shape}")
    count = shape_size(shape, INPUT_BYTES)
    if count < 1:
        raise bad_request(f"input {INPUT_BYTES!r} holds no image")
    if count > max_images:
        raise OipError(413, f"{count} images in one request; the limit is {max_images}")
    files = split_bytes(raw, count) if raw is not None else bytes_from_json(tensor.data, count)
    return EncodedImages(files)


def _pixel_tensors(
    tensor: RequestInput, raw: bytes | None, loaded: ServedModel, max_images: int
) -> PixelTensors:
    if tensor.datatype != "FP32":
        raise bad_request(f"input {INPUT_TENSOR!r} must have datatype FP32, not {tensor.datatype!r}")
    height, width = (int(v) for v in loaded.data_config.input_size[-2:])
    shape = tensor.shape
    if len(shape) != 4 or shape[1] != 3 or shape[2] != height or shape[3] != width:
        raise bad_request(
            f"input {INPUT_TENSOR!r} must have shape [N, 3, {height}, {width}] for this model, not {shape}"
        )
    count = shape[0]
    if count < 1:
        raise bad_request(f"input {INPUT_TENSOR!r} holds no image")
    if count > max_images:
        raise OipError(413, f"{count} images in one request; the limit is {max_images}")
    expected = math.prod(shape)
    if raw is not None:
        if len(raw) != 4 * expected:
            raise bad_request(
                f"input {INPUT_TENSOR!r}: shape {shape} needs {4 * expected} bytes of FP32 data, got {len(raw)}"
            )
        array = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    else:
        try:
            array = np.asarray(tensor.data, dtype=np.float32)
        except (ValueError, TypeError, OverflowError) as exc:
            raise bad_request(f"input {INPUT_TENSOR!r}: 'data' is not a list of numbers ({exc})") from exc
        if array.size != expected:
            raise bad_request(
                f"input {INPUT_TENSOR!r}: shape {shape} needs {expected} values, 'data' holds {array.size}"
            )
    if not np.isfinite(array).all():
        raise bad_request(f"input {INPUT_TENSOR!r} holds NaN or infinite values")
    if array.size and float(np.abs(array).max()) > MAX_PIXEL_VALUE:
        raise bad_request(
            f"input {INPUT_TENSOR!r} holds values beyond +-{MAX_PIXEL_VALUE:g}: it takes normalised pixels "
            "(a few units at most), and values this large only make the model's outputs overflow"
        )
    images = torch.from_numpy(array.reshape(shape).copy())
    return PixelTensors(list(images.unbind(0)))
