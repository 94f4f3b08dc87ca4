"""Request and response schemas of the HTTP API (they also document the OpenAPI schema)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.engine.options import Kernel, Score
from app.serving.options import Colormap, Encoding, MapSize

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
        description="png: grayscale PNG; heatmap: colour-mapped PNG; overlay: PNG blended on the image; "
        "json: normalised values as nested lists (at least one)",
    )
    map_size: MapSize = Field(
        "input",
        description="grid: the patch grid; input: the model input size; original: the posted image's size",
    )
    colormap: Colormap = "jet"
    opacity: float = Field(0.5, ge=0.0, le=1.0, description="overlay opacity of the heatmap")

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
        description="colour-mapped PNG, base64: a palette PNG whose indices are floor(255 * map) and whose "
        "palette is the colour map",
    )
    overlay: str | None = Field(None, description="heatmap blended on the image, PNG, base64")
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


class PredictResponse(BaseModel):
    model: str
    request_id: str
    images: list[ImageResult]
    timing: Timing


class ExplainResponse(PredictResponse):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "shapes",
                    "request_id": "6f1c0d3e9b2a4c55",
                    "images": [
                        {
                            "index": 0,
                            "width": 640,
                            "height": 480,
                            "predictions": [
                                {"class_id": 2, "label": "circle", "probability": 0.97, "logit": 6.1}
                            ],
                            "explanations": [
                                {
                                    "class_id": 2,
                                    "label": "circle",
                                    "grid": [14, 14],
                                    "score_range": [-1.3, 7.2],
                                    "size": [224, 224],
                                    "heatmap": "iVBORw0KGgo...",
                                }
                            ],
                        }
                    ],
                    "timing": {"queue_ms": 3.1, "compute_ms": 41.0, "total_ms": 52.7, "batch_images": 5},
                }
            ]
        }
    )


class ModelInfo(BaseModel):
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
