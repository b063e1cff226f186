"""Config loading: YAML -> pydantic models, with errors that name the file, the key and the override."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or option is invalid; the message names the key."""


def config_dir() -> Path:
    """configs/ of a source checkout, else the copy packaged inside the wheel."""
    package = Path(__file__).resolve().parents[1]
    for cand in (package.parent / "configs", package / "_configs"):
        if (cand / "profiles").is_dir():
            return cand
    raise FileNotFoundError("densify's configs/ folder is missing from this installation")


@dataclass(frozen=True)
class Override:
    """One setting given on the command line: its key path, value and how the user wrote it."""

    path: tuple[str, ...]
    value: Any
    origin: str
    """e.g. "--set plan.count=0" or "--count 0": named in the error when this override is the bad one."""


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The nested model a validation error's location points into (for 'did you mean')."""
    for part in loc:
        f = model.model_fields.get(str(part)) if isinstance(model, type) else None
        ann = getattr(f, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def format_validation_error(exc: ValidationError, source: str, model: type[BaseModel] | None = None,
                            overrides: tuple[Override, ...] = ()) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1]) if model is not None else None
            known = list(parent.model_fields) if parent is not None else []
            close = difflib.get_close_matches(loc[-1], known, n=1)
            msg = f"unknown key {loc[-1]!r}" + (f" (did you mean {close[0]!r}?)" if close else "") + \
                (f"; known keys: {', '.join(known)}" if known else "")
        elif msg.startswith(key + ".") or msg.startswith(key + ":"):
            key = ""  # the message names the key itself (engine options)
        blame = next((o for o in reversed(overrides) if o.path[:len(loc)] == loc or loc[:len(o.path)] == o.path),
                     None)
        where = f"{blame.origin}: " if blame is not None else f"{source}: "
        lines.append(where + (f"{key}: " if key else "") + msg)
    return "\n".join(lines)


def validate(model: type[M], data: dict, source: str, overrides: tuple[Override, ...] = ()) -> M:
    try:
        return model.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, model, overrides)) from None


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own message quotes the text over lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    text = f"{context}: {problem}" if context else problem
    if mark is not None:
        text += f" at line {mark.line + 1}, column {mark.column + 1}"
    if "constructor for the tag" in problem:
        text += "; settings are plain YAML: remove the tag"
    return " ".join(text.split())


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping (key: value), got {type(data).__name__}")
    return data


def load_yaml_model(model: type[M], path: str | Path, overrides: dict | None = None) -> M:
    data = read_yaml(path)
    if overrides:
        data = deep_merge(data, overrides)
    return validate(model, data, str(path))


def apply_overrides(data: dict, overrides) -> dict:
    """Overrides (in order) merged into a config dict."""
    out = dict(data)
    for o in overrides:
        node: dict = {}
        leaf = node
        for p in o.path[:-1]:
            leaf = leaf.setdefault(p, {})
        leaf[o.path[-1]] = o.value
        out = deep_merge(out, node)
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_set(items: list[str] | None) -> list[Override]:
    """`--set a.b=3 --set engine.name=hf` -> overrides (values parsed as YAML scalars)."""
    out = []
    for item in items or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"--set {item}: expected key=value, e.g. --set plan.count=1024")
        key, value = item.split("=", 1)
        try:
            val = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item}: the value is not valid YAML ({yaml_problem(exc)})") from None
        out.append(Override(tuple(key.strip().split(".")), val, f"--set {item}"))
    return out


def parse_set_options(items: list[str] | None) -> dict:
    """`--set` items as one nested dict."""
    return apply_overrides({}, parse_set(items))


def dict_overrides(data: dict, origin: str = "options", _path: tuple = ()) -> list[Override]:
    """A nested dict of settings as overrides (Python callers and tests)."""
    out = []
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out += dict_overrides(v, origin, _path + (k,))
        else:
            out.append(Override(_path + (k,), v, f"{origin} {'.'.join(_path + (k,))}"))
    return out
