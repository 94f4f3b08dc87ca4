import io

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from app.engine.preprocess import DataConfig, Preprocessor, project_to_original
from tests.helpers import jpeg_bytes, photo_like


def _photo(width, height, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR)


CONFIGS = [
    DataConfig(input_size=(224, 224), interpolation="bicubic", crop_pct=0.875),
    DataConfig(input_size=(64, 64), interpolation="bilinear", crop_pct=1.0),
    DataConfig(input_size=(48, 80), interpolation="bicubic", crop_pct=0.9),
    DataConfig(input_size=(64, 64), interpolation="bilinear", crop_pct=0.9, crop_mode="squash"),
    DataConfig(
        input_size=(64, 64),
        interpolation="bilinear",
        crop_pct=1.0,
        crop_mode="border",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("size", [(300, 200), (150, 333), (64, 64)])
def test_matches_timm_eval_transform(config, size):
    image = _photo(*size)
    ours, geometry = Preprocessor(config)(image)
    timm_tf = create_transform(**{k: v for k, v in config.as_dict().items()}, is_training=False)
    theirs = timm_tf(image)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert geometry.original_size == size


def test_batch_stacks_and_keeps_each_geometry():
    pre = Preprocessor(CONFIGS[1])
    tensors, geometries = pre.batch([_photo(100, 50), _photo(40, 90)])
    assert tensors.shape == (2, 3, 64, 64)
    assert geometries[0].original_size == (100, 50) and geometries[1].original_size == (40, 90)
    assert geometries[0].resized_size == (128, 64) and geometries[0].offset == (32, 0)


@pytest.mark.parametrize("size", [(300, 200), (120, 260)])
def test_geometry_round_trip(size):
    """A map equal to the input's pixels, projected back, reproduces the original inside the crop."""
    config = DataConfig(
        input_size=(64, 64), interpolation="bilinear", crop_pct=0.875, mean=(0, 0, 0), std=(1, 1, 1)
    )
    width, height = size
    xs = np.linspace(0.0, 1.0, width)[None, :].repeat(height, 0)
    ys = np.linspace(0.0, 1.0, height)[:, None].repeat(width, 1)
    rgb = np.stack([xs, ys, 0.5 * np.ones_like(xs)], axis=-1)
    image = Image.fromarray((rgb * 255).round().astype(np.uint8))
    tensor, geometry = Preprocessor(config)(image)
    projected = project_to_original(tensor[:2], geometry)  # (2, H0, W0)
    assert projected.shape == (2, height, width)
    left, top, right, bottom = geometry.crop_box_original()
    inner = (slice(int(np.ceil(top)) + 2, int(bottom) - 2), slice(int(np.ceil(left)) + 2, int(right) - 2))
    original = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[:2]
    assert (projected[:, inner[0], inner[1]] - original[:, inner[0], inner[1]]).abs().max() < 0.03
    outside = torch.ones(height, width, dtype=torch.bool)
    outside[
        max(0, int(top) - 1) : int(np.ceil(bottom)) + 1, max(0, int(left) - 1) : int(np.ceil(right)) + 1
    ] = False
    assert outside.any() and (projected[:, outside] == 0).all()


@pytest.mark.parametrize("size", [(4032, 3024), (1300, 2100)])
def test_reduced_jpeg_decode_gives_the_same_geometry_and_nearly_the_same_pixels(size):
    """A camera-sized JPEG decoded at a reduced scale (at least twice the resize target) against the
    full decode: identical geometry, model inputs within a fraction of a grey level on average."""
    from app.serving.prepare import prepare_image

    width, height = size
    data = jpeg_bytes(photo_like(width, height, seed=1, cell=48, noise=20), quality=92)
    pre = Preprocessor(CONFIGS[0])
    common = {"max_pixels": 10**8, "allowed_formats": frozenset({"JPEG"}), "keep_original": False}
    full = prepare_image(data, pre, reduced_jpeg_decode=False, **common)
    reduced = prepare_image(data, pre, reduced_jpeg_decode=True, **common)
    assert reduced.geometry == full.geometry
    assert reduced.original_size == size
    difference = np.abs(reduced.input_pixels.astype(np.int64) - full.input_pixels.astype(np.int64))
    assert difference.mean() < 1.0, difference.mean()
    assert np.percentile(difference, 99) <= 4
    # kept originals (overlays on the posted image) are never reduced
    kept = prepare_image(data, pre, reduced_jpeg_decode=True, **{**common, "keep_original": True})
    assert kept.original is not None and kept.original.shape[:2] == (height, width)
    assert np.array_equal(kept.input_pixels, full.input_pixels)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
def test_two_step_resize_keeps_the_geometry_and_nearly_the_pixels(fmt):
    """A large image decoded whole (PNG, WebP; a JPEG with reduced decoding off) resized in two steps
    against one step: identical geometry, model inputs within a fraction of a grey level on average,
    yet not identical (the reduction happened); an image under four times the target is untouched."""
    import io

    from app.serving.prepare import prepare_image

    pre = Preprocessor(CONFIGS[0])  # resizes the shorter side to 256: 341x256 for 4:3
    common = {"max_pixels": 10**8, "allowed_formats": frozenset({fmt}), "keep_original": False}
    for (width, height), reduced in (((1600, 1200), True), ((1200, 900), False)):
        buffer = io.BytesIO()
        photo_like(width, height, seed=3, cell=48, noise=20).save(buffer, format=fmt, quality=92)
        data = buffer.getvalue()
        one = prepare_image(data, pre, two_step_resize=False, **common)
        two = prepare_image(data, pre, two_step_resize=True, **common)
        assert two.geometry == one.geometry == pre.geometry((width, height))
        difference = np.abs(two.input_pixels.astype(np.int64) - one.input_pixels.astype(np.int64))
        if reduced:  # 1600 >= 4 x 341: halved to 800x600 first, then resized
            assert 0 < difference.mean() < 1.0, difference.mean()
            assert np.percentile(difference, 99) <= 4
        else:  # 1200 < 4 x 341: one step either way
            assert difference.max() == 0


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("size", [(640, 480), (45, 60), (333, 517), (257, 300), (1600, 1200), (64, 64)])
@pytest.mark.parametrize("reducing_gap", [None, 2.0])
def test_window_resize_keeps_the_geometry_and_nearly_the_pixels(config, size, reducing_gap):
    """Resizing only the crop window (Pillow's box) against resizing the whole image and cropping,
    on photo-like content: the same geometry and, as Pillow samples at the same positions, pixels
    within 3 levels (the box in float32, and Pillow's choice of which pass runs first, move the
    rounding and clipping of its intermediate rows; at sharp edges that can reach tens of levels,
    see the service docs); where nothing is cropped away (squash, border, a window as large as the
    resized image) the window path is not taken and the pixels are identical."""
    pre = Preprocessor(config)
    image = photo_like(*size, seed=5, cell=24, noise=20)
    whole, geometry = pre.to_pixels(image, reducing_gap=reducing_gap)
    window, window_geometry = pre.to_pixels(image, reducing_gap=reducing_gap, window_only=True)
    assert window_geometry == geometry and window.shape == whole.shape
    difference = np.abs(window.astype(np.int64) - whole.astype(np.int64))
    left, top = geometry.offset
    target_h, target_w = geometry.input_size
    crops = (target_w, target_h) != geometry.resized_size
    inside = left >= 0 and top >= 0 and left + target_w <= geometry.resized_size[0]
    if not (crops and inside and top + target_h <= geometry.resized_size[1]):
        assert difference.max() == 0
    assert difference.max() <= 3 and difference.mean() < 0.5, (difference.max(), difference.mean())


@pytest.mark.parametrize(
    "config",
    [*CONFIGS, DataConfig(input_size=(64, 64), interpolation="nearest", crop_pct=0.875)],
    ids=lambda config: f"{config.interpolation}-{config.crop_mode}-{config.input_size}",
)
@pytest.mark.parametrize("size", [(300, 200), (150, 333), (64, 64), (41, 500)])
def test_tensor_resize_keeps_the_geometry_and_nearly_the_pixels(config, size):
    """``tensor_resize``: torch's kernels on the decoded pixels, the same geometry as Pillow's exact
    path, pixels within a level or two of it (under 1% of them differ); exactly the tensor path's
    transform of the same pixels."""
    from app.serving.device_preprocess import to_model_pixels
    from app.serving.prepare import prepare_image

    image = _photo(*size, seed=5)
    data = jpeg_bytes(image, quality=95)
    pre = Preprocessor(config)
    common = {"max_pixels": 10**8, "allowed_formats": frozenset({"JPEG"}), "keep_original": False}
    exact = prepare_image(data, pre, **common)
    fast = prepare_image(data, pre, tensor_resize=True, **common)
    assert fast.geometry == exact.geometry
    assert fast.pixels.shape == exact.pixels.shape == (3, *config.input_size)
    assert fast.pixels.dtype == torch.uint8
    difference = (fast.pixels.int() - exact.pixels.int()).abs()
    assert int(difference.max()) <= 2  # two only where the image is enlarged
    assert float((difference > 0).float().mean()) < 0.01
    decoded = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB")))
    assert torch.equal(
        fast.pixels, to_model_pixels(decoded.permute(2, 0, 1).contiguous(), exact.geometry, pre)
    )


@pytest.mark.parametrize("tensor_resize", [False, True])
def test_the_original_kept_for_an_overlay_is_the_decoded_image(tensor_resize):
    """Either resize keeps the upright decoded pixels, (H, W, 3), for an overlay on the original."""
    from app.serving.images import decode
    from app.serving.prepare import prepare_image

    data = jpeg_bytes(_photo(150, 100, seed=8), quality=90)
    common = {"max_pixels": 10**8, "allowed_formats": frozenset({"JPEG"})}
    prepared = prepare_image(
        data, Preprocessor(CONFIGS[0]), keep_original=True, tensor_resize=tensor_resize, **common
    )
    assert prepared.original is not None and prepared.original.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(prepared.original, np.asarray(decode(data).image))


def test_window_resize_is_not_used_for_nearest():
    """NEAREST picks one source pixel per output pixel, a pick the float32 box could move, and Pillow
    does no two-step reduction for it: the window path is left out, the pixels are the whole path's."""
    pre = Preprocessor(DataConfig(input_size=(64, 64), interpolation="nearest", crop_pct=0.875))
    image = photo_like(1024, 768, seed=2, cell=24, noise=20)
    whole, _ = pre.to_pixels(image, reducing_gap=2.0)
    window, _ = pre.to_pixels(image, reducing_gap=2.0, window_only=True)
    assert np.array_equal(window, whole)


def test_window_resize_reads_the_same_samples_as_the_whole_resize():
    """A sharp-edged image (a one-pixel grid) shows any shift or scale error of the window at once:
    the window path must match the whole resize nearly everywhere, not only on smooth content."""
    pre = Preprocessor(CONFIGS[0])
    pixels = np.zeros((480, 640, 3), dtype=np.uint8)
    pixels[::7, :, 0] = 255
    pixels[:, ::5, 1] = 255
    image = Image.fromarray(pixels)
    whole, _ = pre.to_pixels(image)
    window, _ = pre.to_pixels(image, window_only=True)
    difference = np.abs(window.astype(np.int64) - whole.astype(np.int64))
    assert difference.max() <= 3 and (difference > 0).mean() < 0.01


def test_exif_rotated_jpeg_has_the_upright_geometry_on_every_decode_path():
    """Stored landscape, shown portrait: full decode, reduced decode and a kept original all give the
    geometry of the upright image, and the kept original has its shape."""
    import io

    from app.serving.prepare import prepare_image

    rng = np.random.default_rng(2)
    coarse = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    stored = coarse.resize((2000, 1500), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=92, exif=exif)
    data = buffer.getvalue()
    pre = Preprocessor(CONFIGS[0])
    common = {"max_pixels": 10**8, "allowed_formats": frozenset({"JPEG"})}
    full = prepare_image(data, pre, reduced_jpeg_decode=False, keep_original=False, **common)
    reduced = prepare_image(data, pre, reduced_jpeg_decode=True, keep_original=False, **common)
    kept = prepare_image(data, pre, reduced_jpeg_decode=True, keep_original=True, **common)
    expected = pre.geometry((1500, 2000))
    assert full.geometry == reduced.geometry == kept.geometry == expected
    assert kept.original is not None and kept.original.shape[:2] == (2000, 1500)
    assert np.abs(reduced.input_pixels.astype(int) - full.input_pixels.astype(int)).mean() < 1.0


def test_normalize_runs_on_the_pixels_device_with_mean_and_std_copied_once():
    """A batch on another device (the meta device stands in for an accelerator here) is normalised
    there; the mean and std are copied to that device once, not per batch."""
    pre = Preprocessor(CONFIGS[1])
    pixels = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    on_cpu = pre.normalize(pixels)
    assert on_cpu.shape == (2, 3, 64, 64) and on_cpu.device.type == "cpu"
    for _ in range(2):
        elsewhere = pre.normalize(pixels.to("meta"))
        assert elsewhere.device.type == "meta" and elsewhere.shape == on_cpu.shape
    assert list(pre._on_device) == [torch.device("meta")]
