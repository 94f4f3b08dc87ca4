"""The tensor image path on the CPU against the Pillow path: decoding (pixels, orientation, colour
modes, error codes, pixel guards), the eval transform, map rendering and encoding, and end to end on
the shipped shapes model (top-1 agreement, map correlation)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from app.api.errors import status_of
from app.engine.maps import normalize_maps, upsample_maps
from app.engine.models import LoadedModel, load_model
from app.engine.preprocess import DataConfig, Preprocessor, project_to_original
from app.serving import render
from app.serving.device_decode import DeviceImage, decode_batch, decode_pixels, orient, read_header
from app.serving.device_preprocess import preprocess_batch
from app.serving.device_render import encode_images, heatmaps, overlays, render_maps, size_maps
from app.serving.images import ImageDecodeError, decode
from tests.bad_inputs import corpus, png_header
from tests.device_parity import compare
from tests.helpers import photo_like
from tests.image_corpus import photo_samples, shapes_samples

# torchvision 0.29 warns on every codec call (pytest resets the module's own filter per test)
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning"
)

WEIGHTS = Path(__file__).resolve().parents[2] / "app" / "weights" / "shapes_vit.safetensors"

CONFIGS = {
    "shapes": DataConfig((64, 64), "bilinear", 1.0, "center", (0.5,) * 3, (0.25,) * 3),
    "deit-like": DataConfig((112, 112), "bicubic", 0.875),
    "nonsquare": DataConfig((32, 48), "bicubic", 0.9),
    "squash": DataConfig((64, 64), "bilinear", 0.95, "squash"),
    "border": DataConfig((64, 64), "bicubic", 0.95, "border"),
    "lanczos": DataConfig((64, 64), "lanczos", 0.875),
    "box": DataConfig((64, 64), "box", 0.875),
    "nearest": DataConfig((64, 64), "nearest", 0.875),
}
EXACT = ("box", "nearest")  # box goes through Pillow; nearest picks Pillow's pixels
# (137, 440) and (300, 900): Pillow 13 runs the vertical pass first for their resizes
SIZES = [(320, 320), (640, 480), (50, 40), (30, 200), (64, 64), (100, 60), (137, 440), (300, 900)]


@pytest.fixture(scope="module")
def shapes_model() -> LoadedModel:
    return load_model(None, str(WEIGHTS), device="cpu", warmup=False)


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _hwc(pixels: torch.Tensor) -> np.ndarray:
    return pixels.permute(1, 2, 0).cpu().numpy()


def _decode_cases() -> dict[str, bytes]:
    base = photo_like(96, 64, seed=1, cell=16)
    rng = np.random.default_rng(0)
    cases: dict[str, bytes] = {}
    for mode in ("RGB", "L", "LA", "RGBA", "P", "1", "CMYK"):
        image = base.convert(mode)
        if mode in ("LA", "RGBA"):
            array = np.asarray(image).copy()
            array[..., -1] = rng.integers(0, 256, array.shape[:2])
            image = Image.fromarray(array, mode)
        for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"):
            try:
                cases[f"{mode}-{fmt}"] = _encode(image, fmt)
            except (OSError, ValueError):  # a mode the format cannot store
                continue
    cases["I;16-PNG"] = _encode(Image.fromarray(rng.integers(0, 65535, (40, 30)).astype(np.uint16)), "PNG")
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        cases[f"exif{orientation}-JPEG"] = _encode(base, "JPEG", exif=exif)
        cases[f"exif{orientation}-PNG"] = _encode(base, "PNG", exif=exif)
    return cases


def test_decoded_pixels_equal_the_pillow_decoders():
    cases = _decode_cases()
    results = decode_batch(list(cases.values()))
    for (name, data), result in zip(cases.items(), results, strict=True):
        assert isinstance(result, DeviceImage), name
        reference = decode(data)
        assert result.original_size == reference.original_size, name
        np.testing.assert_array_equal(_hwc(result.pixels), np.asarray(reference.image), err_msg=name)
        fmt = name.rsplit("-", 1)[1]
        mode = name.rsplit("-", 1)[0]
        by_torchvision = (fmt == "JPEG") or (fmt == "PNG" and mode in ("RGB", "L", "LA", "RGBA"))
        by_torchvision = by_torchvision or name.startswith("exif")
        assert (result.decoder == "torchvision") == by_torchvision, name


def test_one_image_on_the_host_has_the_pillow_decoders_pixels():
    """``decode_pixels`` (the host path with ``tensor_resize``): the Pillow decoder's pixels and size
    for every case, JPEGs through torchvision, the rest through Pillow; the same errors."""
    for name, data in _decode_cases().items():
        result = decode_pixels(data)
        reference = decode(data)
        assert result.original_size == reference.original_size, name
        np.testing.assert_array_equal(_hwc(result.pixels), np.asarray(reference.image), err_msg=name)
        assert (result.decoder == "torchvision") == name.endswith("-JPEG"), name
    truncated = _encode(photo_like(200, 150, seed=3), "JPEG")
    for data in [item.data for item in corpus()] + [truncated[: int(len(truncated) * 0.7)]]:
        with pytest.raises(ImageDecodeError) as expected:
            decode(data, max_pixels=10**6)
        with pytest.raises(ImageDecodeError) as got:
            decode_pixels(data, max_pixels=10**6)
        assert got.value.code == expected.value.code


def test_a_jpeg_reducible_on_the_host_is_decoded_reduced_by_pillow():
    """Where ``min_size`` allows a reduced scale, the JPEG goes to Pillow's reduced decode, as
    before; under twice the size asked for, it is decoded whole by torchvision."""
    data = _encode(photo_like(400, 300, seed=6), "JPEG")
    reduced = decode_pixels(data, min_size=lambda size: (100, 75))
    reference = decode(data, min_size=lambda size: (100, 75))
    assert reduced.decoder == "pillow" and reduced.pixels.shape == (3, 75, 100)  # 1/4 scale
    assert reduced.original_size == reference.original_size == (400, 300)
    np.testing.assert_array_equal(_hwc(reduced.pixels), np.asarray(reference.image))
    whole = decode_pixels(data, min_size=lambda size: (256, 192))
    assert whole.decoder == "torchvision" and whole.pixels.shape == (3, 300, 400)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_is_pillows_exif_transpose(orientation):
    image = photo_like(7, 5, seed=orientation, cell=1)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.info["exif"] = exif.tobytes()
    expected = np.asarray(ImageOps.exif_transpose(image))
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    np.testing.assert_array_equal(_hwc(orient(pixels, orientation)), expected)


def test_bad_inputs_get_the_pillow_paths_error_codes_and_their_index():
    bad = [item for item in corpus() if "bomb" not in item.name]  # the limit: test_pixel_limits...
    blobs = [item.data for item in bad]
    truncated = _encode(photo_like(200, 150, seed=3), "JPEG")
    blobs.append(truncated[: int(len(truncated) * 0.7)])  # header intact, scan cut short
    results = decode_batch(blobs)
    for index, (data, result) in enumerate(zip(blobs, results, strict=True)):
        with pytest.raises(ImageDecodeError) as expected:
            decode(data)
        assert isinstance(result, ImageDecodeError), index
        assert (result.code, status_of(result), result.index) == (
            expected.value.code,
            status_of(expected.value),
            index,
        )


def test_one_bad_image_leaves_the_others_decoded():
    good = _encode(photo_like(80, 60, seed=4), "JPEG")
    results = decode_batch([good, b"not an image", good[:200], good])
    assert isinstance(results[0], DeviceImage) and isinstance(results[3], DeviceImage)
    assert isinstance(results[1], ImageDecodeError) and results[1].code == "unsupported_image"
    assert isinstance(results[2], ImageDecodeError)
    assert torch.equal(results[0].pixels, results[3].pixels)


def test_pixel_limits_hold_from_the_header():
    header_only = png_header(5000, 5000)  # declares 25 Mpx and holds none
    assert read_header(header_only, max_pixels=30_000_000).size == (5000, 5000)
    (result,) = decode_batch([header_only], max_pixels=1_000_000)
    assert (
        isinstance(result, ImageDecodeError) and result.code == "too_many_pixels" and status_of(result) == 413
    )
    strip = _encode(Image.new("RGB", (4000, 1)), "PNG")  # resized for a 64-pixel model: 256000 x 64
    pre = Preprocessor(CONFIGS["shapes"])
    (refused,) = decode_batch([strip], max_pixels=1_000_000, preprocessor=pre)
    assert isinstance(refused, ImageDecodeError) and refused.code == "too_many_pixels"
    (accepted,) = decode_batch([strip], max_pixels=1_000_000)
    assert isinstance(accepted, DeviceImage)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_preprocessing_matches_the_pillow_preprocessor(name):
    pre = Preprocessor(CONFIGS[name])
    images = [photo_like(w, h, seed=i, cell=max(4, min(w, h) // 8)) for i, (w, h) in enumerate(SIZES)]
    tensors = [torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images]
    batch = preprocess_batch(tensors, pre)
    for image, pixels, normalised, geometry in zip(
        images, batch.pixels, batch.inputs, batch.geometries, strict=True
    ):
        reference, reference_geometry = pre.to_pixels(image)
        assert geometry == reference_geometry
        gap = np.abs(_hwc(pixels).astype(int) - reference.astype(int))
        # Pillow's fixed-point filter weights against torch's: a level, rarely two
        assert gap.max() <= (0 if name in EXACT else 2)
        assert gap.mean() < 0.05
        torch.testing.assert_close(normalised, pre.normalize(_hwc(pixels)))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_preprocessed_photos_stay_within_two_levels(interpolation):
    """Varied sizes, aspects, formats and orientations: both Pillow pass orders come up."""
    pre = Preprocessor(DataConfig((112, 112), interpolation, 0.875))
    samples = photo_samples(24, seed=3)
    reference = np.stack([pre.to_pixels(decode(s.data).image)[0] for s in samples]).astype(int)
    decoded = [item for item in decode_batch([s.data for s in samples]) if isinstance(item, DeviceImage)]
    pixels = preprocess_batch(decoded, pre).pixels.permute(0, 2, 3, 1).numpy().astype(int)
    gap = np.abs(pixels - reference)
    assert gap.max() <= 2 and gap.mean() < 0.02


def test_same_size_images_are_batched_with_the_values_of_one_by_one():
    pre = Preprocessor(CONFIGS["deit-like"])
    tensors = [torch.from_numpy(np.array(photo_like(150, 100, seed=i))).permute(2, 0, 1) for i in range(3)]
    tensors.append(torch.from_numpy(np.array(photo_like(90, 130, seed=9))).permute(2, 0, 1))
    together = preprocess_batch(tensors, pre)
    for row, tensor in enumerate(tensors):
        alone = preprocess_batch([tensor], pre)
        assert torch.equal(together.pixels[row], alone.pixels[0])
        assert together.geometries[row] == alone.geometries[0]


@pytest.mark.parametrize("map_size", ["grid", "input", "original"])
def test_rendering_equals_the_pillow_renderer(map_size):
    pre = Preprocessor(CONFIGS["deit-like"])
    geometry = pre.geometry((150, 100))
    maps = normalize_maps(torch.randn(2, 7, 7, generator=torch.Generator().manual_seed(0)))
    original = torch.randint(0, 256, (3, 100, 150), dtype=torch.uint8)
    model_input = torch.randint(0, 256, (3, 112, 112), dtype=torch.uint8)
    expected = maps
    if map_size != "grid":
        expected = upsample_maps(maps, geometry.input_size).clamp(0.0, 1.0)
    if map_size == "original":
        expected = project_to_original(expected, geometry).clamp(0.0, 1.0)
    rendered = render_maps(
        maps,
        geometry,
        encodings=("png", "heatmap", "overlay"),
        map_size=map_size,
        colormap="inferno",
        opacity=0.4,
        input_pixels=model_input,
        original=original,
    )
    assert torch.equal(rendered.maps, expected)
    base = original if map_size == "original" else model_input
    for position, pictures in enumerate(rendered.images):
        values = expected[position].numpy()
        grey = np.asarray(Image.open(io.BytesIO(pictures["png"])))
        np.testing.assert_array_equal(grey, render.to_uint8(values))
        colour = np.asarray(Image.open(io.BytesIO(pictures["heatmap"])).convert("RGB"))
        np.testing.assert_array_equal(colour, render.heatmap_rgb(values, "inferno"))
        on_base = size_maps(maps, geometry, "input")[position].numpy() if map_size == "grid" else values
        overlay = np.asarray(Image.open(io.BytesIO(pictures["overlay"])))
        np.testing.assert_array_equal(
            overlay, render.overlay_rgb(_hwc(base), on_base, colormap="inferno", opacity=0.4)
        )


@pytest.mark.parametrize("colormap", render.COLORMAPS)
def test_colour_tables_and_jpeg_output(colormap):
    maps = torch.linspace(0, 1, 256).view(1, 16, 16)
    np.testing.assert_array_equal(
        _hwc(heatmaps(maps, colormap)[0]), render.heatmap_rgb(maps[0].numpy(), colormap)
    )
    base = torch.from_numpy(np.array(photo_like(64, 48, seed=2))).permute(2, 0, 1)
    smooth = upsample_maps(maps, (48, 64))
    pictures = overlays(base, smooth, colormap=colormap)
    (data,) = encode_images(pictures, "jpeg", quality=95)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "JPEG" and decoded.size == (64, 48)
    gap = np.abs(np.asarray(decoded.convert("RGB")).astype(int) - _hwc(pictures[0]).astype(int))
    assert gap.mean() < 4.0


def test_end_to_end_agreement_on_the_shipped_model(shapes_model):
    """A quick sample; the full 1000 + 200 images run in ``test_full_parity`` (slow)."""
    shapes = compare(shapes_samples(120), shapes_model)
    photos = compare(photo_samples(24), shapes_model)
    for report in (shapes, photos):
        assert report.top1_agreement >= 0.99, report.line()
        assert report.map_pearson_mean >= 0.99, report.line()
        assert report.pixel_max_abs <= 2, report.line()
    assert shapes.decoders["torchvision"] == 120
    assert shapes.accuracy_device is not None and shapes.accuracy_pillow is not None
    assert abs(shapes.accuracy_device - shapes.accuracy_pillow) <= 0.01


@pytest.mark.slow
def test_full_parity(shapes_model):
    shapes = compare(shapes_samples(1000), shapes_model)
    photos = compare(photo_samples(200), shapes_model)
    print("\nshapes:", shapes.line(), f"accuracy {shapes.accuracy_pillow} / {shapes.accuracy_device}")
    print("photos:", photos.line())
    for report in (shapes, photos):
        assert report.top1_agreement >= 0.99, report.line()
        assert report.map_pearson_mean >= 0.99, report.line()
        assert report.pixel_max_abs <= 2, report.line()
