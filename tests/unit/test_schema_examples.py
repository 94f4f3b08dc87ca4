"""The OpenAPI examples of the responses: present in /openapi.json, valid for their own schema, and
the explain example is the one docs/service.md shows."""

from __future__ import annotations

import json
import re
from pathlib import Path

from app.api import health
from app.api.v1 import schemas
from app.config import Settings
from app.main import create_app

ROOT = Path(__file__).resolve().parents[2]


def test_response_schemas_carry_valid_examples():
    components = create_app(Settings(models=[])).openapi()["components"]["schemas"]
    for model in (
        schemas.PredictResponse,
        schemas.ExplainResponse,
        schemas.ModelInfo,
        schemas.ModelList,
        health.Readiness,
        health.Liveness,
    ):
        examples = components[model.__name__].get("examples")
        assert examples, model.__name__
        for example in examples:
            assert model.model_validate(example).model_dump(mode="json", exclude_none=True, by_alias=True)
    explain = schemas.EXPLAIN_EXAMPLE["images"][0]
    assert explain["explanations"][0]["grid"] == [8, 8]  # the shapes model's 8x8 patch grid
    assert schemas.PREDICT_EXAMPLE["images"][0]["predictions"][0] == explain["predictions"][0]


def test_the_documented_explain_response_is_the_openapi_example():
    text = (ROOT / "docs" / "service.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```json\n(.*?)\n```", text, flags=re.DOTALL)
    (documented,) = [json.loads(block) for block in blocks if '"explanations"' in block]
    assert documented == schemas.EXPLAIN_EXAMPLE
