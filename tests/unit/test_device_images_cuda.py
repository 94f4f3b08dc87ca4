"""The tensor image path on a CUDA device (nvJPEG decode and encode, resize, rendering) against the
same functions on the CPU and the Pillow path (skipped without CUDA).

``RECIPROCAM_TEST_DEVICE=cpu`` runs the same checks on the CPU (to check the tests themselves).
nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's, so decoded JPEG pixels may differ by a
few levels; everything after the decode follows the same arithmetic.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.engine.maps import normalize_maps
from app.engine.models import LoadedModel, load_model
from app.engine.preprocess import DataConfig, Preprocessor
from app.serving.device_decode import DeviceImage, decode_batch
from app.serving.device_preprocess import preprocess_batch
from app.serving.device_render import encode_images, render_maps
from app.serving.images import ImageDecodeError
from tests.bad_inputs import corpus
from tests.device_parity import compare
from tests.helpers import photo_like
from tests.image_corpus import photo_samples, shapes_samples

DEVICE = os.environ.get("RECIPROCAM_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning"),
]
WEIGHTS = Path(__file__).resolve().parents[2] / "app" / "weights" / "shapes_vit.safetensors"


@pytest.fixture(scope="module")
def shapes_model() -> LoadedModel:
    return load_model(None, str(WEIGHTS), device=DEVICE, warmup=False)


def _images(results: list[DeviceImage | ImageDecodeError]) -> list[DeviceImage]:
    out = []
    for result in results:
        assert isinstance(result, DeviceImage), result
        out.append(result)
    return out


def test_decoding_on_the_device_matches_the_cpu():
    samples = photo_samples(40, seed=11)
    blobs = [sample.data for sample in samples]
    on_device = _images(decode_batch(blobs, DEVICE))
    on_cpu = _images(decode_batch(blobs, "cpu"))
    for sample, dev, cpu in zip(samples, on_device, on_cpu, strict=True):
        assert dev.pixels.device.type == torch.device(DEVICE).type
        assert dev.original_size == cpu.original_size and dev.pixels.shape == cpu.pixels.shape, sample.kind
        gap = (dev.pixels.cpu().int() - cpu.pixels.int()).abs()
        if sample.kind.startswith("jpeg") and DEVICE == "cuda":
            assert dev.decoder in ("nvjpeg", "torchvision")
            assert float(gap.double().mean()) < 2.0, sample.kind
        else:  # PNG and Pillow-decoded images are decoded on the CPU either way
            assert int(gap.max()) == 0, sample.kind


def test_bad_inputs_get_the_same_codes_on_the_device():
    blobs = [item.data for item in corpus() if "bomb" not in item.name]
    on_device = decode_batch(blobs, DEVICE)
    on_cpu = decode_batch(blobs, "cpu")
    for dev, cpu in zip(on_device, on_cpu, strict=True):
        assert isinstance(dev, ImageDecodeError) and isinstance(cpu, ImageDecodeError)
        assert (dev.code, dev.index) == (cpu.code, cpu.index)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_preprocessing_on_the_device_matches_the_cpu(interpolation):
    pre = Preprocessor(DataConfig((112, 112), interpolation, 0.875))
    tensors = [
        torch.from_numpy(np.array(photo_like(w, h, seed=i))).permute(2, 0, 1)
        for i, (w, h) in enumerate([(320, 320), (640, 480), (90, 60), (320, 320)])
    ]
    on_device = preprocess_batch(tensors, pre, DEVICE)
    on_cpu = preprocess_batch(tensors, pre, "cpu")
    assert on_device.inputs.device.type == torch.device(DEVICE).type
    assert on_device.geometries == on_cpu.geometries
    gap = (on_device.pixels.cpu().int() - on_cpu.pixels.int()).abs()
    assert int(gap.max()) <= 2 and float(gap.double().mean()) < 0.05


@pytest.mark.parametrize("map_size", ["input", "original"])
def test_rendering_on_the_device_matches_the_cpu(map_size):
    pre = Preprocessor(DataConfig((112, 112), "bicubic", 0.875))
    geometry = pre.geometry((150, 100))
    maps = normalize_maps(torch.randn(2, 7, 7, generator=torch.Generator().manual_seed(1)))
    original = torch.randint(0, 256, (3, 100, 150), dtype=torch.uint8)
    model_input = torch.randint(0, 256, (3, 112, 112), dtype=torch.uint8)
    options = {"encodings": ("png", "heatmap", "overlay"), "map_size": map_size}
    cpu = render_maps(maps, geometry, input_pixels=model_input, original=original, **options)
    dev = render_maps(
        maps.to(DEVICE),
        geometry,
        input_pixels=model_input.to(DEVICE),
        original=original.to(DEVICE),
        **options,
    )
    torch.testing.assert_close(dev.maps.cpu(), cpu.maps, atol=1e-5, rtol=0)
    for dev_pictures, cpu_pictures in zip(dev.images, cpu.images, strict=True):
        for name in ("png", "heatmap", "overlay"):
            a = np.asarray(Image.open(io.BytesIO(dev_pictures[name]))).astype(int)
            b = np.asarray(Image.open(io.BytesIO(cpu_pictures[name]))).astype(int)
            # a map value on a level boundary may round the other way on another device
            assert (a != b).mean() < 0.01, name
    jpegs = render_maps(
        maps.to(DEVICE),
        geometry,
        input_pixels=model_input.to(DEVICE),
        original=original.to(DEVICE),
        image_format="jpeg",
        **options,
    )
    for pictures in jpegs.images:
        for name, data in pictures.items():
            decoded = Image.open(io.BytesIO(data))
            decoded.load()
            # the grayscale levels stay a PNG: image_format applies to heatmaps and overlays
            assert decoded.format == ("PNG" if name == "png" else "JPEG"), name


def test_jpeg_encoding_on_the_device_round_trips():
    image = torch.from_numpy(np.array(photo_like(96, 64, seed=5, cell=16, noise=0))).permute(2, 0, 1)
    (data,) = encode_images([image.to(DEVICE)], "jpeg", quality=95)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert decoded.shape == (64, 96, 3)
    assert np.abs(decoded - image.permute(1, 2, 0).numpy().astype(int)).mean() < 3.0


def test_end_to_end_agreement_on_the_device(shapes_model):
    shapes = compare(shapes_samples(200), shapes_model, device=DEVICE)
    photos = compare(photo_samples(40), shapes_model, device=DEVICE)
    for report in (shapes, photos):
        assert report.top1_agreement >= 0.99, report.line()
        assert report.map_pearson_mean >= 0.99, report.line()
