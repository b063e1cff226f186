"""Settings of every job: pydantic models, each field documented, validated when the config loads.

Loaded from configs/pipelines/<job>.yaml, an optional `--config FILE` and command-line overrides; an error
names the key, and the override that set it (`--set plan.count=0`, `--count -5`). The models' defaults are
the YAML files' values (DepthConfig: depth.yaml, LabelConfig: label.yaml, ReconstructConfig:
reconstruct.yaml; tests/test_settings_defaults.py holds them together), so Python callers (`Densifier`,
`LabelJob(LabelConfig(...))`) and the commands run the same settings.
Nothing is checked later than here that could be checked here: engine options against the engine's typed
options, the densifier by name, counts and strides positive, the profile's existence and task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import (BaseModel, ConfigDict, Field, SerializeAsAny, field_serializer, field_validator,
                      model_validator)

from densify.config.loading import ConfigError, Override, apply_overrides, config_dir, read_yaml, validate
from densify.engines.options import EngineOptions, RayOptions
from densify.engines.registry import default_engine, options_model, pool_default_engine
from densify.geometry.export import ExportConfig
from densify.geometry.fusion import FusionConfig
from densify.geometry.pose import PoseConfig
from densify.geometry.posegraph import PoseGraphConfig
from densify.pairs.select import PairsConfig
from densify.queries.forcing import ForcingSettings as ForcingConfig

__all__ = ["EngineConfig", "AutoPlanConfig", "ForcingConfig", "PlanConfig", "DensifyConfig", "OutputConfig",
           "DepthConfig", "StoreConfig", "RayConfig", "LabelConfig", "CorrConfig", "PoseStageConfig", "ModelsConfig",
           "SceneDepthConfig", "ReconstructConfig",
           "load_config", "default_engine"]

M = TypeVar("M", bound=BaseModel)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class EngineConfig(_Model):
    name: str = Field("auto", description="auto (the real model: vllm when installed, else hf) | vllm | hf | "
                                          "openai | ray | simulated (tests and demos only: answers from ground truth)")
    options: Any = Field(default_factory=dict, description="that engine's options (densify.engines.options), "
                         "held as its typed options once the config loads")

    @model_validator(mode="after")
    def _check(self):
        """The options become the engine's typed options, here and only here (engines take them as they are)."""
        if self.name == "auto":
            self.name = default_engine()
        try:
            model = options_model(self.name)
        except KeyError as exc:
            raise ValueError(f"engine.name: {exc.args[0]}") from None
        if isinstance(self.options, dict):
            self.options = model.parse(self.options)
        elif not isinstance(self.options, model):
            raise ValueError(f"engine.options: {type(self.options).__name__} given for the {self.name} engine")
        return self

    @field_serializer("options")
    def _options_as_given(self, options: EngineOptions, info):
        """What was set, as a config writes it (config.yaml): the defaults stay the engine's."""
        return options.model_dump(mode="json" if info.mode_is_json() else "python", exclude_unset=True)

    @property
    def simulated(self) -> bool:
        """Whether the engine that answers is the simulator (a pool's actors' engine for `ray`)."""
        return self.options.answering().simulated

    def answer_identity(self, model: str | None = None) -> str:
        """The identity of the answers (EngineOptions.answer_identity) with a stage's model put in."""
        return self.options.with_model(model).answer_identity()


class AutoPlanConfig(_Model):
    """`plan.count: auto`: a grid, then adaptive rounds until the answers stop paying (densify.fields.adaptive)."""
    floor: int = Field(768, ge=16, description="queries of the first grid (always asked)")
    cap: int = Field(4096, ge=16, description="at most this many queries per image")
    round: int = Field(384, ge=1, description="queries per refinement round")
    ratio: float = Field(1.0, gt=0, description="go on while the answers' own spread is at least this times the "
                                                "disagreement with the map it does not explain")
    tolerance: float = Field(0.09, ge=0, description="stop once the answers' own spread (log depth) is below this "
                             "(precise answers: what error remains is shared, more answers do not average it)")
    pool: int = Field(2, ge=1, description="refinement rounds pooled for the disagreement")
    min_rounds: int = Field(2, ge=0, description="refinement rounds always asked after the grid")
    grid: int = Field(3072, ge=1, description="plan.mode grid with count auto: the grid's queries (a grid has no "
                                              "rounds to stop)")

    @model_validator(mode="after")
    def _order(self):
        if self.floor > self.cap:
            raise ValueError(f"floor ({self.floor}) must not exceed cap ({self.cap})")
        return self

    def rule(self):
        from densify.fields.adaptive import StopRule

        return StopRule(self.floor, self.cap, self.round, self.ratio, self.tolerance, self.pool, self.min_rounds)


