"""Engines register by name; `create_engine(config)` builds one from its config."""

from __future__ import annotations

import importlib
from typing import Any, Callable

from densify.engines.base import (Completion, Engine, EngineBatch, EngineError, GroundTruth, PromptImage,
                                  Query, Sampling, generate_stream)

__all__ = ["Completion", "Engine", "EngineBatch", "EngineError", "GroundTruth", "PromptImage", "Query",
           "Sampling", "create_engine", "generate_stream", "register_engine", "ENGINE_MODULES"]

_REGISTRY: dict[str, Callable[..., Engine]] = {}

# name -> module that registers it (imported lazily: heavy engines pull torch/vllm/ray only when used)
ENGINE_MODULES = {
    "simulated": "densify.engines.simulated",
    "hf": "densify.engines.hf",
    "vllm": "densify.engines.vllm",
    "openai": "densify.engines.openai",
    "ray": "densify.engines.ray_pool",
}


def register_engine(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory
    return deco


def create_engine(name: str, **options: Any) -> Engine:
    if name not in _REGISTRY:
        if name not in ENGINE_MODULES:
            raise KeyError(f"unknown engine {name!r}; available: {', '.join(sorted(ENGINE_MODULES))}")
        importlib.import_module(ENGINE_MODULES[name])
    return _REGISTRY[name](**options)
