"""The depth stage's per-image transform: an image source -> its first engine batch (prepare), its answers
-> a dense depth map and files (finish, write). No engine and no scheduling: the stream (stages.depth)
and the Ray CPU workers (stages.workers) run these steps wherever they run.

    t = DepthTransform(cfg, layout=RunLayout(out))
    task, batch = t.prepare(src)              # decoded, prepared for the profile, first round planned
    result = t.finish(task, completions)      # answers -> dense field -> files (result.json last)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from densify.config.profiles import Profile, load_profile
from densify.engines import EngineBatch, EngineError, ImageRef
from densify.eval.labels import label_metrics
from densify.fields import DenseField, depth_method
from densify.fields.adaptive import AdaptivePlanner
from densify.fields.edge_aware import require_contrib
from densify.geometry.clouds import require_open3d
from densify.io import outputs
from densify.io.cameras import Camera, CameraError, PreparedImage, decode, prepare_for
from densify.io.images import ImageError, ImageSource
from densify.io.layout import ImageFiles, RunLayout, fingerprint
from densify.queries import answers as answers_mod
from densify.queries.plan import PlanError, QueryPlan, check_points, grid_points, plan_queries
from densify.queries.prompts import depth_batch, image_ref, image_uid, sampling_for
from densify.stages.settings import DepthConfig

log = logging.getLogger("densify.depth")

__all__ = ["DepthTransform", "DepthTask", "DepthResult", "failure_kind", "settings_fingerprint", "read_camera",
           "wants_forcing"]


@dataclass
class DepthTask:
    """One image on its way through the engine."""

    source: ImageSource
    rgb: np.ndarray
    camera: Camera
    prep: PreparedImage
    plan: QueryPlan
    uid: str
    ref: ImageRef
    fixed: bool = False
    """Exactly the given points are asked (no adaptive rounds)."""
    planner: AdaptivePlanner | None = None
    """An adaptive plan's planner (built once per image, the first round already planned by it)."""
    started: float = 0.0
    scale: float = 1.0
    """Decoded size / the image's own size (below 1 when decoded reduced: DepthConfig.max_side)."""
    plan_report: dict | None = None
    """Adaptive plans: rounds asked and why the planner stopped (AdaptivePlanner.report)."""


@dataclass
class DepthResult:
    """One image's outcome. Maps and answers are kept only when the stage was asked to (keep_maps)."""

    id: str
    image: str
    status: str
    """ok | skipped (done earlier with the same settings) | failed"""
    queries: int = 0
    failures: dict = field(default_factory=dict)
    """Answer failures by kind (unparseable answers and the like; the image itself may still be ok)."""
    error: str | None = None
    error_kind: str | None = None
    uid: str | None = None
    """The prompt image's uid (answer-store statistics are keyed by it)."""
    camera: Camera | None = None
    metrics: dict = field(default_factory=dict)
    wall_s: float = 0.0
    depth: np.ndarray | None = None
    confidence: np.ndarray | None = None
    answers: answers_mod.PointAnswers | None = None
    rgb: np.ndarray | None = None
    scale: float = 1.0
    """Pixels of the maps and answers per pixel of the image file (below 1 when decoded reduced)."""
    densify_s: float = 0.0
    """Time spent densifying the answers (part of wall_s)."""
    plan: dict = field(default_factory=dict)
    """How the plan went: grid, or adaptive rounds asked and why they stopped (result.json, summary)."""
    _certificate: tuple | None = field(default=None, repr=False, compare=False)
    """What result.json will say, when a finishing thread left it to DepthTransform.certify."""

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def record(self) -> dict:
        return {"id": self.id, "image": self.image, "status": self.status, "queries": self.queries,
                "plan": self.plan, "failures": self.failures, "error": self.error, "kind": self.error_kind,
                "metrics": self.metrics}

    def drop_maps(self) -> "DepthResult":
        """The result without its arrays (a long stream keeps only the records)."""
        self.depth = self.confidence = self.answers = self.rgb = None
        return self


