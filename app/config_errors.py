"""Mistakes in the settings, said in the words they were written in.

Each mistake names the environment variable or config-file key that holds it, says what is wrong
and what to write instead, so that ``python -m app serve`` can stop with one readable message.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import NoDecode

ENV_PREFIX = "RECIPROCAM_"
CONFIG_FILE_ENV = "RECIPROCAM_CONFIG_FILE"
ENGINE_SOCKET_ENV = "RECIPROCAM_ENGINE_SOCKET"  # set by `serve` for its HTTP workers
# prometheus_client's: set before it is imported, it keeps every process's metrics in files there
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# RECIPROCAM_* variables that are not settings: the two above, and the test suite's own
NOT_SETTINGS = tuple(name[len(ENV_PREFIX) :] for name in (CONFIG_FILE_ENV, ENGINE_SOCKET_ENV))
NOT_SETTINGS_PREFIX = "TEST_"
MODELS_EXAMPLE = '[{"name": "shapes", "weights": "app/weights/shapes_vit.safetensors"}]'


class SettingsProblem(ValueError):
    """The settings cannot be used; the message says where, what is wrong and what to write."""


def check_environment(settings_cls: type[BaseModel], environ: Mapping[str, str]) -> None:
    """Refuse unknown ``RECIPROCAM_*`` variables (naming the closest valid one), a model list that is
    not a JSON list, and JSON that does not parse where a list or object is expected."""
    problems: list[str] = []
    for key, raw in sorted(environ.items()):
        name = key.upper()
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :]
        if rest in NOT_SETTINGS or rest.startswith(NOT_SETTINGS_PREFIX):
            continue
        problem = _check_variable(settings_cls, name, rest.lower().split("__"), raw)
        if problem:
            problems.append(problem)
    if problems:
        raise SettingsProblem("invalid settings in the environment:\n  " + "\n  ".join(problems))


def _check_variable(settings_cls: type[BaseModel], name: str, parts: list[str], raw: str) -> str | None:
    fields = settings_cls.model_fields
    top = parts[0]
    if top not in fields:
        return _unknown(name, _variable_names(settings_cls))
    field = fields[top]
    if len(parts) == 1:
        if top == "models":
            return _check_model_list(name, raw)
        return _check_json(name, raw, field)
    if top == "models":
        return _check_model_entry(_model_entry_class(settings_cls), name, parts, raw)
    inner = _model_class(field.annotation)
    if inner is None or len(parts) > 2 or parts[1] not in inner.model_fields:
        return _unknown(name, _variable_names(settings_cls))
    return _check_json(name, raw, inner.model_fields[parts[1]])


def _check_model_list(name: str, raw: str) -> str | None:
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        return f"{name} is not valid JSON ({exc}): write a JSON list of models, such as {MODELS_EXAMPLE}"
    if isinstance(value, dict):
        return (
            f"{name} holds one JSON object, not a list: put it in brackets, [{raw.strip()}] "
            "(the list replaces the default models)"
        )
    if not isinstance(value, list):
        return f"{name} must be a JSON list of models, such as {MODELS_EXAMPLE}"
    return None


def _check_model_entry(model_settings: type[BaseModel], name: str, parts: list[str], raw: str) -> str | None:
    if not parts[1].isdigit() or len(parts) < 3:
        return (
            f"{name} is not a model setting: write {ENV_PREFIX}MODELS__<n>__<FIELD> with n the entry's "
            f"position in the list, from 0 (e.g. {ENV_PREFIX}MODELS__0__WEIGHTS)"
        )
    field_name = parts[2]
    prefix = f"{ENV_PREFIX}MODELS__{parts[1]}__"
    fields = model_settings.model_fields
    if field_name not in fields or (len(parts) > 3 and field_name != "model_kwargs"):
        return _unknown(name, [prefix + known.upper() for known in fields])
    if len(parts) == 3 and raw.strip()[:1] in ("[", "{"):
        return _check_json(name, raw, fields[field_name])
    return None


def _check_json(name: str, raw: str, field: FieldInfo) -> str | None:
    """A list or object field reads its variable as JSON: say so when it does not parse."""
    if any(isinstance(item, NoDecode) or item is NoDecode for item in field.metadata):
        return None  # the field reads the text itself (comma-separated lists)
    kind = _json_kind(field.annotation)
    if kind is None:
        return None
    if kind == "list" and raw.strip()[:1] not in ("[", "{"):
        return None  # a string where a list or a string will do (a labels file, say)
    try:
        json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        example = '["a", "b"]' if kind == "list" else '{"key": 1}'
        return f"{name} is not valid JSON ({exc}): write a JSON {kind}, such as {example}"
    return None


def _json_kind(annotation: Any) -> str | None:
    """'object' or 'list' when the settings source reads the field as JSON, else None."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        kinds = [_json_kind(arg) for arg in typing.get_args(annotation)]
        scalar = any(
            kind is None and arg is not type(None)
            for kind, arg in zip(kinds, typing.get_args(annotation), strict=True)
        )
        found = next((kind for kind in kinds if kind), None)
        return "list" if found and scalar else found
    if origin is typing.Annotated:
        return _json_kind(typing.get_args(annotation)[0])
    if origin in (list, tuple, set) or annotation in (list, tuple, set):
        return "list"
    if origin is dict or annotation is dict or _model_class(annotation) is not None:
        return "object"
    return None


