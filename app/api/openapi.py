"""OpenAPI documentation of the image endpoints, whose bodies are parsed by hand (three content types)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from app.api.deps import SECURITY_SCHEMES

_EXTRA_SCHEMAS: dict[str, dict[str, Any]] = {}


def _component_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in schema.pop("$defs", {}).items():
        _EXTRA_SCHEMAS[name] = definition
    return schema


def image_request_body(json_model: type[BaseModel], options_model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route taking images as multipart files, JSON base64 or a raw body."""
    _EXTRA_SCHEMAS[json_model.__name__] = _component_schema(json_model)
    options = _component_schema(options_model)
    form_properties: dict[str, Any] = {
        "files": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "one or more image files (the field may also be named 'file')",
        },
        **options.get("properties", {}),
    }
    return {
        "requestBody": {
            "required": True,
            "description": "Images as multipart files (options as form fields), as JSON with base64 "
            "data, or one image as the raw body (options as query parameters).",
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": form_properties, "required": ["files"]}
                },
                "application/json": {"schema": {"$ref": f"#/components/schemas/{json_model.__name__}"}},
                "image/*": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }


def install_openapi(app: FastAPI) -> None:
    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in _EXTRA_SCHEMAS.items():
            components.setdefault(name, definition)
        # Every documented operation checks the API key (the health and metrics ones when the
        # settings protect them), with one plain dependency each: documented here, not by FastAPI.
        schema["components"]["securitySchemes"] = {
            name: dict(model) for name, model in SECURITY_SCHEMES.items()
        }
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
        app.openapi_schema = schema
        return schema

    setattr(app, "openapi", build)  # noqa: B010  (FastAPI's documented way to replace the schema)
