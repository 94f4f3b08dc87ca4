"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis).

Every operation gets generated requests, schema-valid and schema-violating: no answer may be a 5xx,
and every answer must match the schema (documented status, content type, body shape). The image
endpoints are fuzzed on the loaded model, so their bodies reach the parser and the decoder.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode
from schemathesis.python import asgi

from app.config import Settings
from app.main import create_app
from tests.integration.conftest import tiny_settings

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
IMAGE_OPERATIONS = ("/v1/models/{name}/predict", "/v1/models/{name}/explain")
SEEN: collections.defaultdict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)


# The schema does not depend on the models, so it is read from an app that loads none; the requests
# go to an app serving the tiny model. schemathesis ends the lifespans it started after each test (one
# per operation), and a stopped service does not start again, so each operation gets a fresh app.
schema = schemathesis.openapi.from_dict(create_app(Settings(models=[])).openapi())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])


@pytest.fixture
def fuzz_app(tiny_weights: Path) -> Iterator[Any]:
    app = create_app(
        tiny_settings(tiny_weights, limits={"max_body_bytes": 512 * 1024, "max_images_per_request": 4})
    )
    with asgi.get_client(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the service did not become ready"
            time.sleep(0.05)
    yield app


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_api_answers_every_generated_request_per_its_schema(case: schemathesis.Case, fuzz_app: Any) -> None:
    if case.operation.path in IMAGE_OPERATIONS and case.path_parameters is not None:
        case.path_parameters["name"] = "tiny"
    response = case.call(app=fuzz_app)
    SEEN[f"{case.method} {case.operation.path}"][response.status_code] += 1
    case.validate_response(response, checks=CHECKS)
    if response.status_code >= 400 and case.operation.path.startswith("/v2"):
        # The Open Inference Protocol's own error shape: {"error": "message"}.
        assert isinstance(response.json()["error"], str) and response.json()["error"], (
            case.path,
            response.text,
        )
    elif response.status_code >= 400:
        error = response.json()["error"]
        header = response.headers["x-request-id"]
        assert [error["request_id"]] == (header if isinstance(header, list) else [header])


def test_fuzzing_reached_every_operation_and_both_outcomes() -> None:
    """Runs after the fuzz test (same module): the image endpoints were reached with accepted and
    refused bodies, so the parser and the decoder were exercised, not only the router."""
    if not SEEN:
        pytest.skip("run together with the fuzz test")
    print({operation: dict(counts) for operation, counts in SEEN.items()})
    assert {operation for operation in SEEN if operation.startswith(("GET", "POST"))} >= {
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
        "GET /v1/models",
        "GET /v1/models/{name}",
        "POST /v1/models/{name}/predict",
        "POST /v1/models/{name}/explain",
    }
    for operation in ("POST /v1/models/{name}/predict", "POST /v1/models/{name}/explain"):
        counts = SEEN[operation]
        assert counts[200] > 0 and sum(n for status, n in counts.items() if 400 <= status < 500) > 0, counts