class PlanConfig(_Model):
    stride: float | None = Field(None, gt=0, description="one query every `stride` original pixels (grid)")
    count: int | list[int] | Literal["auto"] | None = Field(
        "auto", description="queries per image (aspect kept), or [nx, ny]; auto (adaptive): as many as pay, "
                            "see plan.auto")
    mode: Literal["grid", "adaptive"] = Field(
        "adaptive", description="grid: one uniform grid; adaptive: a coarse grid, then rounds of queries where the "
                                "field is uncertain (densify.fields.adaptive), one engine call per round")
    budget: int | None = Field(None, ge=1, description="adaptive: queries per image (default: the grid's size; "
                                                       "with count auto: a fixed budget instead of the stopping rule)")
    rounds: int = Field(4, ge=0, description="adaptive: refinement rounds after the coarse grid")
    coarse: float = Field(0.5, gt=0, le=1, description="adaptive: share of the budget spent on the coarse grid")
    auto: AutoPlanConfig = Field(default_factory=AutoPlanConfig, description="count auto: floor, cap, round size "
                                 "and the stopping rule (budget, rounds and coarse are then not used)")

    @field_validator("count")
    @classmethod
    def _count(cls, v):
        if v is None or v == "auto":
            return v
        vals = v if isinstance(v, list) else [v]
        if (isinstance(v, list) and len(v) != 2) or any(int(x) < 1 for x in vals):
            raise ValueError(f"must be a positive number of queries or [nx, ny] with both >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _one(self):
        if self.stride is not None:
            self.count = None
        if self.stride is None and self.count is None:
            raise ValueError("set plan.stride or plan.count")
        return self

    @property
    def is_auto(self) -> bool:
        """count auto without a fixed budget (plan.budget: N keeps the fixed-budget adaptive plan)."""
        return self.count == "auto" and self.budget is None and self.mode == "adaptive"

    def grid_kwargs(self) -> dict:
        if self.stride is not None:
            return {"stride": self.stride}
        if self.count == "auto":
            return {"count": self.budget or (self.auto.grid if self.mode == "grid" else self.auto.floor)}
        return {"count": tuple(self.count) if isinstance(self.count, list) else self.count}


class DensifyConfig(_Model):
    method: str = Field("edge", description="edge (edge-aware, image-guided) or linear (see densify.fields)")
    outliers: bool = Field(True, description="drop answers that disagree with their neighbours")
    options: dict = Field(default_factory=dict, description="the densifier's options (densify.fields.options: "
                          "linear: inverse; edge: radius, tau, k_fit, ...), checked against its typed model")

    @field_validator("method")
    @classmethod
    def _method(cls, v):
        from densify.fields import DEPTH_METHODS

        if v not in DEPTH_METHODS:
            raise ValueError(f"unknown densifier {v!r}; available: {', '.join(DEPTH_METHODS)}")
        return v

    @model_validator(mode="after")
    def _options(self):
        from densify.fields import validate_options

        self.options = validate_options(self.method, self.options)  # as given, typed (the fingerprint keeps them)
        return self


class OutputConfig(_Model):
    npy: bool = Field(True, description="depth.npy, float32 metres")
    png16: bool = Field(True, description="depth.png, uint16 millimetres (0 = none)")
    preview: bool = Field(True, description="preview.png: the image beside its coloured depth, with a metre scale")
    ply: bool = Field(True, description="cloud.ply, coloured point cloud in the camera frame")
    ply_stride: int = Field(2, ge=1, description="keep every n-th pixel in the point cloud")
    answers: bool = Field(True, description="answers.jsonl: every query's pixel, prompt, text, value, failure")
    confidence: bool = Field(True, description="confidence.npy")


def _check_profile(name: str, task: str, key: str) -> str:
    from densify.config.profiles import load_profile

    try:
        prof = load_profile(name)
    except (KeyError, ConfigError) as exc:
        raise ValueError(str(exc.args[0] if exc.args else exc)) from None
    if prof.task != task:
        raise ValueError(f"{prof.name!r} is a {prof.task} profile; {key} needs a {task} profile")
    return name


class DepthConfig(_Model):
    """`densify depth`: per image, point-query depth answers densified to a metric depth map."""
    profile: str = Field("vlm3-depth", description="depth profile (configs/profiles) or a profile YAML path")
    model: str | None = Field(None, description="checkpoint folder or hub name (default: the profile's model)")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    densify: DensifyConfig = Field(default_factory=DensifyConfig)
    outputs: OutputConfig = Field(default_factory=OutputConfig)
    default_hfov_deg: float = Field(60.0, gt=0, lt=180, description="field of view assumed when no intrinsics are given")
    max_side: int | None = Field(2048, ge=64, description="images longer than this are decoded reduced (JPEG: "
                                 "while decoding); maps, cameras and answers are then at the decoded size, which "
                                 "camera.json records. null: always full size (within the 64 Mpx limit)")
    logprobs: bool = Field(False, description="ask engines for answer log-probabilities")
    structured: bool = Field(False, description="constrain answers with the profile's regex (vllm, openai)")
    forcing: ForcingConfig = Field(default_factory=ForcingConfig, description="force the fixed answer text, "
                                   "generate only the number (with an audit)")
    images_in_flight: int = Field(2, ge=1, description="images in flight at once (at least the engine's capacity; "
                                  "with an adaptive plan each asks its rounds on its own)")
    cpu_threads: int = Field(2, ge=0, description="threads that plan rounds and densify and write finished images "
                             "while the engine works (0: in the engine's loop, which then waits for them)")
    overwrite: bool = Field(False, description="redo images whose outputs exist")

    @field_validator("profile")
    @classmethod
    def _profile(cls, v):
        return _check_profile(v, "depth", "the depth stage")


class StoreConfig(_Model):
    enabled: bool = Field(True, description="commit every answer to the answer store (resume without re-asking)")
    dir: str | None = Field(None, description="store folder (default <out>/store); one answers-<shard>.sqlite per shard")
    synchronous: str = Field("NORMAL", pattern="^(OFF|NORMAL|FULL|EXTRA)$",
                             description="SQLite synchronous: NORMAL survives a killed job, FULL also a power cut")
    exclusive: bool = Field(True, description="lock the store file for the job's lifetime (WAL without shared "
                                              "memory: safe on network file systems, one job per shard)")
    rebuild: bool = Field(False, description="a damaged store file is moved aside (<name>.damaged-<time>) and a "
                                             "fresh one started (--rebuild-store); otherwise the job stops")


class RayConfig(RayOptions):
    """The label job's `ray:` section: the Ray pool's own options (densify.engines.options.RayOptions), run
    around the engine of the `engine:` section (`RayOptions.around`); `cpu_workers` also sets how many Ray CPU
    tasks prepare, plan and densify images."""
    # the pool's engine is the engine: section's: never set here, never written here
    engine: str = Field(default_factory=pool_default_engine, exclude=True)
    engine_options: SerializeAsAny[EngineOptions] | None = Field(None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _no_engine(cls, data):
        for key in ("engine", "engine_options"):
            if isinstance(data, dict) and key in data:
                raise ValueError(f"ray.{key}: the pool runs the engine of the engine: section; set engine.name and "
                                 f"engine.options there")
        return data


def _label_outputs() -> OutputConfig:
    return OutputConfig(preview=False, ply=False, answers=False)


def _label_forcing() -> ForcingConfig:
    return ForcingConfig(mode="declared")


def _label_plan() -> PlanConfig:
    return PlanConfig(mode="grid", count=3072)


def _label_densify() -> DensifyConfig:
    return DensifyConfig(method="linear")


class LabelConfig(DepthConfig):
    """`densify label`: the depth stage's settings plus the batch-job machinery (store, Ray, manifests).
    A plain grid and the linear densifier by default (cheap per image at dataset scale)."""
    plan: PlanConfig = Field(default_factory=_label_plan, description="labels: one uniform grid per image")
    densify: DensifyConfig = Field(default_factory=_label_densify, description="labels: piecewise-linear")
    outputs: OutputConfig = Field(default_factory=_label_outputs,
                                  description="per-image files (labels: depth, 16-bit PNG, confidence)")
    forcing: ForcingConfig = Field(default_factory=_label_forcing, description="forced answers: declared formats "
                                   "only (a learned one depends on which answers came first; a resumed job would "
                                   "ask again what it forced)")
    store: StoreConfig = Field(default_factory=StoreConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    manifest_every_s: float = Field(60.0, gt=0, description="rewrite the output manifest this often (seconds)")
    log_every_s: float = Field(30.0, gt=0, description="progress log line interval when not on a terminal")


class CorrConfig(_Model):
    """Correspondence questions (one per queried pixel of image 1)."""
    profile: str = Field("vlm3-corr", description="correspondence profile (configs/profiles) or YAML path")
    grid: list[int] = Field([24, 18], description="queries per pair as [nx, ny] over image 1 (432 by default: "
                            "each is a two-image prompt on a real model)")
    fb_check: bool = Field(True, description="ask the reverse question at every answer and drop matches whose "
                           "round trip misses (doubles the queries)")
    fb_thresh_px: float = Field(10.0, gt=0, description="forward-backward round-trip limit, original pixels of "
                                "image 1 (about 1.5% of a 640-pixel-wide image)")
    track_queries: bool = Field(True, description="ask pair (i, j) at the points where earlier pairs' answers "
                                "landed in image i (one per grid cell), chaining matches into multi-view tracks")
    save_flow: bool = Field(False, description="write the dense flow image 1 -> 2 (flow.npy, HxWx2) per pair")
    flow_method: Literal["linear", "edge"] = Field("edge", description="flow densifier: edge (image-guided, "
                                                   "locally affine) or linear")

    @field_validator("grid")
    @classmethod
    def _grid(cls, v):
        if len(v) != 2 or min(v) < 2:
            raise ValueError("grid must be [nx, ny] with both >= 2")
        return v

    @field_validator("profile")
    @classmethod
    def _profile(cls, v):
        return _check_profile(v, "corr", "corr.profile")


class PoseStageConfig(_Model):
    """Relative poses: from matches (essential matrix + PnP on depth) and/or asked of a pose profile."""
    source: Literal["matches", "vlm", "both"] = Field("matches", description="matches: RANSAC on the "
                                                      "correspondences; vlm: the pose profile's answers alone; "
                                                      "both: RANSAC, with the VLM's answer as a cross-check")
    profile: str = Field("vlm3-pose", description="pose profile for source vlm/both")
    questions: list[str] | None = Field(None, description="pose questions to ask (default: all of the profile's)")
    use_depth: bool = Field(True, description="metric scale from image 1's depth map (PnP)")
    estimator: PoseConfig = Field(default_factory=PoseConfig)

    @field_validator("profile")
    @classmethod
    def _profile(cls, v):
        return _check_profile(v, "pose", "pose.profile")


class ModelsConfig(_Model):
    """Checkpoints per stage (default: each profile's own model)."""
    depth: str | None = None
    corr: str | None = None
    pose: str | None = None


def _scene_outputs() -> OutputConfig:
    return OutputConfig(ply=False)


def _scene_plan() -> PlanConfig:
    return PlanConfig(count=3072)


class SceneDepthConfig(DepthConfig):
    """The depth stage inside `reconstruct` / `pose`: full-size decoding, so poses, fusion and exports
    describe the image files as they are, and no per-image clouds (the fused cloud replaces them)."""
    max_side: int | None = Field(None, ge=64, description="images longer than this are decoded reduced "
                                 "(null: full size, within the 64 Mpx limit)")
    plan: PlanConfig = Field(default_factory=_scene_plan, description="a fixed budget of 3072 (poses and fusion "
                             "were measured so: benchmarks/results/reconstruct_sets_20261203.json)")
    outputs: OutputConfig = Field(default_factory=_scene_outputs, description="per-image files (no cloud.ply)")


class ReconstructConfig(_Model):
    """`densify reconstruct` / `densify pose`: depth per image, pairwise poses, pose graph, fusion, exports."""
    engine: EngineConfig = Field(default_factory=EngineConfig, description="engine for every stage (one "
                                 "stage's model at a time is loaded)")
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    depth: SceneDepthConfig = Field(default_factory=SceneDepthConfig, description="the depth stage (its own "
                                    "engine and model are replaced by `engine` and `models.depth`)")
    corr: CorrConfig = Field(default_factory=CorrConfig)
    pose: PoseStageConfig = Field(default_factory=PoseStageConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig, description="which image pairs to relate "
                               "(densify.pairs.select); a string sets the mode")
    posegraph: PoseGraphConfig = Field(default_factory=PoseGraphConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    overwrite: bool = Field(False, description="redo images and pairs whose outputs exist")

    def depth_config(self) -> DepthConfig:
        return self.depth.model_copy(update={"engine": self.engine, "model": self.models.depth,
                                             "overwrite": self.overwrite})


def load_config(model: type[M], path: str | Path | None = None, overrides: list[Override] | tuple = (),
                default_name: str | None = None) -> M:
    """Defaults (configs/pipelines/<default_name>.yaml), then the YAML at `path`, then the overrides."""
    data: dict = {}
    source = "defaults"
    if default_name is not None:
        cand = config_dir() / "pipelines" / f"{default_name}.yaml"
        if cand.is_file():
            data, source = read_yaml(cand), str(cand)
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"--config {path}: no such file")
        from densify.config.loading import deep_merge

        data, source = deep_merge(data, read_yaml(path)), str(path)
    return validate(model, apply_overrides(data, overrides), source, tuple(overrides))
