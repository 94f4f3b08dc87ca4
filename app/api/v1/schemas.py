"""Request and response schemas of the HTTP API (they also document the OpenAPI schema)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.engine.options import Kernel, Score
from app.serving.options import (
    DEFAULT_JPEG_QUALITY,
    MAX_JPEG_QUALITY,
    MIN_JPEG_QUALITY,
    Colormap,
    Encoding,
    MapSize,
    PictureFormat,
)

_TINY_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"


def _split_list(value: Any) -> Any:
    """Form fields and query strings carry lists as repeated fields, ``a,b`` or a JSON list."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
                return value
        return [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str) and "," in value[0]:
        return _split_list(value[0])
    return value


def _default_encodings() -> list[Encoding]:
    return ["heatmap"]


class PredictOptions(BaseModel):
    """Options of ``/predict``."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(1, ge=1, description="how many of the most probable classes to return")


class ExplainOptions(PredictOptions):
    """Options of ``/explain`` (all optional; the defaults are the published method)."""

    targets: list[int] | None = Field(
        None,
        description="class ids to explain; when absent, the top_k predicted classes are explained",
        examples=[[3, 7]],
    )
    kernel: Kernel = Field("gaussian", description="spatial mask kernel")
    keep_prefix: bool = Field(
        True, description="keep the class/distillation/register tokens in masked copies"
    )
    score: Score = Field("logit", description="map values: raw logits or softmax")
    target_block: int | None = Field(
        None, description="encoder block whose input is masked (default: the model's setting, -1 = last)"
    )
    encodings: list[Encoding] = Field(
        default_factory=_default_encodings,
        min_length=1,
        description="png: grayscale PNG; heatmap: colour-mapped picture; overlay: heatmap blended on the "
        "image (both PNG, or JPEG with picture_format=jpeg); json: normalised values as nested lists "
        "(at least one)",
    )
    map_size: MapSize = Field(
        "input",
        description="grid: the patch grid; input: the model input size; original: the posted image's size",
    )
    colormap: Colormap = "jet"
    opacity: float = Field(0.5, ge=0.0, le=1.0, description="overlay opacity of the heatmap")
    picture_format: PictureFormat = Field(
        "png", description="format of the heatmap and overlay pictures (the grayscale png stays PNG)"
    )
    jpeg_quality: int = Field(
        DEFAULT_JPEG_QUALITY,
        ge=MIN_JPEG_QUALITY,
        le=MAX_JPEG_QUALITY,
        description="JPEG quality of the pictures with picture_format=jpeg",
    )

    @field_validator("targets", "encodings", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("encodings")
    @classmethod
    def _unique(cls, value: list[Encoding]) -> list[Encoding]:
        return list(dict.fromkeys(value))


class ImageData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(
        description="the image file (JPEG, PNG, WebP, BMP, GIF, TIFF) in base64, or a data: URL",
        examples=[_TINY_PNG],
    )


class PredictJsonRequest(PredictOptions):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"images": [{"data": _TINY_PNG}], "top_k": 3}]}
    )

    images: list[ImageData] = Field(min_length=1, description="one or more images")


class ExplainJsonRequest(ExplainOptions):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "images": [{"data": _TINY_PNG}],
                    "top_k": 2,
                    "encodings": ["heatmap", "json"],
                    "map_size": "grid",
                }
            ]
        },
    )

    images: list[ImageData] = Field(min_length=1, description="one or more images")


class Prediction(BaseModel):
    class_id: int
    label: str
    probability: float = Field(description="softmax probability")
    logit: float


class Explanation(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    class_id: int = Field(description="the explained class")
    label: str
    grid: list[int] = Field(description="[h, w] of the patch grid the map was computed on")
    score_range: list[float] = Field(description="[min, max] of the raw score map before normalisation")
    size: list[int] = Field(description="[height, width] of the returned map")
    png: str | None = Field(None, description="grayscale PNG, base64 (floor(255 * normalised))")
    heatmap: str | None = Field(
        None,
        description="colour-mapped picture, base64: a palette PNG whose indices are floor(255 * map) and "
        "whose palette is the colour map, or an RGB JPEG with picture_format=jpeg",
    )
    overlay: str | None = Field(
        None, description="heatmap blended on the image, base64: PNG, or JPEG with picture_format=jpeg"
    )
    media_types: dict[str, str] | None = Field(
        None,
        description='media type of each picture of this explanation, e.g. {"heatmap": "image/jpeg"}; '
        "only with picture_format=jpeg (absent: every picture is a PNG)",
    )
    map_values: list[list[float]] | None = Field(
        None, alias="json", description="normalised map in [0, 1], rows of floats"
    )


class ImageResult(BaseModel):
    index: int = Field(description="position of the image in the request")
    width: int = Field(description="width of the posted image (after EXIF orientation)")
    height: int
    predictions: list[Prediction]
    explanations: list[Explanation] | None = Field(None, description="only from /explain")


class Timing(BaseModel):
    queue_ms: float = Field(description="wait in the batching queue")
    compute_ms: float = Field(description="model compute of the batch this request was part of")
    total_ms: float = Field(description="from receiving the request to the response")
    batch_images: int = Field(description="images in that batch (all requests together)")


# Real answers of the shipped shapes model to one 64x64 PNG of a circle (docs/service.md shows the
# explain one; tests/unit/test_schema_examples.py keeps them valid and equal)
_CIRCLE = {"class_id": 0, "label": "circle", "probability": 0.7987, "logit": 2.8701}
PREDICT_EXAMPLE: dict[str, Any] = {
    "model": "shapes",
    "request_id": "cf8bc1e5dead4a9daf377ae76a944b11",
    "images": [
        {
            "index": 0,
            "width": 64,
            "height": 64,
            "predictions": [
                _CIRCLE,
                {"class_id": 2, "label": "triangle", "probability": 0.1239, "logit": 1.0068},
            ],
        }
    ],
    "timing": {"queue_ms": 5.7, "compute_ms": 5.0, "total_ms": 13.7, "batch_images": 1},
}
EXPLAIN_EXAMPLE: dict[str, Any] = {
    "model": "shapes",
    "request_id": "7faa37b605394730932417967d20e0ce",
    "images": [
        {
            "index": 0,
            "width": 64,
            "height": 64,
            "predictions": [_CIRCLE],
            "explanations": [
                {
                    "class_id": 0,
                    "label": "circle",
                    "grid": [8, 8],
                    "score_range": [0.0533, 2.9269],
                    "size": [64, 64],
                    "heatmap": "iVBORw0KGgo...",
                }
            ],
        }
    ],
    "timing": {"queue_ms": 5.7, "compute_ms": 7.4, "total_ms": 16.2, "batch_images": 1},
}
SHAPES_MODEL_EXAMPLE: dict[str, Any] = {
    "name": "shapes",
    "status": "ready",
    "arch": "vit_tiny_patch16_224",
    "weights": "app/weights/shapes_vit.safetensors",
    "device": "cpu",
    "dtype": "fp32",
    "num_classes": 6,
    "input_size": [64, 64],
    "grid": [8, 8],
    "num_prefix_tokens": 1,
    "num_blocks": 6,
    "path": "reduced",
    "path_reason": "model structure allows the exact reduced evaluation",
    "target_block": -1,
    "data_config": {
        "input_size": [3, 64, 64],
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    },
}
UNAVAILABLE_REASON_EXAMPLE = (
    "pretrained weights for 'deit_small_patch16_224' are not in the local cache and the model hub "
    "(huggingface.co) cannot be reached ([Errno -2] Name or service not known). ..."
)
UNAVAILABLE_MODEL_EXAMPLE: dict[str, Any] = {
    "name": "deit_small",
    "status": "unavailable",
    "reason": UNAVAILABLE_REASON_EXAMPLE,
    "arch": "deit_small_patch16_224",
    "weights": "hub",
    "device": "auto",
    "dtype": "fp32",
}


class PredictResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [PREDICT_EXAMPLE]})

    model: str
    request_id: str
    images: list[ImageResult]
    timing: Timing


class ExplainResponse(PredictResponse):
    model_config = ConfigDict(json_schema_extra={"examples": [EXPLAIN_EXAMPLE]})


class ModelInfo(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **SHAPES_MODEL_EXAMPLE,
                    "labels": ["circle", "square", "triangle", "star", "cross", "arrow"],
                }
            ]
        }
    )

    name: str
    status: Literal["loading", "ready", "unavailable", "disabled"]
    reason: str | None = Field(None, description="why the model is not ready")
    arch: str | None = None
    weights: str | None = None
    device: str | None = None
    dtype: str | None = None
    num_classes: int | None = None
    input_size: list[int] | None = Field(None, description="[height, width] of the model input")
    grid: list[int] | None = Field(None, description="[h, w] patch grid")
    num_prefix_tokens: int | None = None
    num_blocks: int | None = None
    path: str | None = Field(None, description="engine path: reduced or reference")
    path_reason: str | None = None
    target_block: int | None = None
    data_config: dict[str, Any] | None = None
    labels: list[str] | None = Field(None, description="class names (only on /v1/models/{name})")


class ModelList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"models": [SHAPES_MODEL_EXAMPLE, UNAVAILABLE_MODEL_EXAMPLE]}]}
    )

    models: list[ModelInfo]


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable reason", examples=["invalid_image"])
    message: str = Field(description="what went wrong, for people")
    request_id: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the error statuses a route can answer."""
    return {
        status: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[status]} for status in statuses
    }


_ERROR_DESCRIPTIONS = {
    400: "the request or an image cannot be read",
    401: "missing or wrong API key",
    404: "no such model",
    413: "body, image or number of images over the limit",
    415: "unsupported content type",
    422: "invalid options",
    500: "the model failed on this request",
    503: "model not ready, queue full or out of memory (both with Retry-After), or shutting down",
    504: "the request could not start before its deadline (Retry-After)",
}
