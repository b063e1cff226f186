"""The Python facade: `Densifier`, one object per model set, one verb per output.

    from densify import Densifier

    with Densifier(profile="vlm3-depth", engine="vllm", model="/ckpt/VLM3-depth", corr_model="/ckpt/VLM3-corr",
                   gpu_memory_utilization=0.8) as d:
        maps = d.depth(["a.png", "b.png"])          # list[DepthMap]: arrays, camera, answers, failures
        pose = d.pose("a.png", "b.png")             # RelativePose: R, t, metric t, inliers, verdict
        scene = d.reconstruct(frames, out="scene")  # SceneResult: cam_to_world per image, dropped, files

Every option is keyword-only; options that are not the facade's own go to the engine (`engine.options`,
validated like a config). Engines start on first use, one per stage, and stay up until `close()`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from pydantic import ValidationError

from densify.config.loading import ConfigError, format_validation_error
from densify.config.profiles import load_profile
from densify.engines import Engine
from densify.io.cameras import Camera
from densify.io.images import ImageSource, discover
from densify.pairs.solve import PairResult
from densify.queries.answers import PointAnswers
from densify.stages.depth import DepthStage
from densify.stages.engine import build_engine
from densify.stages.scene import SceneResult, reconstruct, relative_pose
from densify.stages.settings import DepthConfig, ReconstructConfig

__all__ = ["Densifier", "DepthMap", "RelativePose", "SceneResult"]


@dataclass
class DepthMap:
    """One image's dense depth, or why there is none (`ok` False, `error` says why)."""

    id: str
    image: str
    ok: bool
    depth: np.ndarray | None = None
    """HxW float32 metres at the image's full resolution."""
    confidence: np.ndarray | None = None
    camera: Camera | None = None
    answers: PointAnswers | None = None
    """Every query: pixel, prompt coordinates, raw text, value, failure kind."""
    failures: dict = field(default_factory=dict)
    """Answer failures by kind."""
    error: str | None = None
    error_kind: str | None = None


@dataclass
class RelativePose:
    """Camera 2 relative to camera 1: x_2 = R @ x_1 + t (OpenCV axes)."""

    ok: bool
    R: np.ndarray | None
    t: np.ndarray | None
    """Unit translation direction."""
    t_metric: np.ndarray | None
    """Metres (from image 1's depth), when known."""
    inliers: int
    matches: int
    verdict: str | None
    error: str | None
    result: PairResult


def _config(model, data: dict, source: str):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, model)) from None


class _Engines(dict):
    """Stage -> engine, built on first use by the facade (StageEngines takes them as given)."""

    def __init__(self, owner: "Densifier"):
        super().__init__()
        self.owner = owner

    def __contains__(self, stage) -> bool:
        return stage in ("depth", "corr", "pose")

    def __missing__(self, stage: str) -> Engine:
        o = self.owner
        profile = {"depth": o.profile, "corr": o._rcfg.corr.profile, "pose": o._rcfg.pose.profile}[stage]
        eng = build_engine(o._rcfg.engine, load_profile(profile), model=getattr(o._rcfg.models, stage))
        self[stage] = eng
        return eng


