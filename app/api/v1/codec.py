"""/v1's codec: its options into the pipeline's request, the pipeline's result into its JSON."""

from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np

from app.api.v1.schemas import ExplainOptions, PredictOptions
from app.serving.images import ImageDecodeError
from app.serving.maps import label_of, predictions
from app.serving.options import MEDIA_TYPES, PICTURE_ENCODINGS, picture_format_of
from app.serving.request import (
    EncodedImages,
    InferenceRequest,
    InferenceResult,
    MapOptions,
)
from app.serving.request import (
    ExplainOptions as MethodOptions,
)


def to_request(model: str, images: list[bytes], options: PredictOptions) -> InferenceRequest:
    if not isinstance(options, ExplainOptions):
        return InferenceRequest(model=model, images=EncodedImages(images), top_k=options.top_k)
    return InferenceRequest(
        model=model,
        images=EncodedImages(images),
        top_k=options.top_k,
        explain=MethodOptions(
            kernel=options.kernel,
            keep_prefix=options.keep_prefix,
            score=options.score,
            target_block=options.target_block,
            targets=options.targets,
        ),
        maps=MapOptions(
            normalize=True,
            size=options.map_size,
            pictures=tuple(e for e in options.encodings if e in PICTURE_ENCODINGS),
            numbers="json" in options.encodings,
            colormap=options.colormap,
            opacity=options.opacity,
            picture_format=options.picture_format,
            jpeg_quality=options.jpeg_quality,
        ),
    )


def decode_error_message(error: ImageDecodeError, count: int) -> str:
    """The message of an image that cannot be used, naming it when the request holds several."""
    prefix = f"image {error.index}: " if count > 1 and error.index is not None else ""
    return f"{prefix}{error.message}"


def response_body(
    result: InferenceResult,
    options: PredictOptions,
    *,
    request_id: str,
    started: float,
) -> dict[str, Any]:
    """The JSON answer (numpy arrays stay arrays: the JSON encoder writes them as lists)."""
    encodings = options.encodings if isinstance(options, ExplainOptions) else None
    media_types = _media_types(options)
    images = []
    for image in result.images:
        assert image.prepared is not None
        width, height = image.prepared.original_size
        entry: dict[str, Any] = {
            "index": image.index,
            "width": width,
            "height": height,
            "predictions": predictions(image.logits, options.top_k, result.labels),
        }
        if encodings is not None:
            assert image.maps is not None
            explanations = []
            for explained in image.maps:
                values = explained.values
                item: dict[str, Any] = {
                    "class_id": explained.class_id,
                    "label": label_of(result.labels, explained.class_id),
                    "grid": list(explained.grid),
                    "score_range": list(explained.score_range),
                    "size": [int(values.shape[0]), int(values.shape[1])],
                }
                for encoding in encodings:
                    if encoding == "json":
                        # rows of floats, 6 decimals; an array the JSON encoder writes without a list copy
                        item["json"] = np.ascontiguousarray(values.numpy(), dtype=np.float64).round(6)
                    else:
                        item[encoding] = base64.b64encode(explained.pictures[encoding]).decode("ascii")
                if media_types:
                    item["media_types"] = media_types
                explanations.append(item)
            entry["explanations"] = explanations
        images.append(entry)
    return {
        "model": result.model,
        "request_id": request_id,
        "images": images,
        "timing": {
            "queue_ms": round(result.queue_ms, 3),
            "compute_ms": round(result.compute_ms, 3),
            "total_ms": round((time.perf_counter() - started) * 1000.0, 3),
            "batch_images": result.batch_images,
        },
    }


def _media_types(options: PredictOptions) -> dict[str, str] | None:
    """Each picture's media type, stated when a picture is not a PNG (PNG answers are as they were
    before JPEG pictures existed)."""
    if not isinstance(options, ExplainOptions) or options.picture_format == "png":
        return None
    pictures = [encoding for encoding in options.encodings if encoding in PICTURE_ENCODINGS]
    if not pictures:
        return None
    return {
        encoding: MEDIA_TYPES[picture_format_of(encoding, options.picture_format)] for encoding in pictures
    }
