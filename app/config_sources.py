"""Where settings come from besides the defaults: the config file named by
``RECIPROCAM_CONFIG_FILE``, and the environment with ``RECIPROCAM_MODELS__<n>__<FIELD>`` applied to
entry ``n`` of the model list (see :mod:`app.config` for the precedence)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import PydanticBaseSettingsSource

from app.config_errors import CONFIG_FILE_ENV, ENV_PREFIX, SettingsProblem, check_environment


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON or YAML (needs PyYAML) settings file as a dict."""
    file_path = Path(path)
    if not file_path.is_file():
        raise SettingsProblem(
            f"config file {file_path} does not exist: give the path of a JSON or YAML settings file "
            f"(serve --config FILE or {CONFIG_FILE_ENV})"
        )
    text = file_path.read_text(encoding="utf-8")
    if file_path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:  # pragma: no cover - PyYAML ships with uvicorn[standard]
            raise ValueError("reading a YAML config file needs PyYAML; use JSON instead") from exc
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {file_path} is not valid YAML: {exc}") from exc
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {file_path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SettingsProblem(
            f"config file {file_path} must hold a mapping at the top level, with keys such as models, "
            "batch and limits (docs/service.md lists them)"
        )
    return data


class ConfigFileSource(PydanticBaseSettingsSource):
    """The file named by RECIPROCAM_CONFIG_FILE, if any."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # pragma: no cover - __call__ does the work

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get(CONFIG_FILE_ENV)
        return read_config_file(path) if path else {}


_INDEXED_MODEL = re.compile(rf"^{ENV_PREFIX}MODELS__(\d+)__(.+)$", re.IGNORECASE)


class WithoutIndexedModels(PydanticBaseSettingsSource):
    """The ordinary environment source, minus ``MODELS__<n>__...`` (ModelListSource applies those)."""

    def __init__(self, inner: PydanticBaseSettingsSource) -> None:
        super().__init__(inner.settings_cls)
        self.inner = inner

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # pragma: no cover - __call__ does the work

    def __call__(self) -> dict[str, Any]:
        values = self.inner()
        models = values.get("models")
        if isinstance(models, dict):
            values.pop("models")
        return values


class ModelListSource(PydanticBaseSettingsSource):
    """The model list with ``RECIPROCAM_MODELS__<n>__<FIELD>`` overrides applied to its entries.

    The base list is ``RECIPROCAM_MODELS`` (JSON) if set, else the config file's ``models``, else the
    defaults. Returns nothing when no indexed variable is set, so the other sources apply as usual.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # pragma: no cover - __call__ does the work

    def __call__(self) -> dict[str, Any]:
        # the first source that reads the environment: refuse what no source would read correctly
        check_environment(self.settings_cls, os.environ)
        overrides: dict[int, dict[str, Any]] = {}
        for key, raw in os.environ.items():
            match = _INDEXED_MODEL.match(key)
            if not match:
                continue
            target = overrides.setdefault(int(match.group(1)), {})
            parts = match.group(2).lower().split("__")
            for part in parts[:-1]:
                target = target.setdefault(part, {})
            # model_kwargs are free-form (dict[str, Any]): "64" or "true" there means the number or
            # the boolean, which timm needs; typed fields are converted by their own validation
            free_form = parts[0] == "model_kwargs" and len(parts) > 1
            target[parts[-1]] = _parse_env_value(raw, scalars=free_form)
        if not overrides:
            return {}
        base: list[dict[str, Any]]
        env_list = os.environ.get(f"{ENV_PREFIX}MODELS")
        config_path = os.environ.get(CONFIG_FILE_ENV)
        if env_list:
            base = json.loads(env_list)
        elif config_path and "models" in (file_values := read_config_file(config_path)):
            base = list(file_values["models"])
        else:
            default = self.settings_cls.model_fields["models"].default_factory
            base = [model.model_dump() for model in default()]  # type: ignore[call-arg, misc]
        merged = [dict(entry) for entry in base]
        for index in sorted(overrides):
            if index < len(merged):
                merged[index] = _deep_merge(merged[index], overrides[index])
            elif index == len(merged):
                merged.append(overrides[index])
            else:
                raise SettingsProblem(
                    f"{ENV_PREFIX}MODELS__{index}__...: the model list has {len(merged)} entries; "
                    f"write an index from 0 to {len(merged)} ({len(merged)} adds an entry)"
                )
        return {"models": merged}


def _parse_env_value(raw: str, *, scalars: bool = False) -> Any:
    """JSON lists and objects as such; with ``scalars``, also JSON numbers, booleans and null; any
    other text as the string it is."""
    text = raw.strip()
    if text[:1] in ("[", "{") or scalars:
        try:
            return json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            return raw
    return raw


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
