"""The service's PNG writer: what it writes decodes (with Pillow, which checks every chunk's CRC) to
exactly the pixels given, for every colour type and edge shape, and smooth maps come out smaller
than an unfiltered PNG of the same pixels."""

import io
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from app.serving import png
from app.serving.png import deflate, encode_png
from app.serving.render import colormap_lut


@pytest.fixture(autouse=True, params=["isal", "zlib"])
def deflater(request, monkeypatch):
    """Every test with ISA-L's deflate (where installed) and with zlib's, the fallback."""
    if request.param == "zlib":
        monkeypatch.setattr(png, "_isal", None)
    elif png._isal is None:
        pytest.skip("isal is not installed")
    return request.param


def _decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG"
    return image


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (37, 53), (64, 64)])
def test_grayscale_and_rgb_round_trip_exactly(shape):
    rng = np.random.default_rng(sum(shape))
    gray = rng.integers(0, 256, size=shape, dtype=np.uint8)  # random bytes: every Sub difference wraps
    decoded = _decoded(encode_png(gray))
    assert decoded.mode == "L" and decoded.size == (shape[1], shape[0])
    np.testing.assert_array_equal(np.asarray(decoded), gray)
    rgb = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    decoded = _decoded(encode_png(rgb))
    assert decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), rgb)


def test_palette_round_trips_to_the_indices_and_colours():
    rng = np.random.default_rng(1)
    indices = rng.integers(0, 256, size=(20, 31), dtype=np.uint8)
    lut = colormap_lut("viridis")
    decoded = _decoded(encode_png(indices, palette=lut.tobytes()))
    assert decoded.mode == "P"
    np.testing.assert_array_equal(np.asarray(decoded), indices)
    np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")), lut[indices])
    # a palette of fewer colours than 256 is a valid PNG too
    few = encode_png(indices % 4, palette=lut[:4].tobytes())
    np.testing.assert_array_equal(np.asarray(_decoded(few).convert("RGB")), lut[indices % 4])


def test_a_non_contiguous_view_is_written_as_its_pixels():
    rng = np.random.default_rng(2)
    base = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    view = base[::2, 5:35]
    np.testing.assert_array_equal(np.asarray(_decoded(encode_png(view))), view)


def test_smooth_maps_are_smaller_than_unfiltered():
    levels = (
        F.interpolate(
            torch.rand(1, 1, 7, 7, generator=torch.Generator().manual_seed(0)),
            size=(224, 224),
            mode="bilinear",
        )[0, 0].numpy()
        * 255
    ).astype(np.uint8)
    ours = encode_png(levels)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG", compress_level=1)  # Pillow: no filter for L
    assert len(ours) < 0.8 * len(buffer.getvalue())
    for level in (0, 2, 9):  # any zlib level decodes the same
        np.testing.assert_array_equal(np.asarray(_decoded(encode_png(levels, compress_level=level))), levels)


@pytest.mark.parametrize(
    "pixels, palette",
    [
        (np.zeros((4, 4), dtype=np.float32), None),  # not uint8
        (np.zeros((4, 4, 4), dtype=np.uint8), None),  # RGBA is not written
        (np.zeros((4,), dtype=np.uint8), None),
        (np.zeros((4, 4, 3), dtype=np.uint8), bytes(3)),  # a palette is for (H, W) indices
        (np.zeros((0, 4), dtype=np.uint8), None),  # no pixels
        (np.zeros((4, 4), dtype=np.uint8), b""),
        (np.zeros((4, 4), dtype=np.uint8), bytes(4)),  # not whole triples
        (np.zeros((4, 4), dtype=np.uint8), bytes(3 * 257)),
    ],
)
def test_what_cannot_be_written_is_refused(pixels, palette):
    with pytest.raises(ValueError):
        encode_png(pixels, palette=palette)


def test_level_one_deflates_with_isal_where_installed(deflater):
    data = bytes(range(256)) * 64
    deflated = deflate(data)
    assert zlib.decompress(deflated) == data
    by_zlib = deflated == zlib.compress(data, 1)
    assert by_zlib == (deflater == "zlib")
    assert deflate(data, 6) == zlib.compress(data, 6)  # other levels: zlib's
