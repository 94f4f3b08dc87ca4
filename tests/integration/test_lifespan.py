"""One app, two lifespans (as test clients do): the second start serves again, with the same
answers; the first stop's drained state does not leak into the second run."""

from __future__ import annotations

from app.main import create_app
from tests.integration.conftest import image_bytes, running_service, serving, tiny_settings


async def _explain_once(app) -> tuple[dict, object]:
    async with serving(app) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        response = await client.post(
            "/v1/models/tiny/explain",
            files={"files": ("a.png", image_bytes(5), "image/png")},
            data={"encodings": "json"},
        )
        assert response.status_code == 200, response.text
        return response.json(), app.state.service.registry


async def test_the_same_app_can_be_started_again_after_a_stop(tiny_weights):
    app = create_app(tiny_settings(tiny_weights))
    first, first_registry = await _explain_once(app)
    service = app.state.service
    assert service.draining  # stopped: readiness was off
    second, second_registry = await _explain_once(app)
    assert second_registry is not first_registry  # models and device threads were loaded anew
    assert service.draining and service.io_pool._shutdown  # stopped again
    (one,), (two,) = first["images"], second["images"]
    assert one["predictions"] == two["predictions"]
    assert one["explanations"][0]["json"] == two["explanations"][0]["json"]
    metrics = app.state.service.metrics.render().decode()
    assert (
        'reciprocam_http_requests_total{method="POST",route="/v1/models/{name}/explain",status="200"} 2.0'
        in metrics
    )


async def test_an_invalid_weights_source_fails_its_model_only(tiny_weights):
    """A model whose weights source cannot be parsed is unavailable with the reason; the other models
    load and the service turns ready (such a source once stopped every model's loading for good).
    The settings refuse "random:abc" already; built past that check, the registry must still cope."""
    from app.config import ModelSettings

    bad = ModelSettings.model_construct(
        **{**ModelSettings(name="bad").model_dump(), "arch": "deit_tiny_patch16_224", "weights": "random:abc"}
    )
    models = [bad, ModelSettings(name="tiny", weights=str(tiny_weights))]
    async with running_service(tiny_settings(tiny_weights, models=models)) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        statuses = {m["name"]: m for m in ready.json()["models"]}
        assert statuses["tiny"]["status"] == "ready"
        assert statuses["bad"]["status"] == "unavailable" and "random:SEED" in statuses["bad"]["reason"]


async def test_a_service_without_models_says_so(tiny_weights, caplog):
    """An empty model list is allowed (tests use it) but can never be ready: a warning at start-up
    says so, and readiness answers 503 unavailable."""
    import logging

    caplog.set_level(logging.WARNING, logger="app.serving.registry")
    async with running_service(tiny_settings(tiny_weights, models=[]), wait_ready=False) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
    assert any("no model is configured" in record.getMessage() for record in caplog.records)
