"""Service settings: defaults, an optional JSON/YAML file, and environment variables.

Precedence, highest first: values passed to ``Settings(...)``, environment variables
(``RECIPROCAM_`` prefix, ``__`` between nested names, e.g. ``RECIPROCAM_BATCH__MAX_WAIT_MS=10``),
the config file named by ``RECIPROCAM_CONFIG_FILE`` (or ``python -m app serve --config FILE``),
then the defaults below.

Models are a list. ``RECIPROCAM_MODELS`` replaces it (JSON); ``RECIPROCAM_MODELS__<n>__<FIELD>``
changes one field of entry ``n`` of the list that would otherwise apply.
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from app.config_errors import ENV_PREFIX, SettingsProblem, describe_validation_error
from app.config_sources import ConfigFileSource, ModelListSource, WithoutIndexedModels
from app.engine.options import DType, EnginePath, HostWait

MIB = 1024 * 1024
# inline_io_max_pixels unset, for a model on the CPU: image and map pixels in all, such as a 720x720
# photo with its map at that size, or a 1000x1000 one with its map at the model's input size
DEFAULT_INLINE_IO_PIXELS = 1024 * 1024


class ModelSettings(BaseModel):
    """One model to keep resident."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="name used in the URL")
    arch: str | None = Field(None, description="timm architecture; optional for self-describing files")
    weights: str = Field("hub", description="hub | path to .safetensors/.pth | random:SEED")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: DType = "fp32"
    labels: str | list[str] | None = Field(None, description="labels file or list (default: from the model)")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model kwargs")
    path: EnginePath = "auto"
    image_path: Literal["auto", "device", "pillow"] = Field(
        "auto",
        description="where posted images are decoded and preprocessed: device (tensor code on the "
        "model's device, nvJPEG on CUDA), pillow (on the host), auto (device when the model is on CUDA)",
    )
    target_block: int = Field(-1, description="default target block of the explanation (-1 = last)")
    enabled: bool = True

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        """A device torch knows by name (whether it is present is found out when the model loads)."""
        if value == "auto":
            return value
        import torch

        try:
            torch.device(value)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"device {value!r} is not auto, cpu, cuda or cuda:N") from exc
        return value

    @field_validator("weights")
    @classmethod
    def _weights_source(cls, value: str) -> str:
        """A source the model loader can parse (``random:SEED`` with an integer seed, say)."""
        from app.engine.weights_source import ModelLoadError, WeightsSource

        try:
            WeightsSource.parse(value)
        except ModelLoadError as exc:
            raise ValueError(str(exc)) from exc
        return value


def default_models() -> list[ModelSettings]:
    return [
        ModelSettings(name="deit_small", arch="deit_small_patch16_224", weights="hub"),
        ModelSettings(name="shapes", weights="app/weights/shapes_vit.safetensors"),
    ]


class BatchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_batch_images: int = Field(32, ge=1, description="most images computed in one batch")
    max_wait_ms: float = Field(5.0, ge=0, description="batching window, from the first queued request")
    max_queue_images: int = Field(256, ge=1, description="queued images per model before 503")
    request_timeout_s: float = Field(30.0, gt=0, description="deadline for a request to START compute (504)")
    compute_streams: int | None = Field(
        None,
        ge=1,
        description="batches computed at once on one device, each on its share of the process's torch "
        "threads; unset: 2 on a CPU with at least 2 torch threads, 1 on an accelerator",
    )
    compute_timeout_s: float = Field(
        120.0,
        gt=0,
        description="longest one batch may compute in a shared engine process before the process is "
        "deemed hung and restarted (its requests get 503 model_loading)",
    )
    retry_after_s: int = Field(
        1, ge=0, description="Retry-After sent with 503 queue_full and overloaded, and 504 deadline_exceeded"
    )


class LimitSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(20 * MIB, ge=1, description="largest request body (413)")
    max_concurrent_requests: int = Field(
        512,
        ge=0,
        description="requests handled at once per worker process before 503 overloaded (0: no limit; "
        "probes, metrics and CORS preflights are exempt); with max_body_bytes it bounds the memory "
        "held by request bodies",
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        description="longest time for a request body to arrive (408 and the connection closed); a "
        "stalled upload would otherwise hold one of max_concurrent_requests slots for good",
    )
    max_pixels: int = Field(40_000_000, ge=1, description="largest image, in pixels (413)")
    max_images_per_request: int = Field(16, ge=1, description="images in one request (413)")
    max_targets: int = Field(20, ge=1, description="classes explained per image (top_k or targets)")
    max_map_pixels: int = Field(
        50_000_000,
        ge=1,
        description="pixels of all the maps one explain request asks for (images x classes x map height "
        "x width, for map_size input or original; 422 maps_too_large): bounds the memory and CPU that "
        "rendering maps at the size of large photos can take",
    )
    max_json_map_values: int = Field(
        4_000_000,
        ge=1,
        description="numbers in all the maps one request asks for as JSON (encodings json at map_size "
        "input or original on /v1, maps at input size without binary_data on /v2; 422 maps_too_large, "
        "400 on /v2): a /v1 number (6 decimals) takes about 9 bytes of text, a /v2 one (full float32 "
        "precision) about 19, so 4 M values answer in about 36 MB on /v1 and 76 MB on /v2",
    )
    max_original_pixels_in_flight: int = Field(
        200_000_000,
        ge=1,
        description="pixels of posted images kept whole for overlays on the original, over all requests "
        "in flight per worker process (3 bytes each); a request that would exceed it gets 503 overloaded "
        "with Retry-After (one is always taken when none is held)",
    )
    allowed_formats: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"],
        description="accepted image formats (Pillow names)",
    )

    @field_validator("allowed_formats", mode="before")
    @classmethod
    def _split_formats(cls, value: Any) -> Any:
        return text_list(value, example='["JPEG", "PNG"]')


class AuthSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="accepted keys; empty = no auth"
    )
    protect_health: bool = Field(False, description="whether /healthz and /readyz need a key")
    protect_metrics: bool = Field(False, description="whether /metrics needs a key")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        return text_list(value, example='["first-key", "second-key"]')


class CorsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    allow_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed (empty = no CORS)"
    )
    allow_credentials: bool = False
    allow_methods: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["GET", "POST", "OPTIONS"])
    allow_headers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["Authorization", "Content-Type", "X-API-Key", "X-Request-ID"]
    )
    max_age: int = 600

    @field_validator("allow_origins", "allow_methods", "allow_headers", mode="before")
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
        return text_list(value, example='["https://app.example", "https://admin.example"]')


def text_list(value: Any, *, example: str) -> Any:
    """A list of strings from the environment: a JSON list, or the items separated by commas."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(
                f"not a valid JSON list ({exc}): write a JSON list such as {example}, or the items "
                "separated by commas"
            ) from exc
    return [item.strip() for item in text.split(",") if item.strip()]


class Settings(BaseSettings):
    """Everything the service reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",  # a misspelt key in a config file is an error, not a silent default
        protected_namespaces=(),
    )

    models: list[ModelSettings] = Field(default_factory=default_models)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    cors: CorsSettings = Field(default_factory=CorsSettings)
    drain_timeout_s: float = Field(25.0, ge=0, description="longest wait for in-flight work on shutdown")
    io_workers: int = Field(
        default_factory=lambda: max(2, min(8, os.cpu_count() or 2)),
        ge=1,
        description="threads that decode images and encode PNGs",
    )
    inline_io_max_pixels: int | None = Field(
        None,
        ge=0,
        description="a request whose images hold at most this many pixels in all (image plus maps) is "
        "decoded and rendered on the event loop's thread, not handed to the I/O threads: no hand-over "
        "between threads and no contention for the interpreter lock among them; larger requests go "
        "to the I/O threads so that one large image does not hold up the others; 0: always the I/O "
        f"threads; unset: {DEFAULT_INLINE_IO_PIXELS} for a model on the CPU, whose cores the model keeps "
        "busy, and 0 for one on an accelerator",
    )
    reduced_jpeg_decode: bool = Field(
        True,
        description="decode a large JPEG at 1/2, 1/4 or 1/8 scale when that keeps at least twice the size "
        "it is resized to (much less CPU for camera photos; pixels within a few levels of a full decode); "
        "false: always decode whole, exactly as timm's PIL pipeline",
    )
    two_step_resize: bool = Field(
        True,
        description="with Pillow's resize (tensor_resize false), resize an image of four times the resize "
        "target or more in two steps: an integer box-filter reduction to at least twice the target, then "
        "the model's filter (much less CPU for "
        "large PNG, WebP and other images decoded whole; pixels within a few levels of a one-step "
        "resize); false: one step, exactly as timm's PIL pipeline",
    )
    window_resize: bool = Field(
        False,
        description="with Pillow's resize (tensor_resize false), resize only the part of the image the "
        "centre crop keeps (Pillow's box), not the whole image before cropping: a faster resize for "
        "images under the other shortcuts' thresholds; the same filter and sample positions, but "
        "Pillow may run its two passes in the other order for the window, which moves its clipping "
        "between them: within a level or two on photos, tens of levels at some sharp edges; false: "
        "resize whole, then crop, exactly as timm's PIL pipeline",
    )
    tensor_resize: bool = Field(
        True,
        description="resize and crop images decoded with Pillow using torch's antialiased kernels (the "
        "transform of image_path=device, on the host) instead of Pillow's: faster (docs/benchmarks.md); "
        "under 1% of the pixels differ from timm's PIL transform, by a level or two; one step at any size, "
        "so two_step_resize and window_resize do not apply; false: Pillow, exactly as timm's PIL "
        "pipeline (with reduced_jpeg_decode and two_step_resize off)",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads of the process that computes, shared out among compute_streams "
        "(with `serve --workers N`: the engine; per-worker engines without this or OMP_NUM_THREADS get "
        "cores // N); unset: torch's default",
    )
    cuda_wait: HostWait = Field(
        "block",
        description="how the compute thread waits for a GPU to finish a batch: block (asleep, leaving its "
        "core to decoding and encoding) or spin (busy-waiting, CUDA's default for one process)",
    )
    hub_probe_timeout_s: float = Field(
        3.0, ge=0, description="quick reachability check of the model hub before a hub download (0 = off)"
    )
    log_level: Literal["trace", "debug", "info", "warning", "error", "critical"] = "info"
    log_format: Literal["json", "text"] = "json"

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _unique_model_names(self) -> Settings:
        names = [model.name for model in self.models]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique: {', '.join(duplicates)}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            ModelListSource(settings_cls),
            WithoutIndexedModels(env_settings),
            ConfigFileSource(settings_cls),
        )


def load_settings(**values: Any) -> Settings:
    """``Settings(**values)``, with any mistake raised as one :class:`SettingsProblem` whose message
    names the variable or config key, says what is wrong and what to write."""
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise SettingsProblem(describe_validation_error(exc, Settings, os.environ)) from exc
    except SettingsError as exc:  # a source could not read a value (checked earlier in most cases)
        raise SettingsProblem(f"invalid settings: {exc} ({exc.__cause__})") from exc