def failure_kind(exc: BaseException, src: ImageSource | None = None) -> str:
    """The kind of a per-image failure record."""
    if isinstance(exc, ImageError):
        return exc.kind
    if isinstance(exc, CameraError):
        return "intrinsics"
    if isinstance(exc, PlanError):
        return "points"
    if isinstance(exc, EngineError):
        return "engine"
    if isinstance(exc, OSError):
        return "missing" if src is not None and not Path(src.path).exists() else "image"
    return "error"


def failed(src: ImageSource, exc: BaseException, started: float, queries: int = 0, kind: str | None = None,
           error: str | None = None) -> DepthResult:
    """The failure record of an image that raised `exc` (kind and text from the exception unless given)."""
    return DepthResult(src.id, str(src.path), "failed", queries, error=error if error is not None else str(exc),
                       error_kind=kind or failure_kind(exc, src), wall_s=time.perf_counter() - started)


def wants_forcing(cfg: DepthConfig, profile: Profile) -> bool:
    """Whether the stage forces answers: a declared format, or one it may learn (and forcing not off)."""
    q = profile.question
    if cfg.forcing.mode == "off" or cfg.structured or profile.prefill:
        return False
    return bool(q.answer_format) or cfg.forcing.mode == "learn" or (cfg.forcing.mode == "auto" and q.learn_answer_format)


def settings_fingerprint(cfg: DepthConfig, profile: Profile) -> str:
    """What shapes a depth result: the profile, the model, the engine's answer-changing options, the plan,
    the densifier, the sampling options, the decoding size and the assumed field of view (not memory,
    scheduling or network settings)."""
    # the answer store's identity too (the model is named on its own here)
    return fingerprint({"profile": profile.model_dump(mode="json"), "model": cfg.model or profile.model,
                        "engine": cfg.engine.answer_identity(), "plan": cfg.plan.model_dump(mode="json"),
                        "densify": cfg.densify.model_dump(mode="json"), "logprobs": cfg.logprobs,
                        "structured": cfg.structured, "max_side": cfg.max_side,
                        "forcing": cfg.forcing.model_dump(mode="json") if wants_forcing(cfg, profile) else None,
                        "default_hfov_deg": cfg.default_hfov_deg})


