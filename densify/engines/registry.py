"""The engine registry: one line per engine, naming its class and its typed options as "module:Class"
strings, loaded on first use (so validating a config imports neither torch, vLLM, Ray, the openai SDK nor
the simulator), and `create_engine`, which builds an engine from its typed options.

Nothing here knows what an engine does: whether it loads a checkpoint, where its model goes, which engine
answers inside a pool, whether it is simulated, its answer identity and how it shares a GPU are questions
its options model answers (`densify.engines.options.EngineOptions`).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

from densify.engines.base import Engine, EngineError, EngineStartError

__all__ = ["create_engine", "engine_names", "register_engine", "options_model", "validate_engine_options",
           "check_available", "default_engine", "pool_default_engine", "split_runtime", "engine_class"]


def _load(target: Any) -> Any:
    if not isinstance(target, str):
        return target
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Entry:
    engine: Any
    """'module:Class', or the engine class itself."""
    options: Any
    """'module:Class' of its options model (a densify.engines.options.EngineOptions), or the model."""
    extra: str = ""
    """The pip extra that brings the engine's packages (for the message when they are missing)."""
    requires: tuple[str, ...] = ()
    """Top-level packages the engine imports when it starts."""
    needs: str = ""
    """What else it needs, said when its packages are missing (e.g. a CUDA GPU)."""
    auto: int = 0
    """Rank among the real model's engines that `engine.name: auto` picks from (1 first; 0: never)."""


_ENGINES: dict[str, Entry] = {
    "simulated": Entry("densify.sim.engine:SimulatedEngine", "densify.sim.options:SimulatedOptions"),
    "hf": Entry("densify.engines.hf:HFEngine", "densify.engines.options:HFOptions", "hf", ("torch", "transformers"), auto=2),
    "vllm": Entry("densify.engines.vllm:VLLMEngine", "densify.engines.options:VLLMOptions", "vllm", ("vllm",), "a CUDA GPU", auto=1),
    "openai": Entry("densify.engines.openai:OpenAIEngine", "densify.engines.options:OpenAIOptions", "openai"),
    "ray": Entry("densify.engines.ray_pool:RayPoolEngine", "densify.engines.options:RayOptions", "ray", ("ray",)),
}


def register_engine(name: str, engine: type[Engine] | str, options: Any = None) -> None:
    """Add an engine (a class, or 'module:Class') under `name` with its options model (default: no options)."""
    model = _load(options if options is not None else "densify.engines.options:EngineOptions")
    if model.engine_name != name:  # the model names its engine (answer identity, messages)
        model = type(model.__name__, (model,), {"__module__": model.__module__, "engine_name": name})
    _ENGINES[name] = Entry(engine, model)


def engine_names() -> list[str]:
    return list(_ENGINES)


def _entry(name: str) -> Entry:
    if name not in _ENGINES:
        close = difflib.get_close_matches(name, _ENGINES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown engine {name!r}{hint}; available: {', '.join(_ENGINES)}")
    return _ENGINES[name]


def options_model(name: str) -> type:
    """The typed options model of engine `name` (KeyError naming the known engines)."""
    return _load(_entry(name).options)


def engine_class(name: str) -> type[Engine]:
    return _load(_entry(name).engine)


def validate_engine_options(name: str, options: dict | None, where: str = "engine.options") -> Any:
    """Options of engine `name` as its typed model; a ValueError names the bad key (`where`.key)."""
    return options_model(name).parse(options, where)


def split_runtime(name: str, options: dict) -> tuple[dict, dict]:
    """(config options, Python-only arguments such as `truth`) of keyword options for engine `name`."""
    runtime = options_model(name).runtime
    return ({k: v for k, v in options.items() if k not in runtime},
            {k: v for k, v in options.items() if k in runtime})


def default_engine() -> str:
    """The real model's engine for `engine.name: auto`: the first by rank whose packages are installed
    (vLLM when it is, else transformers), else the last."""
    ranked = sorted((e.auto, n) for n, e in _ENGINES.items() if e.auto)
    for _, name in ranked:
        if all(importlib.util.find_spec(m) is not None for m in _ENGINES[name].requires):
            return name
    return ranked[-1][1]


def pool_default_engine() -> str:
    """The engine a Ray pool's actors run when none is named: the real model's, as for `engine.name: auto`
    (the simulator only ever runs when asked for by name)."""
    return default_engine()


def check_available(name: str) -> None:
    """EngineStartError naming the pip extra when an engine's packages are not installed (checked before a
    model is looked for, so the message names what is really missing)."""
    entry = _entry(name)
    missing = [m for m in entry.requires if importlib.util.find_spec(m) is None]
    if missing:
        raise EngineStartError(f"the {name} engine needs {', '.join(missing)}, which is not installed here: "
                               f"pip install 'densify[{entry.extra}]'" + (f" (and {entry.needs})" if entry.needs else ""))


def create_engine(engine: Any, *, profile, **options: Any) -> Engine:
    """Build an engine for a profile from its typed options (as a config holds them: not checked again),
    or from a registered name and keyword options, checked here (ValueError naming the key). Other keyword
    arguments are the engine's Python-only ones (e.g. the simulator's `truth`)."""
    if isinstance(engine, str):
        config, runtime = split_runtime(engine, options)
        opts = validate_engine_options(engine, config)
    else:
        opts, runtime = engine, options
        extra = set(runtime) - type(opts).runtime
        if extra:
            raise TypeError(f"the {opts.engine_name} engine takes no argument {', '.join(sorted(extra))} besides "
                            f"its options")
    opts = opts.to_build()
    entry = _entry(opts.engine_name)
    try:
        return _load(entry.engine)(profile, opts, **runtime)
    except EngineError:
        raise
    except ImportError as exc:  # the engine module, or a package it imports when it starts
        extra = f"pip install 'densify[{entry.extra}]'" if entry.extra else "reinstall densify"
        raise EngineStartError(f"the {opts.engine_name} engine needs a package that is not installed ({exc}); "
                               f"{extra}") from None
    except (OSError, ValueError, RuntimeError, ConnectionError) as exc:
        raise EngineStartError(f"the {opts.engine_name} engine could not start: {type(exc).__name__}: {exc}") from exc
