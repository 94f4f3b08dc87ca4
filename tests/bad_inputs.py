"""A corpus of hostile and broken uploads, generated on the fly (nothing binary is committed)."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


@dataclass(frozen=True)
class BadInput:
    name: str
    data: bytes
    content_type: str
    expected_status: int  # the 4xx the service must answer


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def sample_image(seed: int = 0, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid grayscale PNG of width x height black pixels: ~400 MB decoded, a few hundred KB encoded."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height grayscale pixels and holds none: its header is valid, its
    pixel data empty, so it passes or fails a pixel limit from the header and then cannot decode."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b"")


def corpus() -> Iterator[BadInput]:
    """Every broken upload with the status it must get."""
    image = sample_image()
    for fmt in FORMATS:
        data = encode(image, fmt)
        mime = f"image/{fmt.lower()}"
        yield BadInput(f"{fmt.lower()}-truncated", data[: max(8, len(data) // 3)], mime, 400)
        # Pixel data is not checksummed in most formats (a flipped JPEG byte decodes to noise, as in
        # any viewer), so the corruption hits the structures after the signature: headers and tables.
        corrupted = bytearray(data)
        for offset in range(4, min(len(corrupted), 64), 3):
            corrupted[offset] ^= 0xA5
        yield BadInput(f"{fmt.lower()}-corrupted", bytes(corrupted), mime, 400)
        yield BadInput(f"{fmt.lower()}-header-only", data[:16], mime, 400)
    yield BadInput("zero-bytes", b"", "image/png", 400)
    yield BadInput("plain-text", b"hello, this is not an image\n" * 10, "text/plain", 400)
    yield BadInput(
        "html", b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>", "text/html", 400
    )
    yield BadInput("json-as-image", b'{"images": []}', "application/json", 400)
    yield BadInput("png-bomb-20000x20000", png_bomb(), "image/png", 413)
