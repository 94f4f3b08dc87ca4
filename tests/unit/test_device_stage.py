"""The tensor path's render stage against the host rendering (``stages.render_one``) on the same
prepared images and maps: on the CPU every picture decodes to the same pixels."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

import app.serving.device_render as device_render
import app.serving.device_stage as device_stage
from app.engine.preprocess import DataConfig, Preprocessor
from app.engine.results import ImageExplanation
from app.serving.device_stage import on_tensor_path, render_on_device
from app.serving.maps import shape_maps
from app.serving.prepare import PreparedImage, prepare_image, prepare_on_device
from app.serving.request import EncodedImages, ExplainOptions, InferenceRequest, MapOptions
from app.serving.stages import render_one
from tests.helpers import jpeg_bytes, photo_like

FORMATS = frozenset({"JPEG", "PNG"})
INPUT = (32, 32)
CLASSES = 2


def _files() -> list[bytes]:
    return [jpeg_bytes(photo_like(48 + 9 * seed, 40 + 5 * seed, seed=seed, cell=12)) for seed in range(3)]


def _prepared(keep_original: bool = True) -> list[PreparedImage]:
    preprocessor = Preprocessor(DataConfig(input_size=INPUT, crop_pct=0.875))
    return prepare_on_device(
        _files(),
        preprocessor,
        torch.device("cpu"),
        max_pixels=10**6,
        allowed_formats=FORMATS,
        keep_original=keep_original,
    )


def _results(count: int) -> list[ImageExplanation]:
    generator = torch.Generator().manual_seed(5)
    return [
        ImageExplanation(
            logits=torch.randn(4, generator=generator),
            score_maps=torch.randn(CLASSES, 4, 4, generator=generator),
            targets=torch.tensor([2, 0]),
        )
        for _ in range(count)
    ]


def _request(maps: MapOptions) -> InferenceRequest:
    return InferenceRequest(
        model="m", images=EncodedImages([]), top_k=CLASSES, explain=ExplainOptions(), maps=maps
    )


def _on_host(image: PreparedImage) -> PreparedImage:
    """The same image as the Pillow path holds it (its original as an (H, W, 3) array)."""
    original = image.original_pixels
    return dataclasses.replace(
        image,
        device=None,
        original_pixels=None,
        original=None if original is None else original.permute(1, 2, 0).numpy(),
    )


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("size", ["grid", "input", "original"])
@pytest.mark.parametrize("picture_format", ["png", "jpeg"])
def test_device_render_equals_the_host_render(size: str, picture_format: str) -> None:
    prepared = _prepared()
    results = _results(len(prepared))
    maps = MapOptions(
        size=size,  # type: ignore[arg-type]  # a MapSize, parametrised
        pictures=("png", "heatmap", "overlay"),
        numbers=True,
        colormap="viridis",
        opacity=0.4,
        picture_format=picture_format,  # type: ignore[arg-type]  # a PictureFormat, parametrised
        jpeg_quality=80,
    )
    request = _request(maps)
    on_device = render_on_device(results, prepared, request, INPUT)
    for index, (result, image, got) in enumerate(zip(results, prepared, on_device, strict=True)):
        expected = render_one(index, result, _on_host(image), request, INPUT)
        assert got.index == index and got.maps is not None and expected.maps is not None
        assert len(got.maps) == CLASSES
        for mine, theirs in zip(got.maps, expected.maps, strict=True):
            assert mine.class_id == theirs.class_id and mine.grid == theirs.grid
            assert mine.score_range == pytest.approx(theirs.score_range)
            assert mine.values.device.type == "cpu"
            torch.testing.assert_close(mine.values, theirs.values, atol=1e-6, rtol=0)
            assert set(mine.pictures) == {"png", "heatmap", "overlay"}
            for name, data in mine.pictures.items():
                decoded = Image.open(io.BytesIO(data))
                expected_format = "PNG" if name == "png" or picture_format == "png" else "JPEG"
                assert decoded.format == expected_format, name
                assert np.array_equal(_pixels(data), _pixels(theirs.pictures[name])), name
            height, width = mine.values.shape
            overlay = _pixels(mine.pictures["overlay"])
            if size == "grid":
                assert overlay.shape[:2] == INPUT
            else:
                assert overlay.shape[:2] == (height, width)
            if size == "original":
                assert (width, height) == image.original_size


def test_unnormalised_values_are_the_raw_maps_at_the_asked_size() -> None:
    prepared = _prepared(keep_original=False)
    results = _results(len(prepared))
    request = _request(MapOptions(normalize=False, size="input", numbers=True))
    for result, got in zip(results, render_on_device(results, prepared, request, INPUT), strict=True):
        assert got.maps is not None
        expected = shape_maps(result.score_maps, "input", input_size=INPUT, normalize=False)  # type: ignore[arg-type]  # maps are set
        torch.testing.assert_close(torch.stack([entry.values for entry in got.maps]), expected)


def test_predictions_without_maps_carry_the_logits_only() -> None:
    prepared = _prepared(keep_original=False)
    results = _results(len(prepared))
    request = InferenceRequest(model="m", images=EncodedImages([]), top_k=1)
    rendered = render_on_device(results, prepared, request, INPUT)
    assert [image.maps for image in rendered] == [None] * len(prepared)
    assert all(torch.equal(a.logits, b.logits) for a, b in zip(rendered, results, strict=True))
    assert all(image.render_seconds >= 0.0 for image in rendered)


@pytest.mark.parametrize(("size", "calls"), [("grid", 1), ("input", 1), ("original", 3)])
def test_a_request_is_rendered_in_one_call_where_its_maps_share_a_size(
    size: str, calls: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []

    def counting(normalized: torch.Tensor, *args: object, **kwargs: object) -> device_render.RenderedMaps:
        seen.append(int(normalized.shape[0]))
        return device_render.render_maps(normalized, *args, **kwargs)  # type: ignore[arg-type]  # passed through

    monkeypatch.setattr(device_stage, "render_maps", counting)
    prepared = _prepared()
    request = _request(MapOptions(size=size, pictures=("overlay",), picture_format="jpeg"))  # type: ignore[arg-type]  # a MapSize
    rendered = render_on_device(_results(len(prepared)), prepared, request, INPUT)
    assert len(seen) == calls and sum(seen) == CLASSES * len(prepared)
    assert all(len(image.maps or []) == CLASSES for image in rendered)


def test_only_requests_prepared_by_the_tensor_path_render_there() -> None:
    prepared = _prepared(keep_original=False)
    assert on_tensor_path(prepared)
    host = prepare_image(
        _files()[0],
        Preprocessor(DataConfig(input_size=INPUT)),
        max_pixels=10**6,
        allowed_formats=FORMATS,
        keep_original=False,
    )
    assert host.device is None
    assert not on_tensor_path([host])
    assert not on_tensor_path([*prepared, host])
    assert not on_tensor_path([None, None])  # client tensors: nothing posted
    assert not on_tensor_path([])


def test_the_grayscale_png_stays_a_png_when_pictures_are_jpeg() -> None:
    maps = torch.rand(2, 4, 4)
    geometry = _prepared(keep_original=False)[0].geometry
    rendered = device_render.render_maps(
        maps, geometry, encodings=("png", "heatmap"), map_size="input", image_format="jpeg"
    )
    for pictures in rendered.images:
        assert Image.open(io.BytesIO(pictures["png"])).format == "PNG"
        assert Image.open(io.BytesIO(pictures["png"])).mode == "L"
        assert Image.open(io.BytesIO(pictures["heatmap"])).format == "JPEG"


def test_large_overlays_are_blended_in_blocks_of_rows_with_the_same_pixels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generator = torch.Generator().manual_seed(1)
    maps = torch.rand(3, 37, 23, generator=generator)
    base = torch.randint(0, 256, (3, 37, 23), dtype=torch.uint8, generator=generator)
    whole = device_render.overlays(base, maps, colormap="inferno", opacity=0.3)
    monkeypatch.setattr(device_render, "_BLOCK_PIXELS", 100)  # a block of one or two rows
    blocked = device_render.overlays(base, maps, colormap="inferno", opacity=0.3)
    assert torch.equal(whole, blocked)
    per_map = device_render.overlays(base.expand(3, -1, -1, -1), maps, colormap="inferno", opacity=0.3)
    assert torch.equal(whole, per_map)
