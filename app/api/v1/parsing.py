"""Reading images and options from a request: multipart, JSON with base64, or a raw image body."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from app.api.encoding import decode_base64
from app.api.errors import describe_validation_errors
from app.api.multipart import MultipartError, TooManyFiles, read_parts
from app.api.v1.schemas import ImageData
from app.serving.errors import ServiceError

OptionsT = TypeVar("OptionsT", bound=BaseModel)

FILE_FIELDS = frozenset({"file", "files"})
_MAX_FORM_FIELDS = 64
_MAX_OPTION_BYTES = 64 * 1024


def invalid(message: str, code: str = "bad_request") -> ServiceError:
    return ServiceError(code, message)


async def parse_request(
    request: Request,
    options_model: type[OptionsT],
    json_model: type[BaseModel],
    *,
    max_images: int,
) -> tuple[list[bytes], OptionsT]:
    """The posted images (raw bytes, not yet decoded) and the validated options."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    if not body:
        raise invalid("the request body is empty; post images as multipart files or JSON", "empty_body")
    if content_type == "multipart/form-data":
        _refuse_query_options(request, "form fields")
        images, raw_options = _from_multipart(body, request.headers.get("content-type", ""), max_images)
    elif content_type == "application/json" or content_type.endswith("+json"):
        _refuse_query_options(request, "keys of the JSON body")
        images, raw_options = _from_json(body, json_model)
    elif content_type.startswith("image/") or content_type == "application/octet-stream":
        images = [body]
        raw_options = _query_options(request)
    else:
        raise ServiceError(
            "unsupported_media_type",
            f"unsupported content type {content_type or '(none)'!r}; use multipart/form-data, "
            "application/json or an image/* body",
        )
    if not images:
        raise invalid("the request holds no image (multipart field 'file' or 'files')", "no_images")
    if len(images) > max_images:
        raise ServiceError(
            "too_many_images", f"{len(images)} images in one request; the limit is {max_images}"
        )
    try:
        options = options_model.model_validate(raw_options)
    except ValidationError as exc:
        raise ServiceError("invalid_options", describe_validation_errors(exc.errors())) from exc
    return images, options


def _refuse_query_options(request: Request, where: str) -> None:
    """Options come from the query string only with a raw image body; elsewhere a query parameter
    would be silently ignored, so it is refused."""
    if request.query_params:
        names = ", ".join(sorted(set(request.query_params.keys())))
        raise ServiceError(
            "invalid_options",
            f"query parameters ({names}) are read only with a raw image body; send options as {where}",
        )


def _from_multipart(body: bytes, content_type: str, max_images: int) -> tuple[list[bytes], dict[str, Any]]:
    try:
        parts = read_parts(
            body,
            content_type,
            max_files=max_images,
            max_fields=_MAX_FORM_FIELDS,
            max_field_bytes=_MAX_OPTION_BYTES,
        )
    except TooManyFiles as exc:
        raise ServiceError(
            "too_many_images", f"more than {max_images} files in one request; the limit is {max_images}"
        ) from exc
    except MultipartError as exc:
        raise invalid(f"the multipart body cannot be read: {exc}", "invalid_multipart") from exc
    images: list[bytes] = []
    options: dict[str, Any] = {}
    for part in parts:
        key = part.name
        if part.filename is not None:
            if key not in FILE_FIELDS:
                raise ServiceError(
                    "invalid_request", f"unexpected file field {key!r}; send images as 'file' or 'files'"
                )
            images.append(part.data)
        elif key in FILE_FIELDS:
            raise ServiceError("invalid_request", f"field {key!r} must be a file upload, not a text value")
        elif key in options:
            previous = options[key]
            options[key] = [*previous, part.text] if isinstance(previous, list) else [previous, part.text]
        else:
            options[key] = part.text
    return images, options


def _from_json(body: bytes, json_model: type[BaseModel]) -> tuple[list[bytes], dict[str, Any]]:
    try:
        document = json.loads(body)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise invalid(f"the body is not valid JSON: {exc}", "invalid_json") from exc
    except RecursionError as exc:
        raise invalid("the JSON body is nested too deeply", "invalid_json") from exc
    if not isinstance(document, dict):
        raise invalid("the JSON body must be an object with an 'images' list", "invalid_json")
    images_field = document.get("images")
    if not isinstance(images_field, list) or not images_field:
        raise invalid('the JSON body needs a non-empty \'images\' list of {"data": "<base64>"}', "no_images")
    try:
        validated = json_model.model_validate(document)
    except ValidationError as exc:
        raise ServiceError("invalid_options", describe_validation_errors(exc.errors())) from exc
    entries: list[ImageData] = getattr(validated, "images", [])
    images = [decode_base64(entry.data, index) for index, entry in enumerate(entries)]
    options = {key: value for key, value in document.items() if key != "images"}
    return images, options


def _query_options(request: Request) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, value in request.query_params.multi_items():
        if key in options:
            previous = options[key]
            options[key] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            options[key] = value
    return options
