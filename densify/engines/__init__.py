"""Engines: a batch of text queries over shared images in, answer texts out (base.py), each engine with its
typed options (options.py; the simulator's in densify.sim.options), registered once by name (registry.py),
built by `create_engine(options, profile=...)` from the options a config holds, or
`create_engine(name, profile=..., **options)` in Python.

Adding an engine touches four places: its module (a subclass of `Engine` whose constructor takes
`(profile, options=None, *, <Python-only arguments>, **keyword options)`), its options model (a subclass of
`EngineOptions` naming `engine_name`, its `transport` options and what it answers for the rest of densify:
checkpoint, model, GPU sharing), one line in `registry._ENGINES`, and its row in README's engine table.

An engine module is imported only when that engine is built (vLLM, torch, Ray and the openai SDK load on
demand). This package may import densify.config and densify.io; it never imports the simulator, the
stages or the commands (the registry names the simulator by string).
"""

from __future__ import annotations

from densify.engines.base import (Completion, Engine, EngineBatch, EngineError, EngineStartError, ImageRef, PromptImage,
                                  Query, Sampling, generate_stream)
from densify.engines.registry import (check_available, create_engine, default_engine, engine_names, options_model,
                                      register_engine, validate_engine_options)
from densify.engines.options import EngineOptions, HFOptions, OpenAIOptions, RayOptions, VLLMOptions

__all__ = ["Completion", "Engine", "EngineBatch", "EngineError", "EngineStartError", "ImageRef",
           "PromptImage", "Query", "Sampling", "create_engine", "engine_names", "generate_stream",
           "register_engine", "validate_engine_options", "options_model", "check_available", "default_engine",
           "EngineOptions", "HFOptions", "OpenAIOptions", "RayOptions", "VLLMOptions"]
