"""The pipeline's synchronous stages: check a request against its model, bound the answer's size,
and render one image's result. :mod:`app.serving.pipeline` runs them in order."""

from __future__ import annotations

import time

import numpy as np
import torch

from app.config import LimitSettings
from app.engine.options import CamOptions
from app.engine.results import ImageExplanation
from app.serving.errors import InvalidOptionsError, ServiceError
from app.serving.maps import shape_maps
from app.serving.model_card import ServedModel
from app.serving.prepare import PreparedImage
from app.serving.render import heatmap_picture, overlay_rgb, png_bytes, rgb_picture, to_uint8
from app.serving.request import ExplainOptions, ImageResult, InferenceRequest, MapOptions, MapResult


def check_image_count(count: int, limit: int) -> None:
    if count > limit:
        raise ServiceError("too_many_images", f"{count} images in one request; the limit is {limit}")


def check_top_k(top_k: int, loaded: ServedModel, max_targets: int | None) -> None:
    """``max_targets``: the limit on explained classes, when the top k are explained."""
    if top_k > loaded.num_classes:
        raise InvalidOptionsError(f"top_k {top_k} is more than the model's {loaded.num_classes} classes")
    if max_targets is not None and top_k > max_targets:
        raise InvalidOptionsError(f"top_k {top_k} explains more than the limit of {max_targets} classes")


def checked_targets(targets: list[int] | None, loaded: ServedModel, max_targets: int) -> list[int] | None:
    if targets is None:
        return None
    if not targets:
        raise InvalidOptionsError("targets is empty; omit it to explain the top_k classes")
    if len(targets) > max_targets:
        raise InvalidOptionsError(f"{len(targets)} targets; at most {max_targets} classes per image")
    outside = [target for target in targets if not 0 <= target < loaded.num_classes]
    if outside:
        raise InvalidOptionsError(
            f"targets {outside} are outside the model's classes 0..{loaded.num_classes - 1}"
        )
    return list(targets)


def cam_options(options: ExplainOptions, loaded: ServedModel, default_block: int) -> CamOptions:
    block = default_block if options.target_block is None else options.target_block
    try:
        loaded.resolve_block(block)
    except ValueError as exc:
        raise InvalidOptionsError(str(exc)) from exc
    return CamOptions(
        kernel=options.kernel, keep_prefix=options.keep_prefix, score=options.score, target_block=block
    )


def explained_classes(request: InferenceRequest) -> int:
    """How many maps each image gets."""
    targets = request.explain.targets if request.explain is not None else None
    return len(targets) if targets is not None else request.top_k


def check_map_bounds(request: InferenceRequest, sizes: list[tuple[int, int]], limits: LimitSettings) -> None:
    """Refuse, before decoding and compute, maps that would hold more values than the limits allow
    (``sizes``: each image's map (width, height); unreadable headers count as 0, and their decoding
    then reports the error)."""
    maps = request.maps
    if maps is None or maps.size == "grid":
        return
    classes = explained_classes(request)
    if maps.bound_pixels:
        _check_map_count(
            sizes, maps.size, classes, limits.max_map_pixels, "map pixels", "map_size=input or grid"
        )
    if maps.numbers:
        # as text a JSON number takes about 9 bytes, about 6 times the pixel's 8-bit PNG
        _check_map_count(
            sizes,
            maps.size,
            classes,
            limits.max_json_map_values,
            "JSON numbers",
            "the maps as pictures (png, heatmap) or as binary_data, map_size=grid",
        )


def _check_map_count(
    sizes: list[tuple[int, int]], map_size: str, classes: int, limit: int, what: str, advice: str
) -> None:
    total = classes * sum(width * height for width, height in sizes)
    if total > limit:
        raise InvalidOptionsError(
            f"{len(sizes)} image(s) x {classes} class(es) at map_size={map_size} would be {total} "
            f"{what}, more than the limit of {limit}; ask for {advice}, fewer classes or fewer images "
            "per request",
            code="maps_too_large",
        )


def render_image(
    index: int,
    result: ImageExplanation,
    prepared: PreparedImage | None,
    request: InferenceRequest,
    input_size: tuple[int, int],
) -> ImageResult:
    """:func:`render_one`, with the CPU time it took."""
    started = time.thread_time()
    rendered = render_one(index, result, prepared, request, input_size)
    rendered.render_seconds = time.thread_time() - started
    return rendered


def render_one(
    index: int,
    result: ImageExplanation,
    prepared: PreparedImage | None,
    request: InferenceRequest,
    input_size: tuple[int, int],
) -> ImageResult:
    """One image's result: its logits and, when maps are asked for, each explained class's map at
    the asked size with its pictures (PNG, or JPEG heatmaps and overlays), rendered on the host."""
    maps = request.maps
    if maps is None or request.explain is None:
        return ImageResult(index=index, logits=result.logits, maps=None, prepared=prepared)
    if result.score_maps is None or result.targets is None:
        raise RuntimeError("the engine returned no maps for an explained image")
    count = explained_classes(request)
    raw = result.score_maps[:count].float()
    targets = result.targets[:count].tolist()
    geometry = prepared.geometry if prepared is not None else None
    sized = shape_maps(raw, maps.size, input_size=input_size, geometry=geometry, normalize=maps.normalize)
    overlay_maps, overlay_base = _overlay_inputs(sized, maps, prepared, input_size)
    grid = (int(raw.shape[-2]), int(raw.shape[-1]))
    entries = []
    for position, class_id in enumerate(targets):
        values = sized[position]
        raw_map = raw[position]
        entry = MapResult(
            class_id=int(class_id),
            grid=grid,
            score_range=(float(raw_map.min()), float(raw_map.max())),
            values=values,
        )
        levels = to_uint8(values.numpy()) if {"png", "heatmap"} & set(maps.pictures) else None
        for encoding in maps.pictures:
            if encoding == "png":
                assert levels is not None
                entry.pictures["png"] = png_bytes(levels)
            elif encoding == "heatmap":
                assert levels is not None
                entry.pictures["heatmap"] = heatmap_picture(
                    levels, maps.colormap, maps.picture_format, quality=maps.jpeg_quality
                )
            elif encoding == "overlay":
                assert overlay_maps is not None and overlay_base is not None
                entry.pictures["overlay"] = rgb_picture(
                    overlay_rgb(
                        overlay_base,
                        overlay_maps[position].numpy(),
                        colormap=maps.colormap,
                        opacity=maps.opacity,
                    ),
                    maps.picture_format,
                    quality=maps.jpeg_quality,
                )
        entries.append(entry)
    return ImageResult(index=index, logits=result.logits, maps=entries, prepared=prepared)


def _overlay_inputs(
    sized: torch.Tensor, maps: MapOptions, prepared: PreparedImage | None, input_size: tuple[int, int]
) -> tuple[torch.Tensor | None, np.ndarray | None]:
    """Maps and base picture of the overlay: the original image for ``original``, else the model
    input (a grid-sized overlay would be unreadable, so ``grid`` overlays are drawn at input size)."""
    if "overlay" not in maps.pictures:
        return None, None
    if prepared is None:
        raise ValueError("an overlay needs the posted image")
    if maps.size == "original":
        if prepared.original is None:
            raise RuntimeError("the original image was not kept for an overlay")
        return sized, prepared.original
    if maps.size == "input":
        return sized, prepared.input_pixels
    on_input = shape_maps(sized, "input", input_size=input_size, normalize=False).clamp_(0.0, 1.0)
    return on_input, prepared.input_pixels
