"""Building a stage's engine from settings: the model is checked first, so a missing one fails at once."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from densify.config.loading import ConfigError
from densify.config.profiles import Profile
from densify.engines import Engine, EngineStartError, check_available, create_engine
from densify.engines.options import EngineOptions, RayOptions
from densify.stages.settings import EngineConfig

log = logging.getLogger("densify.engine")


def no_model_hint(option: str = "--model") -> str:
    return (f"give a checkpoint with {option} PATH (a local folder) and an engine with --engine vllm, hf or openai; "
            f"or try `densify demo` (a synthetic scene and the simulated engine, no model needed)")


STAGE_OPTIONS = {"depth": "--model", "corr": "--corr-model", "pose": "--pose-model"}
"""The command-line option that sets each stage's checkpoint (named in the hint when one is missing)."""


def _looks_local(model: str) -> bool:
    """A path, not a hub name ('org/name' or 'name')."""
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model


def check_model(model: str, option: str = "--model") -> None:
    """A checkpoint hf/vllm can load: a local folder with config.json, or a hub name that is cached here or
    reachable. Never waits long on the network (a 5 s probe), and never goes to the hub for a local path.
    `option` is what sets this checkpoint, named in the hint."""
    hint = no_model_hint(option)
    p = Path(model).expanduser()
    if p.exists():
        if p.is_dir() and not (p / "config.json").is_file():
            raise EngineStartError(f"{option} {model}: the folder has no config.json, so it is not a model checkpoint; "
                                   f"{hint}")
        return
    if _looks_local(model):
        raise EngineStartError(f"{option} {model}: no such folder; {hint}")
    try:
        import huggingface_hub as hub
    except ImportError:
        raise EngineStartError(f"model {model!r} is a hub name but huggingface_hub is not installed; "
                               f"{hint}") from None
    if isinstance(hub.try_to_load_from_cache(model, "config.json"), str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise EngineStartError(f"model {model!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                               f"{hint}")
    try:
        hub.model_info(model, timeout=5)
    except Exception as exc:  # no network, no such repo, gated: all mean "not loadable from here"
        why = " ".join(str(exc).split())[:200]
        raise EngineStartError(f"model {model!r} is not available: not in the local Hugging Face cache, and the hub "
                               f"could not be asked ({type(exc).__name__}: {why}); {hint}") from None


def stage_options(engine: EngineConfig, model: str | None, ray: RayOptions | None = None,
                  option: str = "--model") -> EngineOptions:
    """The engine's typed options with the stage's model (set by `option`) put where that engine takes it,
    run in the Ray pool of `ray` when it is given and enabled (copies: nothing is validated again)."""
    try:
        opts = engine.options.with_model(model)
    except ValueError as exc:
        raise ConfigError(f"{option}: {exc}") from None
    return ray.around(opts) if ray is not None else opts


def preflight(engine: EngineConfig, profile: Profile, *, model: str | None = None, option: str = "--model",
              ray: RayOptions | None = None) -> EngineOptions:
    """What can be checked without starting the engine (its packages, its checkpoint: `option` sets it);
    the stage's options (`stage_options`)."""
    opts = stage_options(engine, model, ray, option)
    answering = opts.answering()
    for name in dict.fromkeys((opts.engine_name, answering.engine_name)):
        check_available(name)
    if answering.needs_checkpoint():
        check_model(answering.checkpoint(profile.model), option)
    return opts


def build_engine(engine: EngineConfig, profile: Profile, *, model: str | None = None,
                 ray: RayOptions | None = None, option: str = "--model") -> Engine:
    """The configured engine for a profile; in a pool of Ray actors when `ray` is given and enabled. Its
    packages and its checkpoint are checked first, so a missing one fails at once."""
    return create_engine(preflight(engine, profile, model=model, option=option, ray=ray), profile=profile)


class StageEngines:
    """The engine of each stage of a multi-stage run ('depth', 'corr', 'pose'), built when the stage first
    needs it (one model loaded at a time) unless the caller gave one; `open` says whether the caller must
    close it."""

    def __init__(self, engine: EngineConfig, models: dict[str, str | None], given: dict[str, Engine] | None = None):
        self.engine, self.models, self.given = engine, models, given if given is not None else {}

    def check(self, stages: dict[str, str]) -> None:
        """Every stage's engine and checkpoint (stage -> profile name) checked before any of them starts, so a
        missing corr or pose checkpoint is found before the depth work, naming the option that sets it."""
        from densify.config.profiles import load_profile

        for stage, profile in stages.items():
            if stage not in self.given:
                preflight(self.engine, load_profile(profile), model=self.models.get(stage),
                          option=STAGE_OPTIONS.get(stage, "--model"))

    def open(self, stage: str, profile: Profile) -> tuple[Engine, bool]:
        if stage in self.given:
            return self.given[stage], False
        return build_engine(self.engine, profile, model=self.models.get(stage),
                            option=STAGE_OPTIONS.get(stage, "--model")), True
