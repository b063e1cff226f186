"""Engines, registered once by name with their typed options; `create_engine(name, profile=..., **options)`.

An engine module is imported only when that engine is built (vLLM, torch, Ray and the openai SDK load on
demand); options are validated without importing it (`densify.engines.options`).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from densify.engines.base import (Completion, Engine, EngineBatch, EngineError, EngineStartError, ImageRef, PromptImage,
                                  Query, Sampling, generate_stream)
from densify.engines.options import EngineOptions, HFOptions, OpenAIOptions, RayOptions, SimulatedOptions, VLLMOptions

__all__ = ["Completion", "Engine", "EngineBatch", "EngineError", "EngineStartError", "ImageRef",
           "PromptImage", "Query", "Sampling", "create_engine", "engine_names", "generate_stream",
           "register_engine", "validate_engine_options", "options_model", "check_available"]


@dataclass(frozen=True)
class _Entry:
    target: Any
    """'module:Class', or the engine class itself."""
    options: type[EngineOptions]
    extra: str = ""
    """The pip extra that brings the engine's packages (for the message when they are missing)."""
    requires: tuple[str, ...] = ()
    """Top-level packages the engine imports when it starts."""

    def load(self) -> type[Engine]:
        if not isinstance(self.target, str):
            return self.target
        module, cls = self.target.split(":")
        return getattr(importlib.import_module(module), cls)


_ENGINES: dict[str, _Entry] = {
    "simulated": _Entry("densify.sim.engine:SimulatedEngine", SimulatedOptions),
    "hf": _Entry("densify.engines.hf:HFEngine", HFOptions, "hf", ("torch", "transformers")),
    "vllm": _Entry("densify.engines.vllm:VLLMEngine", VLLMOptions, "vllm", ("vllm",)),
    "openai": _Entry("densify.engines.openai:OpenAIEngine", OpenAIOptions, "openai"),
    "ray": _Entry("densify.engines.ray_pool:RayPoolEngine", RayOptions, "ray", ("ray",)),
}

# Python-only arguments an engine takes besides its config options (objects, not config values).
_RUNTIME_ARGS = {"simulated": frozenset({"truth"}), "vllm": frozenset({"llm"})}


def register_engine(name: str, engine: type[Engine] | str, options: type[EngineOptions] = EngineOptions) -> None:
    """Add an engine (a class, or 'module:Class') under `name` with its options model."""
    _ENGINES[name] = _Entry(engine, options)


def engine_names() -> list[str]:
    return list(_ENGINES)


def options_model(name: str) -> type[EngineOptions]:
    if name not in _ENGINES:
        close = difflib.get_close_matches(name, _ENGINES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown engine {name!r}{hint}; available: {', '.join(_ENGINES)}")
    return _ENGINES[name].options


def validate_engine_options(name: str, options: dict | None, where: str = "engine.options") -> EngineOptions:
    """Options of engine `name` as its typed model; a ValueError names the bad key (`where`.key)."""
    model = options_model(name)
    options = dict(options or {})
    for key in options:
        if key not in model.model_fields:
            close = difflib.get_close_matches(key, model.model_fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}.{key}: not an option of the {name} engine{hint}; its options: "
                             f"{', '.join(model.model_fields) or 'none'}")
    try:
        opts = model.model_validate(options)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"{where}.{key}: {err['msg']} (got {err.get('input')!r})") from None
    if isinstance(opts, RayOptions):
        if opts.engine == "ray":
            raise ValueError(f"{where}.engine: the Ray pool cannot run itself; name the engine each actor runs")
        validate_engine_options(opts.engine, opts.engine_options, f"{where}.engine_options")
    return opts


def check_available(name: str) -> None:
    """EngineStartError naming the pip extra when an engine's packages are not installed (checked before a
    model is looked for, so the message names what is really missing)."""
    entry = _ENGINES.get(name)
    if entry is None:
        options_model(name)  # raises the unknown-engine KeyError
    missing = [m for m in entry.requires if importlib.util.find_spec(m) is None]
    if missing:
        raise EngineStartError(f"the {name} engine needs {', '.join(missing)}, which is not installed here: "
                               f"pip install 'densify[{entry.extra}]'" + (" (and a CUDA GPU)" if name == "vllm" else ""))


def create_engine(name: str, *, profile, **options: Any) -> Engine:
    """Build engine `name` for a profile; options are validated (ValueError naming the key) first."""
    runtime = {k: options.pop(k) for k in list(options) if k in _RUNTIME_ARGS.get(name, ())}
    opts = validate_engine_options(name, options)
    entry = _ENGINES[name]
    kwargs = opts.model_dump()
    kwargs.update(kwargs.pop("llm_kwargs", None) or {})
    kwargs.update(runtime)
    try:
        return entry.load()(profile, **kwargs)
    except EngineError:
        raise
    except ImportError as exc:  # the engine module, or a package it imports when it starts
        extra = f"pip install 'densify[{entry.extra}]'" if entry.extra else "reinstall densify"
        raise EngineStartError(f"the {name} engine needs a package that is not installed ({exc}); {extra}") from None
    except (OSError, ValueError, RuntimeError, ConnectionError) as exc:
        raise EngineStartError(f"the {name} engine could not start: {type(exc).__name__}: {exc}") from exc
