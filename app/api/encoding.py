"""Wire encodings shared by the protocols: base64 images in, compact JSON out."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson

from app.serving.errors import ServiceError


def json_bytes(content: Any) -> bytes:
    """A response body as compact UTF-8 JSON (orjson; numpy arrays are written as nested lists)."""
    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def decode_base64(text: str, index: int) -> bytes:
    payload = text.strip()
    if payload.startswith("data:"):
        header, _, payload = payload.partition(",")
        if ";base64" not in header:
            raise ServiceError("invalid_base64", f"image {index}: only base64 data URLs are accepted")
    payload = "".join(payload.split())
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServiceError("invalid_base64", f"image {index}: the data is not valid base64 ({exc})") from exc