def _model_entry_class(settings_cls: type[BaseModel]) -> type[BaseModel]:
    """The class of one entry of the settings' ``models`` list."""
    (entry,) = typing.get_args(settings_cls.model_fields["models"].annotation)
    model = _model_class(entry)
    if model is None:
        raise TypeError("the settings' models field is not a list of settings models")
    return model


def _model_class(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _variable_names(settings_cls: type[BaseModel]) -> list[str]:
    names = [CONFIG_FILE_ENV]
    for top, field in settings_cls.model_fields.items():
        names.append(ENV_PREFIX + top.upper())
        inner = _model_class(field.annotation)
        if inner is not None:
            names.extend(f"{ENV_PREFIX}{top.upper()}__{sub.upper()}" for sub in inner.model_fields)
    entry = _model_entry_class(settings_cls)
    names.extend(f"{ENV_PREFIX}MODELS__0__{sub.upper()}" for sub in entry.model_fields)
    return names


def _unknown(name: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "the settings are listed in docs/service.md"
    return (
        f"{name} is not a setting ({hint}); variables that start with {ENV_PREFIX} are read as "
        "settings, so rename or unset it"
    )


# ---------------------------------------------------------------- validation errors

_WHAT_TO_WRITE = {
    "int_parsing": "write a whole number",
    "int_from_float": "write a whole number",
    "float_parsing": "write a number",
    "bool_parsing": "write true or false",
    "list_type": 'write a list (JSON in an environment variable, such as ["a", "b"])',
    "dict_type": 'write an object (JSON in an environment variable, such as {"key": 1})',
    "model_type": 'write an object (JSON in an environment variable, such as {"key": 1})',
    "model_attributes_type": 'write an object (JSON in an environment variable, such as {"key": 1})',
    "missing": "add it",
    "string_pattern_mismatch": "write letters, digits, '.', '_' or '-' (at most 64, the first a letter or digit)",
}


def describe_validation_error(
    exc: ValidationError, settings_cls: type[BaseModel], environ: Mapping[str, str]
) -> str:
    """One line per mistake: where it is (variable or config key), what is wrong, what to write."""
    upper_env = {key.upper(): value for key, value in environ.items()}
    config_file = upper_env.get(CONFIG_FILE_ENV)
    lines = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        dotted = ".".join(str(part) for part in loc) or "settings"
        where = _where(loc, dotted, upper_env, config_file)
        message = str(error["msg"]).removeprefix("Value error, ")
        field = _field_at(settings_cls, loc)
        short = field is not None and field.description and len(field.description) <= 70
        described = f" ({field.description})" if field is not None and short else ""
        line = f"{where}{described}: {message}"
        if error["type"] == "extra_forbidden":
            line = f"{where}: {loc[-1]!r} is not a setting here"
            siblings = _fields_at(settings_cls, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), siblings, n=1, cutoff=0.6)
            line += f"; did you mean {close[0]!r}?" if close else f"; the keys here are {', '.join(siblings)}"
        elif error["type"] in _WHAT_TO_WRITE:
            line += f"; {_WHAT_TO_WRITE[error['type']]}"
        if "api_keys" not in loc and error["type"] != "missing":
            shown = repr(error.get("input"))
            line += f" (got {shown[:80] + '...' if len(shown) > 80 else shown})"
        lines.append(line)
    return "invalid settings:\n  " + "\n  ".join(lines)


def _where(loc: tuple[Any, ...], dotted: str, environ: Mapping[str, str], config_file: str | None) -> str:
    for end in range(len(loc), 0, -1):
        name = ENV_PREFIX + "__".join(str(part).upper() for part in loc[:end])
        if name in environ:
            return f"{name} (setting {dotted})"
    if config_file:
        return f"{dotted} in {config_file}"
    return f"setting {dotted}"


def _fields_at(settings_cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] | None = settings_cls
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        model = _item_model(field.annotation)
    return list(model.model_fields) if model is not None else []


def _field_at(settings_cls: type[BaseModel], loc: tuple[Any, ...]) -> FieldInfo | None:
    model: type[BaseModel] | None = settings_cls
    field: FieldInfo | None = None
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None:
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        model = _item_model(field.annotation)
    return field


def _item_model(annotation: Any) -> type[BaseModel] | None:
    """The settings model a field holds, itself or as the items of a list."""
    if typing.get_origin(annotation) is list:
        (annotation,) = typing.get_args(annotation)
    return _model_class(annotation)
