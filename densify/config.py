"""Config loading: YAML -> pydantic models, with errors that name the file and the bad key."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or option is invalid; the message names the key."""


def config_dir() -> Path:
    """configs/ of a source checkout, else the copy packaged inside the wheel."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "configs", here / "_configs"):
        if (cand / "profiles").is_dir():
            return cand
    raise FileNotFoundError("densify's configs/ folder is missing from this installation")


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {key}: {err['msg']}")
    return "\n".join(lines)


def validate(model: type[M], data: dict, source: str) -> M:
    try:
        return model.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_yaml_model(model: type[M], path: str | Path, overrides: dict | None = None) -> M:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read YAML ({exc})") from None
    if overrides:
        data = deep_merge(data, overrides)
    return validate(model, data, str(path))


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_set_options(items: list[str] | None) -> dict:
    """`--set a.b=3 --set engine.name=hf` -> nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out
