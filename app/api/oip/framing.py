"""The protocol's wire framing: compressed bodies, the JSON header and its binary data, and BYTES
elements (4-byte little-endian length, then the bytes; or base64 in JSON)."""

from __future__ import annotations

import json
import math
import struct
import zlib
from typing import Any

from pydantic import ValidationError

from app.api.encoding import decode_base64
from app.api.errors import describe_validation_errors
from app.api.oip.errors import OipError, bad_request
from app.api.oip.schemas import HEADER_LENGTH, InferenceOptions, InferenceRequest, RequestInput
from app.serving.errors import ServiceError


def parse_body(
    body: bytes, content_encoding: str, declared: str | None, max_bytes: int
) -> tuple[InferenceRequest, InferenceOptions, bytes]:
    """The validated request, its options, and the binary data after the JSON header (empty without
    the binary extension)."""
    encoding = content_encoding.strip().lower()
    if encoding in ("gzip", "deflate"):
        body = decompress(body, encoding, max_bytes)
    elif encoding not in ("", "identity"):
        raise OipError(415, f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    if not body:
        raise bad_request("the request body is empty; send an inference request JSON object")
    if declared is None:
        header, binary = body, b""
    else:
        digits = declared.strip()
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 20) or not 0 < int(digits) <= len(
            body
        ):
            raise bad_request(
                f"{HEADER_LENGTH} {declared!r} must be a positive byte count no larger than the body "
                f"({len(body)} bytes)"
            )
        length = int(digits)
        header, binary = body[:length], body[length:]
    try:
        document = json.loads(header)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise bad_request(f"the inference request header is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise bad_request("the inference request header is nested too deeply") from exc
    if not isinstance(document, dict):
        raise bad_request("the inference request must be a JSON object with an 'inputs' list")
    try:
        inference = InferenceRequest.model_validate(document)
        options = InferenceOptions.model_validate(inference.parameters or {})
    except ValidationError as exc:
        raise bad_request(describe_validation_errors(list(exc.errors()))) from exc
    return inference, options, binary


def decompress(body: bytes, encoding: str, max_bytes: int) -> bytes:
    decoder = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = decoder.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise bad_request(f"the body is not valid {encoding} data: {exc}") from exc
    if len(data) > max_bytes or decoder.unconsumed_tail:
        raise OipError(413, f"the decompressed body is larger than the limit of {max_bytes} bytes")
    return data


def binary_inputs(inputs: list[RequestInput], binary: bytes) -> list[bytes | None]:
    """Each input's slice of the binary data, in input order (None for inputs with JSON data)."""
    slices: list[bytes | None] = []
    offset = 0
    for tensor in inputs:
        parameters = tensor.parameters or {}
        if "shared_memory_region" in parameters:
            raise bad_request("shared memory inputs are not supported by this server")
        size = parameters.get("binary_data_size")
        if size is None:
            if tensor.data is None:
                raise bad_request(f"input {tensor.name!r} has neither 'data' nor binary data")
            slices.append(None)
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise bad_request(f"input {tensor.name!r}: binary_data_size must be a byte count")
        if offset + size > len(binary):
            raise bad_request(
                f"input {tensor.name!r} declares {size} bytes of binary data, but only "
                f"{len(binary) - offset} follow the JSON header"
            )
        slices.append(binary[offset : offset + size])
        offset += size
    if offset != len(binary):
        raise bad_request(
            f"{len(binary) - offset} bytes after the JSON header belong to no input "
            f"(check {HEADER_LENGTH} and binary_data_size)"
        )
    return slices


def shape_size(shape: list[int], name: str) -> int:
    if any(dim < 0 for dim in shape):
        raise bad_request(f"input {name!r}: shape {shape} has a negative dimension")
    return math.prod(shape)


def split_bytes(raw: bytes, count: int) -> list[bytes]:
    """BYTES elements of the binary extension: each a 4-byte little-endian length, then the bytes."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise bad_request("BYTES data ends inside an element's 4-byte length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise bad_request(
                f"BYTES element {len(elements)} declares {length} bytes, but only {len(raw) - offset} remain"
            )
        elements.append(raw[offset : offset + length])
        offset += length
    if len(elements) != count:
        raise bad_request(f"the shape says {count} BYTES elements, but the binary data holds {len(elements)}")
    return elements


def bytes_from_json(data: Any, count: int) -> list[bytes]:
    flat = flatten(data)
    if len(flat) != count:
        raise bad_request(f"the shape says {count} BYTES elements, but 'data' holds {len(flat)}")
    files = []
    for index, element in enumerate(flat):
        if isinstance(element, dict) and isinstance(element.get("b64"), str):
            element = element["b64"]
        if not isinstance(element, str):
            raise bad_request(
                f"BYTES element {index} must be the image file in base64 (a string or {{'b64': ...}})"
            )
        try:
            files.append(decode_base64(element, index))
        except ServiceError as exc:
            raise bad_request(exc.message) from exc
    return files


def flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for element in stack[-1]:
            if isinstance(element, list):
                stack.append(iter(element))
                break
            flat.append(element)
        else:
            stack.pop()
    return flat
