"""Each vocabulary (options, error codes) is defined once; the schemas, the status table and the docs
follow it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.api.errors import STATUS_OF_CODE
from app.api.oip.schemas import InferenceOptions
from app.api.v1.schemas import ExplainOptions
from app.engine.options import KERNELS, SCORES
from app.serving.options import (
    COLORMAPS,
    DEFAULT_JPEG_QUALITY,
    ENCODINGS,
    MAP_SIZES,
    MAX_JPEG_QUALITY,
    MIN_JPEG_QUALITY,
    PICTURE_FORMATS,
)

ROOT = Path(__file__).resolve().parents[2]
SERVICE_DOC = (ROOT / "docs" / "service.md").read_text()

# Where a code is raised: ServiceError("code", ...), code="code", or an error answered with a status.
_RAISED = re.compile(r'(?:Error\(|__init__\(|code=)\s*"([a-z0-9_]+)"')
# the errors the middleware answers itself: the status, then the code, each on its own line
_ANSWERED = re.compile(r'\n\s*(\d{3}),\n\s*"([a-z0-9_]+)",')


def _sources() -> list[Path]:
    return sorted((ROOT / "app").rglob("*.py"))


def test_every_error_code_the_service_raises_has_a_status() -> None:
    raised = {code for path in _sources() for code in _RAISED.findall(path.read_text())}
    assert {"model_not_found", "invalid_options", "queue_full", "too_many_pixels"} <= raised
    assert raised - set(STATUS_OF_CODE) == set()


def test_errors_answered_outside_the_handlers_use_the_table_status() -> None:
    answered = _ANSWERED.findall((ROOT / "app" / "api" / "middleware.py").read_text())
    assert answered, "the middleware answers some errors itself"
    for status, code in answered:
        assert STATUS_OF_CODE[code] == int(status), code


def test_the_docs_error_table_agrees_with_the_status_table() -> None:
    rows = re.findall(r"^\| (\d{3}) \| (.+?) \|", SERVICE_DOC, flags=re.M)
    documented = {
        code: int(status) for status, codes in rows for code in re.findall(r"`([a-z0-9_]+)`", codes)
    }
    assert len(documented) >= 20
    for code, status in documented.items():
        assert STATUS_OF_CODE.get(code) == status, code
    served = {
        code for code in STATUS_OF_CODE if code not in ("client_disconnected", "forbidden", "not_acceptable")
    }
    assert served - set(documented) <= {"too_many_requests", "unavailable"}


@pytest.mark.parametrize(
    ("option", "values"),
    [
        ("kernel", KERNELS),
        ("score", SCORES),
        ("encodings", ENCODINGS),
        ("map_size", MAP_SIZES),
        ("colormap", COLORMAPS),
        ("picture_format", PICTURE_FORMATS),
    ],
)
def test_the_docs_options_table_lists_every_value(option: str, values: tuple[str, ...]) -> None:
    row = next(line for line in SERVICE_DOC.splitlines() if line.startswith(f"| `{option}` |"))
    for value in values:
        assert f"`{value}`" in row, (option, value)


def test_the_schemas_take_their_choices_from_the_vocabularies() -> None:
    v1 = ExplainOptions.model_json_schema()["properties"]
    assert tuple(v1["kernel"]["enum"]) == KERNELS
    assert tuple(v1["score"]["enum"]) == SCORES
    assert tuple(v1["map_size"]["enum"]) == MAP_SIZES
    assert tuple(v1["colormap"]["enum"]) == COLORMAPS
    assert tuple(v1["encodings"]["items"]["enum"]) == ENCODINGS
    assert tuple(v1["picture_format"]["enum"]) == PICTURE_FORMATS
    quality = v1["jpeg_quality"]
    assert (quality["minimum"], quality["maximum"]) == (MIN_JPEG_QUALITY, MAX_JPEG_QUALITY)
    assert quality["default"] == DEFAULT_JPEG_QUALITY
    v2 = InferenceOptions.model_json_schema()["properties"]
    assert tuple(v2["kernel"]["enum"]) == KERNELS
    assert tuple(v2["score"]["enum"]) == SCORES
    assert set(v2["map_size"]["enum"]) <= set(MAP_SIZES)


def test_the_docs_state_the_jpeg_quality_bounds_and_default() -> None:
    row = next(line for line in SERVICE_DOC.splitlines() if line.startswith("| `jpeg_quality` |"))
    assert row.startswith(f"| `jpeg_quality` | {DEFAULT_JPEG_QUALITY} |")
    assert f"from {MIN_JPEG_QUALITY} to {MAX_JPEG_QUALITY}" in row
