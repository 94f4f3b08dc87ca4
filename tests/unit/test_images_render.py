import io

import numpy as np
import pytest
from PIL import Image

from app.api.errors import status_of
from app.serving.images import ImageDecodeError, decode, decode_image
from app.serving.render import (
    colormap_lut,
    heatmap_picture,
    heatmap_png,
    heatmap_rgb,
    jpeg_bytes,
    overlay_rgb,
    png_bytes,
    rgb_picture,
    to_uint8,
)
from tests.helpers import photo_like


def _encode(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_decode_modes_to_rgb():
    rgba = Image.new("RGBA", (4, 3), (10, 20, 30, 0))
    out = decode_image(_encode(rgba, "PNG"))
    assert out.mode == "RGB" and out.size == (4, 3) and out.getpixel((0, 0)) == (255, 255, 255)
    gray16 = Image.fromarray(np.full((3, 5), 65535, dtype=np.uint16))
    assert decode_image(_encode(gray16, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))
    assert decode_image(_encode(cmyk, "JPEG")).mode == "RGB"


def test_exif_orientation_applied():
    image = Image.new("RGB", (6, 2), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    decoded = decode_image(_encode(image, "JPEG", exif=exif))
    assert decoded.size == (2, 6)


def test_large_jpeg_is_decoded_at_a_reduced_scale_with_its_full_size_kept():
    data = _encode(photo_like(1600, 1200), "JPEG", quality=90)
    asked = []

    def need(size):
        asked.append(size)
        return (200, 150)

    decoded = decode(data, min_size=need)
    assert asked == [(1600, 1200)]
    assert decoded.original_size == (1600, 1200)
    assert decoded.image.size == (200, 150) and decoded.image.mode == "RGB"  # 1/8 scale
    full = decode(data)
    assert full.image.size == (1600, 1200) and full.original_size == (1600, 1200)
    # the reduced decode is a good downscale of the full one
    reference = np.asarray(full.image.resize((200, 150), Image.Resampling.BOX), dtype=np.float64)
    assert np.abs(np.asarray(decoded.image, dtype=np.float64) - reference).mean() < 2.0
    # less than twice the needed size: decoded whole
    assert decode(data, min_size=lambda size: (900, 700)).image.size == (1600, 1200)
    # a reduction to 1/2 or 1/4 when 1/8 would go below the needed size
    assert decode(data, min_size=lambda size: (400, 300)).image.size == (400, 300)
    assert decode(data, min_size=lambda size: (500, 300)).image.size == (800, 600)


def test_reduced_decode_only_for_jpeg_and_follows_exif_orientation():
    png = _encode(photo_like(640, 480), "PNG")
    assert decode(png, min_size=lambda size: (40, 30)).image.size == (640, 480)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    data = _encode(photo_like(1600, 1200), "JPEG", exif=exif)
    asked = []

    def need(size):
        asked.append(size)
        return (150, 200)

    decoded = decode(data, min_size=need)
    assert asked == [(1200, 1600)]  # the upright size
    assert decoded.original_size == (1200, 1600)
    assert decoded.image.size == (150, 200)  # reduced, then turned upright


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_full_size_is_upright_whether_or_not_the_decode_is_reduced(fmt):
    """A stored-landscape image shown portrait (EXIF 6): the reported full size is the upright one on
    every path: whole decode, a format that is never reduced, and a JPEG too small to reduce."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(photo_like(640, 448), fmt, exif=exif)
    for min_size in (None, lambda size: (300, 300)):  # 448 < 2 x 300: never reduced
        decoded = decode(data, min_size=min_size)
        assert decoded.image.size == (448, 640), (fmt, min_size)
        assert decoded.original_size == (448, 640), (fmt, min_size)


def test_mpo_first_frame_is_decoded_reduced():
    first, second = photo_like(1600, 1200), photo_like(1600, 1200, seed=1)
    buffer = io.BytesIO()
    first.save(buffer, format="MPO", save_all=True, append_images=[second])
    decoded = decode(buffer.getvalue(), min_size=lambda size: (200, 150))
    assert decoded.original_size == (1600, 1200) and decoded.image.size == (200, 150)
    reference = np.asarray(first.resize((200, 150), Image.Resampling.BOX), dtype=np.float64)
    assert np.abs(np.asarray(decoded.image, dtype=np.float64) - reference).mean() < 4.0


def test_rejections():
    with pytest.raises(ImageDecodeError) as empty:
        decode_image(b"")
    assert empty.value.code == "empty_image"
    with pytest.raises(ImageDecodeError) as text:
        decode_image(b"<html>hello</html>")
    assert text.value.code == "unsupported_image"
    png = _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    with pytest.raises(ImageDecodeError) as big:
        decode_image(png, max_pixels=100)
    assert status_of(big.value) == 413
    jpeg = _encode(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG"
    )
    with pytest.raises(ImageDecodeError) as cut:
        decode_image(jpeg[: len(jpeg) // 2])
    assert cut.value.code == "corrupt_image"


def test_colormaps_and_overlay():
    for name in ("jet", "viridis", "inferno", "gray"):
        lut = colormap_lut(name)
        assert lut.shape == (256, 3) and lut.dtype == np.uint8
    assert tuple(colormap_lut("gray")[255]) == (255, 255, 255)
    assert int(colormap_lut("jet")[0, 2]) > 100 and int(colormap_lut("jet")[255, 0]) > 100
    heat = heatmap_rgb(np.array([[0.0, 1.0]]), "gray")
    assert heat.tolist() == [[[0, 0, 0], [255, 255, 255]]]
    image = np.zeros((1, 2, 3), dtype=np.uint8)
    blended = overlay_rgb(image, np.array([[0.0, 1.0]]), colormap="gray", opacity=0.5)
    assert blended.tolist() == [[[0, 0, 0], [128, 128, 128]]]
    with pytest.raises(ValueError):
        colormap_lut("rainbow")
    decoded = Image.open(io.BytesIO(png_bytes(heat)))
    assert decoded.size == (2, 1) and decoded.mode == "RGB"


@pytest.mark.parametrize("colormap", ["jet", "viridis", "inferno", "gray"])
def test_heatmap_png_decodes_to_the_rgb_heatmap(colormap):
    rng = np.random.default_rng(4)
    values = rng.random((37, 53))
    values[0, 0], values[-1, -1] = 0.0, 1.0
    data = heatmap_png(values, colormap)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "PNG" and decoded.mode == "P" and decoded.size == (53, 37)
    # the indices are floor(255 * map); the colours are exactly the RGB heatmap's
    np.testing.assert_array_equal(np.asarray(decoded), np.floor(values * 255).astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")), heatmap_rgb(values, colormap))
    # one byte per pixel: smaller than the RGB encoding of the same picture
    assert len(data) < len(png_bytes(heatmap_rgb(values, colormap)))
    # already computed 8-bit levels give the same file
    assert heatmap_png(to_uint8(values), colormap) == data
    with pytest.raises(ValueError):
        heatmap_png(np.zeros((2, 2, 3)))


def test_bad_input_corpus_is_rejected_with_the_right_status():
    from tests.bad_inputs import corpus

    names = []
    for bad in corpus():
        with pytest.raises(ImageDecodeError) as info:
            decode_image(bad.data)
        assert status_of(info.value) == bad.expected_status, bad.name
        names.append(bad.name)
    assert "png-bomb-20000x20000" in names and len(names) >= 20


def test_the_configured_pixel_limit_holds_both_ways():
    """``max_pixels`` alone decides, from the header: an image over it is refused with the service's
    own message (not Pillow's fixed decompression-bomb limit of 89/179 Mpx), and a limit set above
    Pillow's lets such an image through to decoding (here: it then fails as the empty image it is)."""
    from tests.bad_inputs import png_header

    with pytest.raises(ImageDecodeError) as refused:
        decode(png_header(20_000, 20_000), max_pixels=40_000_000)
    assert refused.value.code == "too_many_pixels" and status_of(refused.value) == 413
    assert "20000x20000 = 400000000 pixels" in str(refused.value)
    with pytest.raises(ImageDecodeError) as undecodable:
        decode(png_header(10_000, 10_000), max_pixels=200_000_000)
    assert undecodable.value.code == "corrupt_image" and status_of(undecodable.value) == 400


def test_only_the_accepted_formats_are_parsed():
    """A format left out of ``allowed_formats`` is not even parsed: refused as unsupported."""
    data = _encode(Image.new("RGB", (4, 4)), "BMP")
    assert decode(data).image.size == (4, 4)
    with pytest.raises(ImageDecodeError) as refused:
        decode(data, allowed_formats=frozenset({"PNG", "JPEG"}))
    assert refused.value.code == "unsupported_image" and "JPEG, PNG" in str(refused.value)


def test_every_allowed_format_decodes():
    from tests.bad_inputs import FORMATS, encode, sample_image

    image = sample_image(3)
    for fmt in FORMATS:
        decoded = decode_image(encode(image, fmt))
        assert decoded.size == image.size and decoded.mode == "RGB", fmt


@pytest.mark.parametrize(
    ("mode", "fmt", "fill", "expected"),
    [
        ("L", "PNG", 128, (128, 128, 128)),
        ("LA", "PNG", (128, 0), (255, 255, 255)),  # fully transparent: the white background
        ("LA", "PNG", (40, 255), (40, 40, 40)),
        ("1", "PNG", 1, (255, 255, 255)),
        ("P", "GIF", 3, None),
        ("RGBA", "WEBP", (200, 10, 10, 255), None),
        ("RGBA", "PNG", (200, 10, 10, 0), (255, 255, 255)),
        ("CMYK", "TIFF", (0, 255, 255, 0), (255, 0, 0)),
        ("I;16", "TIFF", 32768, (128, 128, 128)),
        ("I", "TIFF", 7, (255, 255, 255)),
        ("F", "TIFF", 0.5, (0, 0, 0)),
        ("RGB", "BMP", (1, 2, 3), (1, 2, 3)),
    ],
)
def test_every_colour_mode_becomes_8_bit_rgb(mode, fmt, fill, expected):
    decoded = decode_image(_encode(Image.new(mode, (5, 4), fill), fmt))
    assert decoded.mode == "RGB" and decoded.size == (5, 4)
    if expected is not None:
        pixel = decoded.getpixel((2, 2))
        assert all(abs(a - b) <= 1 for a, b in zip(pixel, expected, strict=True)), pixel


def test_palette_transparency_and_animated_gif_first_frame():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    decoded = decode_image(_encode(palette, "PNG", transparency=0))
    assert decoded.getpixel((0, 0)) == (255, 255, 255)  # the transparent index shows the background
    frames = [Image.new("RGB", (6, 6), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    first = decode_image(buffer.getvalue())
    red, green, blue = first.getpixel((3, 3))
    assert red > 200 and green < 50 and blue < 50


def test_json_bytes_writes_numpy_maps_as_nested_rows():
    import json

    from app.api.encoding import json_bytes

    values = np.random.default_rng(5).random((3, 4)).round(6)
    body = {"map": values, "label": "café", "numbers": [1, 2.5, None], "nested": {"ok": True}}
    decoded = json.loads(json_bytes(body))
    assert decoded == {
        "map": values.tolist(),
        "label": "café",
        "numbers": [1, 2.5, None],
        "nested": {"ok": True},
    }
    assert json_bytes({"a": 1}) == b'{"a":1}'  # compact


def test_request_headers_give_upright_sizes_and_leave_other_errors_to_decoding():
    from app.serving.images import ALLOWED_FORMATS, ImageDecodeError
    from app.serving.prepare import read_headers

    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    turned = io.BytesIO()
    Image.new("RGB", (40, 30)).save(turned, format="JPEG", exif=exif)
    plain = io.BytesIO()
    Image.new("RGB", (40, 30)).save(plain, format="PNG")
    headers = read_headers(
        [turned.getvalue(), plain.getvalue(), b"not an image", b""], 10**6, ALLOWED_FORMATS
    )
    assert [header.upright_size if header else None for header in headers] == [(30, 40), (40, 30), None, None]
    assert headers[0] is not None and (headers[0].format, headers[0].orientation) == ("JPEG", 6)
    with pytest.raises(ImageDecodeError) as refused:  # over the pixel limit: refused here, with its index
        read_headers([plain.getvalue(), turned.getvalue()], 1000, ALLOWED_FORMATS)
    assert (refused.value.code, refused.value.index) == ("too_many_pixels", 0)


def test_request_headers_never_decode_pixels():
    """The header is enough, whatever the declared size: a PNG that declares 20000x20000 pixels and
    holds none gets its size (decoding it, to look for EXIF after the pixels, would allocate 400 MB
    and then fail), and a format left out of the accepted ones is not parsed at all."""
    from app.serving.prepare import read_headers
    from tests.bad_inputs import png_header

    bmp = _encode(Image.new("RGB", (5, 3)), "BMP")
    big, small = read_headers([png_header(20_000, 20_000), bmp], 10**9, frozenset({"PNG", "BMP"}))
    assert big is not None and big.upright_size == (20_000, 20_000)
    assert small is not None and small.upright_size == (5, 3)
    assert read_headers([bmp], 10**9, frozenset({"PNG"})) == [None]


def test_overlay_and_uint8_maps_in_row_blocks_equal_the_whole_array_formula(monkeypatch):
    """Large maps are converted in blocks of rows (small float temporaries): the result equals the
    formula applied to the whole array, for block boundaries that do not divide the height."""
    from app.serving import render

    monkeypatch.setattr(render, "_BLOCK_PIXELS", 50)  # blocks of 3 rows for a width of 17
    rng = np.random.default_rng(9)
    image = rng.integers(0, 256, (23, 17, 3), dtype=np.uint8)
    values = rng.random((23, 17)).astype(np.float32)
    values[0, 0], values[-1, -1] = -0.5, 1.5  # clipped
    expected_uint8 = np.floor(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)
    np.testing.assert_array_equal(render.to_uint8(values), expected_uint8)
    for opacity in (0.0, 0.3, 1.0):
        colours = render.colormap_lut("viridis")[expected_uint8].astype(np.float32)
        blended = (1.0 - opacity) * image.astype(np.float32) + opacity * colours
        expected = np.clip(np.round(blended), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(
            render.overlay_rgb(image, values, colormap="viridis", opacity=opacity), expected
        )


def test_jpeg_heatmaps_and_overlays_decode_close_to_their_exact_pixels():
    ys, xs = np.mgrid[0:40, 0:56]
    normalized = (np.sin(xs / 9.0) * np.cos(ys / 7.0) + 1.0) / 2.0  # a smooth map, as saliency maps are
    levels = to_uint8(normalized)
    heatmap = Image.open(io.BytesIO(heatmap_picture(levels, "viridis", "jpeg", quality=90)))
    assert (heatmap.format, heatmap.mode, heatmap.size) == ("JPEG", "RGB", (56, 40))
    exact = heatmap_rgb(normalized, "viridis").astype(int)
    assert np.abs(np.asarray(heatmap).astype(int) - exact).mean() < 3
    assert Image.open(io.BytesIO(heatmap_picture(levels, "viridis", "png"))).format == "PNG"
    base = np.asarray(photo_like(56, 40, seed=2).convert("RGB"))
    overlay = overlay_rgb(base, normalized, colormap="jet", opacity=0.5)
    small = Image.open(io.BytesIO(rgb_picture(overlay, "jpeg", quality=20)))
    fine = Image.open(io.BytesIO(rgb_picture(overlay, "jpeg", quality=95)))
    assert small.format == fine.format == "JPEG" and small.size == fine.size == (56, 40)
    error_small = np.abs(np.asarray(small).astype(int) - overlay).mean()
    error_fine = np.abs(np.asarray(fine).astype(int) - overlay).mean()
    assert error_fine < error_small and error_fine < 6  # the photo's noise, halved chroma
    with pytest.raises(ValueError, match="unknown picture format 'gif'"):
        rgb_picture(overlay, "gif")


def test_the_host_and_tensor_jpeg_encoders_write_the_same_bytes_on_the_cpu():
    import torch

    from app.serving.device_render import encode_images

    overlay = np.asarray(photo_like(48, 32, seed=5).convert("RGB"))
    tensor = torch.from_numpy(overlay.copy()).permute(2, 0, 1)
    for quality in (40, 90):
        (encoded,) = encode_images([tensor], "jpeg", quality=quality)
        assert encoded == jpeg_bytes(overlay, quality=quality)
