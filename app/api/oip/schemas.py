"""The protocol's names and request/response schemas (the server's own inputs, outputs and parameters)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.engine.options import Kernel, Score

SERVER_NAME = "vit-reciprocam-service"
EXTENSIONS = ["classification", "binary_tensor_data"]
MODEL_VERSION = "1"
PLATFORM = "pytorch_timm"

INPUT_BYTES = "image"
INPUT_TENSOR = "pixel_values"
OUTPUT_LOGITS = "logits"
OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_MAPS = "maps"
# pixel_values are normalised pixels, within a few units of 0; beyond this, only overflow is gained
MAX_PIXEL_VALUE = 1e4
OUTPUT_TARGETS = "targets"
OUTPUTS = (OUTPUT_LOGITS, OUTPUT_PROBABILITIES, OUTPUT_MAPS, OUTPUT_TARGETS)
HEADER_LENGTH = "Inference-Header-Content-Length"


class ServerMetadata(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "vit-reciprocam-service",
                    "version": "1.0.0",
                    "extensions": ["classification", "binary_tensor_data"],
                }
            ]
        }
    )

    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a variable dimension")


class ModelMetadata(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "shapes",
                    "versions": ["1"],
                    "platform": "pytorch_timm",
                    "inputs": [
                        {"name": "image", "datatype": "BYTES", "shape": [-1]},
                        {"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, 64, 64]},
                    ],
                    "outputs": [
                        {"name": "logits", "datatype": "FP32", "shape": [-1, 6]},
                        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 6]},
                        {"name": "maps", "datatype": "FP32", "shape": [-1, -1, 8, 8]},
                        {"name": "targets", "datatype": "INT64", "shape": [-1, -1]},
                    ],
                }
            ]
        }
    )

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = Field(None, description="row-major tensor data, flat or nested; absent with binary data")


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "inputs": [
                        {"name": "image", "shape": [1], "datatype": "BYTES", "data": ["<base64 PNG>"]}
                    ],
                    "outputs": [
                        {"name": "probabilities", "parameters": {"classification": 3}},
                        {"name": "maps"},
                    ],
                    "parameters": {"top_k": 1, "normalize": True},
                }
            ]
        },
    )

    id: str | None = None
    # KServe's client names the model in the body too; it must be the one in the path.
    model_name: str | None = None
    model_version: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class InferenceOptions(BaseModel):
    """Request ``parameters`` this server reads (others, such as ``priority``, are ignored)."""

    model_config = ConfigDict(extra="ignore")

    top_k: int = Field(1, ge=1, description="explain the top_k predicted classes (unless targets)")
    targets: list[int] | None = Field(None, description="class ids to explain: a list or 'a,b'")
    kernel: Kernel = "gaussian"
    keep_prefix: bool = True
    score: Score = "logit"
    target_block: int | None = None
    normalize: bool = Field(False, description="min-max normalise each map into [0, 1]")
    map_size: Literal["grid", "input"] = Field("grid", description="maps on the patch grid or input size")
    binary_data_output: bool = False

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip().strip("[]")
            return [part.strip() for part in text.split(",") if part.strip()]
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
        return value
