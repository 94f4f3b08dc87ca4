"""The service's PNG writer: 8-bit grayscale, RGB and palette pictures.

Every row is stored with PNG's Sub filter (each byte as its difference from the same channel of the
pixel to its left) and deflated at the fastest level. Saliency maps and their heatmaps are smooth,
so the differences are mostly small and repeat, and deflate into a smaller file, sooner, than the
raw values; writing it takes a few array operations rather than an image library's encoder
(docs/benchmarks.md, "Encoding maps"). The fastest level is ISA-L's deflate (the ``isal`` package)
where it is installed: several times faster than zlib's level 1, for files of about the same size;
zlib otherwise.
"""

from __future__ import annotations

import struct
import zlib
from types import ModuleType

import numpy as np

_isal: ModuleType | None
try:
    from isal import isal_zlib as _isal
except ImportError:  # a platform without its wheels: zlib does the same job, slower
    _isal = None

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SUB_FILTER = 1
_GRAY, _RGB, _PALETTE = 0, 2, 3  # PNG colour types


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def deflate(data: memoryview | bytes, level: int = 1) -> bytes:
    """``data`` as a zlib stream: level 1 (the fastest) with ISA-L where it is installed, any other
    level (0-9) with zlib."""
    if level == 1 and _isal is not None:
        deflated: bytes = _isal.compress(data, 1)
        return deflated
    return zlib.compress(data, level)


def encode_png(pixels: np.ndarray, *, palette: bytes | None = None, compress_level: int = 1) -> bytes:
    """(H, W) uint8 grayscale, or palette indices with ``palette`` (its RGB triples, 256 at most),
    or (H, W, 3) uint8 RGB -> PNG bytes. ``compress_level``: see :func:`deflate`."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"a PNG here holds uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 2:
        channels, colour_type = 1, (_GRAY if palette is None else _PALETTE)
    elif pixels.ndim == 3 and pixels.shape[2] == 3 and palette is None:
        channels, colour_type = 3, _RGB
    else:
        raise ValueError(f"expected (H, W) or (H, W, 3) pixels, got shape {pixels.shape}")
    if palette is not None and (not palette or len(palette) % 3 or len(palette) > 3 * 256):
        raise ValueError(f"a palette holds 1 to 256 RGB triples, got {len(palette)} bytes")
    height, width = pixels.shape[:2]
    if height < 1 or width < 1:
        raise ValueError("a PNG has at least one pixel")
    samples = pixels.reshape(height, width * channels)
    rows = np.empty((height, width * channels + 1), dtype=np.uint8)
    rows[:, 0] = _SUB_FILTER
    rows[:, 1 : 1 + channels] = samples[:, :channels]
    np.subtract(samples[:, channels:], samples[:, :-channels], out=rows[:, 1 + channels :])  # mod 256
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    chunks = [_SIGNATURE, _chunk(b"IHDR", header)]
    if palette is not None:
        chunks.append(_chunk(b"PLTE", palette))
    chunks += [_chunk(b"IDAT", deflate(rows.data, compress_level)), _chunk(b"IEND", b"")]
    return b"".join(chunks)