def read_camera(files: ImageFiles) -> Camera | None:
    """The camera an earlier run wrote beside an image's depth (None when it is missing or damaged)."""
    try:
        return Camera(**json.loads(files.camera.read_text())["intrinsics"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class DepthTransform:
    """One image's way through the depth stage, without the engine (see the module docstring).

    layout: where files go (None: nothing is written). evaluate(source, result) -> metrics: an evaluation
    hook (the demo's ground truth); labelled points of DepthLM manifests are scored anyway.
    planner_options: more AdaptivePlanner options for adaptive plans (benchmark variants).
    """

    def __init__(self, cfg: DepthConfig, *, layout: RunLayout | None = None,
                 evaluate: Callable[[ImageSource, DepthResult], dict] | None = None,
                 planner_options: dict | None = None):
        self.cfg = cfg
        self.profile = load_profile(cfg.profile)
        self.layout = layout
        self.evaluate = evaluate
        self.planner_options = dict(planner_options or {})
        self._capped = False  # the plan asks more queries than an image holds (said once)
        self._defer_certify = False  # finishing threads: result.json is written by certify()
        self._disk_full: BaseException | None = None  # a finishing thread found the disk full: no more writes
        self._write_lock = threading.Lock()  # one image writes at a time (a full disk stops at the first)
        self.fingerprint = settings_fingerprint(cfg, self.profile)
        self.sampling = sampling_for(self.profile, logprobs=cfg.logprobs, structured=cfg.structured)
        if cfg.densify.method == "edge" or cfg.plan.mode == "adaptive":
            require_contrib()  # before any engine work, not as a failure of every image
        if cfg.outputs.ply:
            require_open3d()

    def prepare(self, src: ImageSource, *, intrinsics=None, points=None) -> tuple[DepthTask, EngineBatch]:
        """Decode, prepare for the profile and plan the first round: the task and its engine batch."""
        cfg = self.cfg
        t0 = time.perf_counter()
        img = decode(src.path, intrinsics if intrinsics is not None else src.intrinsics, max_side=cfg.max_side,
                     default_hfov_deg=cfg.default_hfov_deg)
        h, w = img.rgb.shape[:2]
        prep = prepare_for(img.rgb, img.camera, self.profile)
        if points is None and src.extra.get("points") is not None:
            points = np.asarray(src.extra["points"], float)
        planner = self.planner(w, h, rgb=img.rgb) if cfg.plan.mode == "adaptive" else None
        if points is not None:
            pts = check_points(np.asarray(points, float) * img.scale, w, h, str(src.path))
        elif planner is not None:
            pts = planner.first_points()
        else:
            pts = grid_points(w, h, **cfg.plan.grid_kwargs())
        plan = plan_queries(pts, prep.pixel_map, marker=self.profile.marker)
        if points is None:
            self._say_if_capped(w, h, len(plan))
        if planner is not None and points is not None:  # one round: exactly the given points
            planner.budget, planner.rounds = len(plan), 0
        uid = image_uid(prep, src.id)
        ref = image_ref(src.id, prep, src.path, src.manifest)
        task = DepthTask(src, img.rgb, img.camera, prep, plan, uid, ref, fixed=points is not None, started=t0,
                         scale=img.scale, planner=planner)
        return task, depth_batch(prep, plan, self.profile, uid=uid, ref=ref, sampling=self.sampling, tag=task)

    def _say_if_capped(self, width: int, height: int, planned: int) -> None:
        """Warn (once per stage) when an image holds fewer distinct query positions than the plan asks for."""
        p = self.cfg.plan
        if self._capped or p.stride is not None:
            return
        if p.count == "auto":  # at most the cap (adaptive) or the grid's size
            wanted = p.budget or (p.auto.cap if p.mode == "adaptive" else p.auto.grid)
        else:
            wanted = int(p.count[0]) * int(p.count[1]) if isinstance(p.count, list) else int(p.count)
        if p.mode == "adaptive":
            wanted, planned = p.budget or wanted, width * height
        if planned < 0.95 * wanted:
            self._capped = True
            log.warning("plan.count %s: a %dx%d image has only %s distinct query positions (pixels, or prompt "
                        "coordinates of the %s profile), so at most %s are asked per image like this one; lower --count",
                        f"{wanted:,}", width, height, f"{planned:,}", self.profile.name, f"{planned:,}")

    def planner(self, width: int, height: int, rgb=None) -> AdaptivePlanner:
        """The adaptive plan's planner for an image of this size."""
        p = self.cfg.plan
        if p.is_auto:
            return AdaptivePlanner((height, width), p.auto.cap, rgb=rgb, stop=p.auto.rule(), **self.planner_options)
        budget = p.budget or len(grid_points(width, height, **p.grid_kwargs()))
        opts = {"coarse": p.coarse, "rounds": p.rounds, **self.planner_options}
        return AdaptivePlanner((height, width), budget, rgb=rgb, **opts)

    def finish(self, task: DepthTask, completions) -> DepthResult:
        """Answers -> dense depth -> files (result.json last) -> the image's result. In the stage's finishing
        threads result.json is left to `certify(res)`, which the stage's own thread calls as it hands the
        result on (so a summary never counts fewer finished images than have a result.json)."""
        cfg, src = self.cfg, task.source
        res = DepthResult(src.id, str(src.path), "ok", len(completions), uid=task.uid, camera=task.camera,
                          scale=task.scale, plan=task.plan_report or {"mode": "points" if task.fixed else "grid"})
        ans = answers_mod.collect_depth(self.profile, task.plan.pixels, task.plan.prompt_xy, completions,
                                        unmarkable=task.plan.unmarkable)
        res.failures = ans.failure_counts()
        files = self.layout.image(src.id) if self.layout is not None else None
        if self._failed(res, task, ans, completions):
            if files is not None and cfg.outputs.answers and completions:
                with self._write_lock:
                    outputs.write_jsonl(files.answers, ans.records())
            return res
        lps = ans.logprobs if np.isfinite(ans.logprobs).any() else None
        t0 = time.perf_counter()
        dense = depth_method(cfg.densify.method)(ans.pixels, ans.values, task.rgb, outliers=cfg.densify.outliers,
                                                 logprobs=lps, **cfg.densify.options)
        res.densify_s = time.perf_counter() - t0
        res.depth, res.confidence, res.answers, res.rgb = dense.values, dense.confidence, ans, task.rgb
        res.metrics = label_metrics(src.labels, res.depth, res.answers, res.scale)
        if self.evaluate is not None:
            res.metrics.update(self.evaluate(src, res))
        if files is not None:
            with self._write_lock:
                if self._disk_full is not None:
                    raise self._disk_full
                self.write(files, task, ans, dense, res, certify=not self._defer_certify)
        return res

    def certify(self, res: DepthResult) -> DepthResult:
        """Write the result.json a finishing thread left (the image is then done)."""
        pending, res._certificate = res._certificate, None
        if pending is not None:
            files, record, written = pending
            outputs.write_json(files.result, files.certify(record, written))
        return res

    def _failed(self, res: DepthResult, task: DepthTask, ans, completions) -> bool:
        """Marks the result failed when the engine failed, no point could be asked or no answer be read."""
        errors = [c.error for c in completions if c.error is not None]
        if errors:
            res.status, res.error_kind = "failed", "engine"
            res.error = f"{len(errors)} of {len(completions)} answers failed: {errors[0]}"
        elif not completions and len(task.plan.unmarkable):
            res.status, res.error_kind = "failed", "unmarkable"
            res.error = (f"all {len(task.plan.unmarkable)} planned points are too close to a border of the "
                         f"{task.prep.pixel_map.pre_size[0]}x{task.prep.pixel_map.pre_size[1]} preprocessed image "
                         f"for the {self.profile.name} marker; ask about points further inside")
        elif not ans.valid.any():
            res.status, res.error_kind = "failed", "answers"
            res.error = (f"none of {len(completions)} answers could be parsed ({res.failures}); check that the "
                         f"profile ({self.profile.name}) matches the model; answers are in answers.jsonl")
        return res.status == "failed"

    def write(self, files: ImageFiles, task: DepthTask, ans, dense: DenseField, res: DepthResult, *,
              certify: bool = True) -> None:
        o = self.cfg.outputs
        depth = dense.values
        outputs.sweep_temp_files(files.dir)  # what an interrupted write of this image left
        written = []
        if o.npy:
            written.append(outputs.write_npy(files.depth_npy, depth.astype(np.float32)))
        if o.confidence:
            written.append(outputs.write_npy(files.confidence, dense.confidence.astype(np.float32)))
        if o.png16:
            written.append(outputs.write_png(files.depth_png, outputs.depth_png16(depth)))
        if o.preview:
            from densify.io.preview import depth_preview

            written.append(outputs.write_png(files.preview, depth_preview(task.rgb, depth)))
        if o.answers:
            written.append(outputs.write_jsonl(files.answers, ans.records()))
        if o.ply:
            from densify.geometry.clouds import depth_to_cloud

            written.append(outputs.write_ply(files.cloud, depth_to_cloud(depth, task.rgb, task.camera,
                                                                          stride=o.ply_stride)))
        written.append(outputs.write_json(files.camera, {"intrinsics": task.camera.to_dict(),
                                                         "preprocessed_size": list(task.prep.pixel_map.pre_size),
                                                         "decoded_scale": task.scale}))
        record = {**res.record(), "fingerprint": self.fingerprint, "profile": self.profile.name}
        if certify:
            outputs.write_json(files.result, files.certify(record, [Path(p) for p in written]))
        else:
            res._certificate = (files, record, [Path(p) for p in written])
