"""Load pydantic configs from YAML with CLI overrides, and turn validation errors into one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or flag is wrong; the message is one line naming the key."""


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem: ``source: key.path: message``."""
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        problems.append(f"{source}: {key}: {message}")
    return "; ".join(problems)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; raise ``ConfigError`` naming the file on any problem."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``overrides`` merged in; nested mappings merge, other values replace."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    model: type[M],
    path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
) -> M:
    """Build ``model`` from ``defaults`` <- YAML file <- CLI ``overrides`` (``None`` values dropped).

    Raises:
        ConfigError: one line naming the file (or ``--flag``) and the offending key.
    """
    data: dict[str, Any] = dict(defaults or {})
    source = "defaults"
    if path is not None:
        data = deep_merge(data, read_yaml(path))
        source = str(path)
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    if flags:
        data = deep_merge(data, flags)
        source = f"{source} + command-line flags" if path is not None else "command-line flags"
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
