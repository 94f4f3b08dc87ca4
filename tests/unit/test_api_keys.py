"""The API-key check reads the two headers itself: the same keys as FastAPI's ``HTTPBearer`` and
``APIKeyHeader`` would give it, and the OpenAPI schema still documents both schemes everywhere."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.security import APIKeyHeader, HTTPBearer
from starlette.requests import Request

from app.api.deps import SECURITY_SCHEMES, presented_keys
from app.config import Settings
from app.main import create_app

HEADER_SETS = [
    {},
    {"x-api-key": "k1"},
    {"x-api-key": ""},
    {"authorization": "Bearer k2"},
    {"authorization": "bearer   k2  "},
    {"authorization": "BEARER k2"},
    {"authorization": "Bearer"},
    {"authorization": "Bearer "},
    {"authorization": "Basic dXNlcjpwYXNz"},
    {"authorization": ""},
    {"authorization": "Bearer k2 extra"},
    {"authorization": "Bearer k2", "x-api-key": "k1"},
    {"authorization": "Token k2", "x-api-key": "k1"},
]


def _request(headers: dict[str, str]) -> Request:
    raw = [(name.encode(), value.encode()) for name, value in headers.items()]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": raw, "query_string": b""})


@pytest.mark.parametrize("headers", HEADER_SETS, ids=[str(h) for h in HEADER_SETS])
def test_the_keys_presented_are_fastapis(headers):
    request = _request(headers)
    bearer = asyncio.run(HTTPBearer(auto_error=False)(request))
    header_key = asyncio.run(APIKeyHeader(name="X-API-Key", auto_error=False)(request))
    expected = [key for key in (header_key, bearer.credentials if bearer else None) if key]
    assert presented_keys(request) == expected


def test_every_operation_documents_both_schemes():
    schema = create_app(Settings(models=[])).openapi()
    assert schema["components"]["securitySchemes"] == {
        "HTTPBearer": {"type": "http", "description": "Authorization: Bearer <API key>", "scheme": "bearer"},
        "APIKeyHeader": {
            "type": "apiKey",
            "description": "X-API-Key: <API key>",
            "in": "header",
            "name": "X-API-Key",
        },
    }
    operations = [op for path in schema["paths"].values() for op in path.values()]
    assert len(operations) >= 15
    for operation in operations:
        assert operation["security"] == [{name: []} for name in SECURITY_SCHEMES]
