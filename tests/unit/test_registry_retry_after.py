"""A model still loading answers 503 model_loading with the configured Retry-After."""

from __future__ import annotations

import pytest

from app.api.errors import error_headers, status_of
from app.config import Settings
from app.serving.errors import ServiceError
from app.serving.metrics import ServiceMetrics
from app.serving.registry import ModelRegistry


@pytest.mark.parametrize("retry_after_s", [1, 7])
def test_model_loading_retry_after_is_the_setting(retry_after_s):
    settings = Settings(
        models=[{"name": "m", "arch": "deit_tiny_patch16_224", "weights": "random:0"}],
        batch={"retry_after_s": retry_after_s},
    )
    registry = ModelRegistry(settings, ServiceMetrics())
    assert registry.entries["m"].status == "loading"  # nothing started loading it
    with pytest.raises(ServiceError) as info:
        registry.require_ready("m")
    assert info.value.code == "model_loading" and status_of(info.value) == 503
    assert error_headers(info.value) == {"Retry-After": str(retry_after_s)}
