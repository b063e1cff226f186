"""Configs of `densify pose` and `densify reconstruct` (pydantic; every field documented).

Loaded from configs/pipelines/reconstruct.yaml plus `--set key=value` overrides; errors name the key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from densify.geometry.export import ExportConfig
from densify.geometry.fusion import FusionConfig
from densify.geometry.pose import PoseConfig
from densify.geometry.posegraph import PoseGraphConfig
from pipelines.configs import DepthJobConfig, EngineConfig, load_job_config

__all__ = ["CorrConfig", "PoseStageConfig", "ReconstructJobConfig", "ModelsConfig", "load_reconstruct_config"]


class CorrConfig(BaseModel):
    """Correspondence questions (one per queried pixel of image 1)."""
    model_config = ConfigDict(extra="forbid")
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


class PoseStageConfig(BaseModel):
    """Relative poses: from matches (essential matrix + PnP on depth) and/or asked of a pose profile."""
    model_config = ConfigDict(extra="forbid")
    source: Literal["matches", "vlm", "both"] = Field("matches", description="matches: RANSAC on the "
                                                      "correspondences; vlm: the pose profile's answers alone; "
                                                      "both: RANSAC, with the VLM's answer as a cross-check")
    profile: str = Field("vlm3-pose", description="pose profile for source vlm/both")
    questions: list[str] | None = Field(None, description="pose questions to ask (default: all of the profile's)")
    use_depth: bool = Field(True, description="metric scale from image 1's depth map (PnP)")
    estimator: PoseConfig = Field(default_factory=PoseConfig)


class ModelsConfig(BaseModel):
    """Checkpoints per stage (default: each profile's own model)."""
    model_config = ConfigDict(extra="forbid")
    depth: str | None = None
    corr: str | None = None
    pose: str | None = None


class ReconstructJobConfig(BaseModel):
    """`densify reconstruct` / `densify pose`: depth per image, pairwise poses, pose graph, fusion, exports."""
    model_config = ConfigDict(extra="forbid")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="engine for every stage (one "
                                 "stage's model at a time is loaded)")
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    depth: DepthJobConfig = Field(default_factory=DepthJobConfig, description="the depth stage (its own "
                                  "engine setting is replaced by `engine`)")
    corr: CorrConfig = Field(default_factory=CorrConfig)
    pose: PoseStageConfig = Field(default_factory=PoseStageConfig)
    pairs: Literal["consecutive", "consecutive+skip2"] = Field("consecutive", description="which image pairs: "
                                                               "(i, i+1), plus (i, i+2) with +skip2")
    posegraph: PoseGraphConfig = Field(default_factory=PoseGraphConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    overwrite: bool = Field(False, description="redo images and pairs whose outputs exist")

    def stage_engine(self, stage: str) -> EngineConfig:
        """The engine config of one stage, with that stage's model when one is set."""
        model = getattr(self.models, stage)
        opts = dict(self.engine.options)
        if model:
            opts["model"] = model
        return EngineConfig(name=self.engine.name, options=opts)

    def depth_job(self) -> DepthJobConfig:
        return self.depth.model_copy(update={"engine": self.stage_engine("depth"), "overwrite": self.overwrite})


def load_reconstruct_config(path=None, overrides: dict | None = None) -> ReconstructJobConfig:
    return load_job_config(ReconstructJobConfig, path, overrides, default_name="reconstruct")