class Densifier:
    """Dense depth, poses and scenes from point-query models (see the module docstring).

    profile: the depth profile (vlm3-depth, depthlm or a YAML path). engine: auto (vllm when installed, else
    hf), vllm, hf, openai, ray, or simulated (tests and demos: answers from the ground-truth files beside each
    image, as `densify synth` writes them). model / corr_model / pose_model: checkpoints (default: each profile's). plan, densify: the
    depth stage's query plan and densifier (dicts of `densify.stages.settings.PlanConfig` / `DensifyConfig`
    fields). reconstruct: other `ReconstructConfig` fields (pairs, fusion, export, ...). Any other keyword is
    an engine option. Every other setting is the commands' default: `depth` runs as `densify depth` does
    (configs/pipelines/depth.yaml), `pose` and `reconstruct` as `densify reconstruct` (reconstruct.yaml:
    images at full size, no per-image clouds).
    """

    def __init__(self, *, profile: str = "vlm3-depth", engine: str = "auto", model: str | None = None,
                 corr_profile: str = "vlm3-corr", pose_profile: str = "vlm3-pose", corr_model: str | None = None,
                 pose_model: str | None = None, plan: dict | None = None, densify: dict | None = None,
                 default_hfov_deg: float = 60.0, reconstruct: dict | None = None, **engine_options: Any):
        self.profile = profile
        depth = {"profile": profile, "model": model, "default_hfov_deg": default_hfov_deg,
                 **{k: v for k, v in (("plan", plan), ("densify", densify)) if v is not None}}  # else each job's own
        eng = {"name": engine, "options": engine_options}
        data = {"engine": eng, "models": {"depth": model, "corr": corr_model, "pose": pose_model}, "depth": depth,
                "corr": {"profile": corr_profile}, "pose": {"profile": pose_profile}, **(reconstruct or {})}
        self._rcfg: ReconstructConfig = _config(ReconstructConfig, data, "Densifier")
        self._dcfg: DepthConfig = _config(DepthConfig, {**depth, "engine": eng}, "Densifier")
        self._engines = _Engines(self)

    @property
    def depth_config(self) -> DepthConfig:
        """The settings of `depth` (those of `densify depth` but for the facade's own options)."""
        return self._dcfg

    def depth(self, images: str | Path | Sequence[str | Path] | Iterable[ImageSource], *, intrinsics=None,
              points=None, out: str | Path | None = None) -> list[DepthMap]:
        """Dense depth for each image (files, folders, globs or manifests); written under `out` when given."""
        from densify.io.layout import RunLayout

        sources = _sources(images, exclude=[out] if out is not None else ())
        stage = DepthStage(self.depth_config, self._engines["depth"], keep_maps=True,
                           layout=RunLayout(out) if out is not None else None)
        by_id = {r.id: r for r in stage.run(sources, intrinsics=intrinsics, points=points)}
        return [_depth_map(by_id[s.id]) for s in sources]

    def pose(self, image1: str | Path, image2: str | Path, *, intrinsics=None, out: str | Path | None = None,
             source: str | None = None) -> RelativePose:
        """Relative pose of two images from correspondence answers (and/or the pose profile: `source`)."""
        cfg = self._rcfg
        if source is not None:
            cfg = cfg.model_copy(update={"pose": cfg.pose.model_copy(update={"source": source})})
        sources = discover([str(image1), str(image2)])
        if len(sources) != 2:
            raise ConfigError(f"pose needs exactly two images, got {len(sources)}")
        with tempfile.TemporaryDirectory(prefix="densify-pose-") as tmp:
            res, _ = relative_pose(sources, cfg, out if out is not None else tmp, engines=self._engines,
                                   intrinsics=intrinsics)
        p = res.pose
        return RelativePose(res.status != "failed", None if p is None else p.R, None if p is None else p.t,
                            None if p is None else p.t_metric, 0 if p is None else p.inliers,
                            0 if p is None else p.n_matches, None if p is None else p.verdict, res.error, res)

    def reconstruct(self, images: str | Path | Sequence[str | Path], *, out: str | Path, intrinsics=None,
                    pairs: str | dict | None = None) -> SceneResult:
        """Depth, pairwise poses, pose graph, fused mesh and exports of an image sequence, written to `out`."""
        if pairs is not None:  # a mode name or PairsConfig fields (densify.pairs.select)
            from densify.pairs.select import PairsConfig

            sel = _config(PairsConfig, pairs, "Densifier.reconstruct(pairs=...)")
            cfg = self._rcfg.model_copy(update={"pairs": sel})
        else:
            cfg = self._rcfg
        return reconstruct(_sources(images, exclude=[out]), cfg, out, engines=self._engines, intrinsics=intrinsics)

    def close(self) -> None:
        for eng in list(self._engines.values()):
            eng.close()
        self._engines.clear()

    def __enter__(self) -> "Densifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sources(images, exclude=()) -> list[ImageSource]:
    if isinstance(images, (str, Path)):
        images = [images]
    images = list(images)
    if images and all(isinstance(s, ImageSource) for s in images):
        return images
    return discover([str(i) for i in images], exclude=exclude)


def _depth_map(r) -> DepthMap:
    return DepthMap(r.id, r.image, r.status != "failed", r.depth, r.confidence, r.camera, r.answers, r.failures,
                    r.error, r.error_kind)

