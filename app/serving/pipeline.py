"""The per-image stages around the batch: decode + preprocess before it, unbatch + encode after it.

Both stages are plain functions that run in the I/O thread pool, never on the event loop.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import torch

from app.engine.maps import normalize_maps, upsample_maps
from app.engine.preprocess import Geometry, Preprocessor, project_to_original
from app.engine.results import ImageExplanation
from app.serving.images import ImageDecodeError, decode
from app.serving.render import heatmap_png, overlay_rgb, png_bytes, to_uint8

ENCODINGS: tuple[str, ...] = ("png", "heatmap", "overlay", "json")
MAP_SIZES: tuple[str, ...] = ("grid", "input", "original")
# Two-step resizing keeps at least twice the resize target before the model's filter, as the
# reduced JPEG decode does.
TWO_STEP_REDUCING_GAP = 2.0


@dataclass
class PreparedImage:
    """A decoded image ready for the model, with what rendering needs later.

    The model input stays uint8 (``pixels``) until the batch is computed: the compute thread
    normalises a whole batch at once, on the model's device (see
    :func:`app.serving.batcher.run_engine_batch`). ``tensor`` normalises this one image the same way.
    """

    geometry: Geometry
    input_pixels: np.ndarray  # (H, W, 3) uint8: the model input before normalisation
    original: np.ndarray | None  # (H0, W0, 3) uint8, kept only when an overlay on it is wanted
    preprocessor: Preprocessor = field(repr=False)

    @property
    def pixels(self) -> torch.Tensor:
        """(H, W, 3) uint8 model input, sharing memory with ``input_pixels``."""
        return torch.from_numpy(self.input_pixels)

    @property
    def tensor(self) -> torch.Tensor:
        """(3, H, W) normalised model input."""
        return self.preprocessor.normalize(self.input_pixels)

    @property
    def original_size(self) -> tuple[int, int]:
        """(width, height) of the posted image, after EXIF orientation."""
        return self.geometry.original_size


@dataclass(frozen=True)
class RenderOptions:
    encodings: tuple[str, ...] = ("heatmap",)
    map_size: str = "input"
    colormap: str = "jet"
    opacity: float = 0.5


def prepare_image(
    data: bytes,
    preprocessor: Preprocessor,
    *,
    max_pixels: int,
    allowed_formats: frozenset[str],
    keep_original: bool,
    reduced_jpeg_decode: bool = False,
    two_step_resize: bool = False,
    window_resize: bool = False,
) -> PreparedImage:
    """Decode (safely) and preprocess one posted image. Raises ``ImageDecodeError``.

    ``reduced_jpeg_decode``: a large JPEG may be decoded at a reduced scale that keeps at least
    twice the size it is resized to (never when the original pixels are kept for an overlay).
    ``two_step_resize``: an image decoded at four times the resize target or more is first shrunk
    by an integer factor (box filter) to no less than twice the target, then resized as usual.
    ``window_resize``: resize only the part of the image the crop keeps (see
    ``Preprocessor.to_pixels``'s ``window_only``).
    """
    reduce = reduced_jpeg_decode and not keep_original
    decoded = decode(
        data,
        max_pixels=max_pixels,
        allowed_formats=allowed_formats,
        min_size=preprocessor.min_decode_size if reduce else None,
    )
    image = decoded.image
    _check_resize(preprocessor, decoded.original_size, max_pixels)
    pixels, geometry = preprocessor.to_pixels(
        image,
        decoded.original_size,
        reducing_gap=TWO_STEP_REDUCING_GAP if two_step_resize else None,
        window_only=window_resize,
    )
    original = np.asarray(image) if keep_original else None
    return PreparedImage(geometry=geometry, input_pixels=pixels, original=original, preprocessor=preprocessor)


def _check_resize(preprocessor: Preprocessor, original_size: tuple[int, int], max_pixels: int) -> None:
    """413 ``too_many_pixels`` for an image so elongated that the model's resize (shorter side to the
    resize target) would make more than ``max_pixels`` pixels: a 1x100000 strip resized for a
    224-pixel model would be 256 x 25.6 million."""
    width, height = preprocessor.geometry(original_size).resized_size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"the image is {original_size[0]}x{original_size[1]}: resized for the model it would be "
            f"{width}x{height} = {width * height} pixels, more than the limit of {max_pixels}; "
            "crop it to a less elongated shape",
            code="too_many_pixels",
            status=413,
        )


def predictions(logits: torch.Tensor, top_k: int, labels: Sequence[str]) -> list[dict[str, Any]]:
    probabilities = logits.float().softmax(-1)
    top = torch.topk(logits.float(), min(top_k, logits.shape[-1]))
    return [
        {
            "class_id": int(index),
            "label": _label(labels, int(index)),
            "probability": float(probabilities[index]),
            "logit": float(logits[index]),
        }
        for index in top.indices.tolist()
    ]


def render_result(
    result: ImageExplanation,
    prepared: PreparedImage,
    *,
    index: int,
    labels: Sequence[str],
    top_k: int,
    explain_count: int | None,
    render: RenderOptions | None,
) -> dict[str, Any]:
    """One image's entry of the response: predictions, and explanations when ``render`` is given.

    ``explain_count``: how many of the engine's targets to return (the request's top_k when the
    batch was explained with a larger top_k); None returns every target (explicit targets).
    """
    width, height = prepared.original_size
    entry: dict[str, Any] = {
        "index": index,
        "width": width,
        "height": height,
        "predictions": predictions(result.logits, top_k, labels),
    }
    if render is None:
        return entry
    if result.score_maps is None or result.targets is None:
        raise RuntimeError("the engine returned no maps for an explained image")
    raw_maps = result.score_maps.float()
    targets = result.targets.tolist()
    if explain_count is not None:
        raw_maps, targets = raw_maps[:explain_count], targets[:explain_count]
    grid_h, grid_w = raw_maps.shape[-2:]
    normalized = normalize_maps(raw_maps)
    sized = _resize(normalized, render.map_size, prepared.geometry)
    needs_overlay = "overlay" in render.encodings
    needs_levels = "png" in render.encodings or "heatmap" in render.encodings
    overlay_maps, overlay_base = (None, None)
    if needs_overlay:
        overlay_maps, overlay_base = _overlay_inputs(normalized, sized, render.map_size, prepared)
    explanations = []
    for position, class_id in enumerate(targets):
        map_values = sized[position].numpy()
        raw = raw_maps[position]
        item: dict[str, Any] = {
            "class_id": int(class_id),
            "label": _label(labels, int(class_id)),
            "grid": [int(grid_h), int(grid_w)],
            "score_range": [float(raw.min()), float(raw.max())],
            "size": [int(map_values.shape[0]), int(map_values.shape[1])],
        }
        # the 8-bit levels, once for both the grey PNG and the heatmap's palette indices
        levels = to_uint8(map_values) if needs_levels else None
        for encoding in render.encodings:
            if encoding == "png":
                assert levels is not None
                item["png"] = _b64_png(levels)
            elif encoding == "heatmap":
                assert levels is not None
                item["heatmap"] = base64.b64encode(heatmap_png(levels, render.colormap)).decode("ascii")
            elif encoding == "overlay":
                assert overlay_maps is not None and overlay_base is not None
                item["overlay"] = _b64_png(
                    overlay_rgb(
                        overlay_base,
                        overlay_maps[position].numpy(),
                        colormap=render.colormap,
                        opacity=render.opacity,
                    )
                )
            elif encoding == "json":
                # rows of floats, 6 decimals; a numpy array that json_bytes writes without a list copy
                item["json"] = np.ascontiguousarray(map_values, dtype=np.float64).round(6)
        explanations.append(item)
    entry["explanations"] = explanations
    return entry


def _resize(normalized: torch.Tensor, map_size: str, geometry: Geometry) -> torch.Tensor:
    if map_size == "grid":
        return normalized
    on_input = upsample_maps(normalized, geometry.input_size).clamp_(0.0, 1.0)
    if map_size == "input":
        return on_input
    if map_size == "original":
        return project_to_original(on_input, geometry).clamp_(0.0, 1.0)
    raise ValueError(f"unknown map size {map_size!r}; expected one of {', '.join(MAP_SIZES)}")


def _overlay_inputs(
    normalized: torch.Tensor, sized: torch.Tensor, map_size: str, prepared: PreparedImage
) -> tuple[torch.Tensor, np.ndarray]:
    """Maps and base picture of the overlay: the original image for ``original``, else the model
    input (a grid-sized overlay would be unreadable, so ``grid`` overlays are drawn at input size)."""
    if map_size == "original":
        if prepared.original is None:
            raise RuntimeError("the original image was not kept for an overlay")
        return sized, prepared.original
    if map_size == "input":
        return sized, prepared.input_pixels
    on_input = upsample_maps(normalized, prepared.geometry.input_size).clamp_(0.0, 1.0)
    return on_input, prepared.input_pixels


def json_bytes(content: Any) -> bytes:
    """A response body as compact UTF-8 JSON (orjson; numpy arrays are written as nested lists)."""
    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def _b64_png(array: np.ndarray) -> str:
    return base64.b64encode(png_bytes(array)).decode("ascii")


def _label(labels: Sequence[str], index: int) -> str:
    return labels[index] if 0 <= index < len(labels) else str(index)
