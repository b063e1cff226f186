"""Pipeline configs: pydantic models, each field documented, loaded from YAML and `--set` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from densify.config import config_dir, deep_merge, load_yaml_model, validate


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("simulated", description="simulated | hf | vllm | openai | ray")
    options: dict = Field(default_factory=dict, description="keyword options of that engine")


class PlanConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stride: float | None = Field(None, description="one query every `stride` original pixels")
    count: int | list[int] | None = Field(3072, description="total queries (aspect kept) or [nx, ny]")
    mode: Literal["grid", "adaptive"] = Field(
        "adaptive", description="grid: one uniform grid; adaptive: a coarse grid, then rounds of queries where the "
                            "field is uncertain (densify.fields.adaptive), one engine call per round")
    budget: int | None = Field(None, ge=1, description="adaptive: queries per image (default: the grid's size)")
    rounds: int = Field(4, ge=0, description="adaptive: refinement rounds after the coarse grid")
    coarse: float = Field(0.5, gt=0, le=1, description="adaptive: share of the budget spent on the coarse grid")

    @model_validator(mode="after")
    def _one(self):
        if self.stride is not None:
            self.count = None
        if self.stride is None and self.count is None:
            raise ValueError("set plan.stride or plan.count")
        return self

    def grid_kwargs(self) -> dict:
        if self.stride is not None:
            return {"stride": self.stride}
        return {"count": tuple(self.count) if isinstance(self.count, list) else self.count}


class DensifyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = Field("edge", description="edge (edge-aware, image-guided) or linear (see densify.fields)")
    outliers: bool = Field(True, description="drop answers that disagree with their neighbours")
    options: dict = Field(default_factory=dict, description="method-specific options")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    npy: bool = True
    png16: bool = True
    preview: bool = True
    ply: bool = True
    ply_stride: int = Field(2, ge=1, description="keep every n-th pixel in the point cloud")
    answers: bool = True
    confidence: bool = True


class DepthJobConfig(BaseModel):
    """`densify depth`: per image, point-query depth answers densified to a metric depth map."""
    model_config = ConfigDict(extra="forbid")
    profile: str = Field("vlm3-depth", description="model profile name (configs/profiles) or YAML path")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    densify: DensifyConfig = Field(default_factory=DensifyConfig)
    outputs: OutputConfig = Field(default_factory=OutputConfig)
    default_hfov_deg: float = Field(60.0, description="field of view assumed when no intrinsics are given")
    logprobs: bool = Field(False, description="ask engines for answer log-probabilities")
    structured: bool = Field(False, description="constrain answers with the profile's regex (vllm)")
    images_in_flight: int = Field(2, ge=1, description="images prepared ahead of the engine")
    overwrite: bool = Field(False, description="redo images whose outputs exist")


def load_job_config(model: type[BaseModel], path: str | Path | None, overrides: dict | None = None,
                    default_name: str | None = None):
    if path is None and default_name is not None:
        cand = config_dir() / "pipelines" / f"{default_name}.yaml"
        path = cand if cand.is_file() else None
    if path is None:
        return validate(model, overrides or {}, "options")
    return load_yaml_model(model, path, overrides)


def depth_overrides(args) -> dict:
    """The depth-job options every command shares (--set, --profile, --engine, --model, --stride, --count,
    --overwrite) as config overrides; options a command lacks are skipped."""
    from densify.config import parse_set_options

    over = parse_set_options(getattr(args, "set", None))
    if getattr(args, "profile", None):
        over["profile"] = args.profile
    if getattr(args, "engine", None):
        over.setdefault("engine", {})["name"] = args.engine
    if getattr(args, "model", None):
        over.setdefault("engine", {}).setdefault("options", {})["model"] = args.model
    if getattr(args, "stride", None):
        over["plan"] = {"stride": args.stride, "count": None}
    elif getattr(args, "count", None):
        over["plan"] = {"count": args.count}
    if getattr(args, "overwrite", False):
        over["overwrite"] = True
    return over


__all__ = ["depth_overrides", "EngineConfig", "PlanConfig", "DensifyConfig", "OutputConfig", "DepthJobConfig", "load_job_config",
           "deep_merge"]
