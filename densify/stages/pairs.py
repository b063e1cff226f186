"""The pairs stage: correspondences and relative poses for image pairs (and poses asked of a pose profile).

Per pair (i, j): correspondence questions over image 1 (a grid, or where earlier pairs' answers landed, so
matches chain into multi-view tracks), the forward-backward check, RANSAC and PnP on image 1's depth
(`densify.pairs.solve.solve_pair`); files under pairs/<id1>__<id2>/ (resumable). `vlm_pose_stage` asks the pose
profile's questions instead or as a cross-check. A pair that fails gets a record and the stage goes on.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from densify.config.loading import ConfigError
from densify.config.profiles import load_profile
from densify.engines import EngineError
from densify.geometry.pose import PairPose
from densify.io import outputs
from densify.io.cameras import Camera, CameraError
from densify.io.images import ImageError, load_rgb
from densify.io.layout import PairFiles, RunLayout
from densify.io.progress import Progress
from densify.pairs.matching import Matches, PairRequest, corr_view, dense_flow, match_pairs, track_points
from densify.pairs.solve import PairResult, classify, failed_pair, solve_pair
from densify.pairs.vlm_pose import ask_pose, compare_poses, pose_view
from densify.stages.settings import ReconstructConfig

log = logging.getLogger("densify.pairs.solve")

__all__ = ["ImageInfo", "pair_stage", "vlm_pose_stage", "load_depth"]

@dataclass
class ImageInfo:
    """What the pair and scene stages need of an image (no pixels: they are loaded when used)."""

    index: int
    id: str
    path: Path
    status: str  # "ok" | "skipped" (done earlier) | "failed"
    camera: Camera | None = None
    error: str | None = None
    error_kind: str | None = None
    manifest: str | None = None
    max_side: int | None = None
    """The depth stage's decoding limit: the image is always loaded at the size its camera describes."""

    @property
    def ok(self) -> bool:
        return self.status != "failed" and self.camera is not None

    def rgb(self):
        return load_rgb(self.path, max_side=self.max_side)


# -- 2. pairs

class _Views:
    """The last few prepared images (a pair sequence revisits each image for a few pairs only)."""

    def __init__(self, make, size: int = 3):
        self.make, self.size, self.items = make, size, OrderedDict()

    def get(self, info: ImageInfo):
        if info.index not in self.items:
            self.items[info.index] = self.make(info)
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        self.items.move_to_end(info.index)
        return self.items[info.index]


def load_depth(layout: RunLayout, info: ImageInfo) -> np.ndarray | None:
    """Image's depth map as the depth stage wrote it (reloaded per pair: memory stays flat)."""
    p = layout.depth.image(info.id).depth_npy
    return np.load(p) if p.is_file() else None


def _write_pair(f: PairFiles, res: PairResult, m: Matches | None, cfg: ReconstructConfig, rgb1=None) -> None:
    outputs.sweep_temp_files(f.dir)  # what an interrupted write of this pair left
    if m is not None:
        inl = np.zeros(len(m), bool)
        if res.pose is not None and res.pose.inlier_mask is not None:
            inl[np.flatnonzero(m.valid)[res.pose.inlier_mask]] = True
        m.save(f.matches, inliers=inl)
        outputs.write_jsonl(f.answers, m.records())
        if cfg.corr.save_flow and m.n_valid:
            method = cfg.corr.flow_method if rgb1 is not None else "linear"
            outputs.write_npy(f.flow, dense_flow(m, method=method, rgb1=rgb1).values)
    outputs.write_json(f.pose, {"record": res.record(),
                                "pose": res.pose.to_dict() if res.pose is not None else None,
                                "information": res.information})


def _load_pair(f: PairFiles, a: ImageInfo, b: ImageInfo) -> tuple[PairResult, Matches | None]:
    data = json.loads(f.pose.read_text())
    rec = data["record"]
    pose = PairPose.from_dict(data["pose"]) if data.get("pose") else None
    info = np.asarray(data["information"], float) if data.get("information") is not None else None
    res = PairResult(a.index, b.index, a.id, b.id, rec["status"], pose, rec.get("matches", {}), rec.get("error"),
                     rec.get("error_kind"), info, rec.get("vlm"), rec.get("cross_check"))
    m = Matches.load(f.matches) if f.matches.is_file() else None
    return res, m


def _unusable(i, j, a: ImageInfo, b: ImageInfo) -> PairResult:
    bad = a if not a.ok else b
    return failed_pair(i, j, a.id, b.id, f"image {bad.id} unusable ({bad.error_kind}): {bad.error}", "image")


def pair_stage(infos: list[ImageInfo], pairs: list[tuple[int, int]], cfg: ReconstructConfig, layout: RunLayout,
               engines, *, progress: bool = True, require_metric: bool = True) -> list[PairResult]:
    """Correspondences and RANSAC/PnP poses for every pair, one pair at a time (resumable).

    engines: a `densify.stages.engine.StageEngines`. require_metric: a pose without metric scale counts as
    failed (it cannot join a pose graph)."""
    profile = load_profile(cfg.corr.profile)
    if profile.task != "corr":
        raise ConfigError(f"corr.profile: {profile.name!r} is a {profile.task} profile, not a correspondence profile")
    results: list[PairResult] = []
    carried: dict[int, list[np.ndarray]] = {}
    grid = tuple(cfg.corr.grid)
    engine, owned = None, False
    views = _Views(lambda info: corr_view(info.id, info.rgb(), info.camera, profile, path=info.path,
                                          manifest=info.manifest))
    bar = Progress(len(pairs), enabled=progress, label="pairs")
    try:
        for i, j in pairs:
            a, b = infos[i], infos[j]
            for k in [k for k in carried if k < i]:
                del carried[k]  # no later pair starts there
            if not (a.ok and b.ok):
                results.append(_unusable(i, j, a, b))
                bar.update(failed=1)
                continue
            f = layout.pair(a.id, b.id)
            if not cfg.overwrite and f.pose.is_file() and f.matches.is_file():
                res, m = _load_pair(f, a, b)
                if m is not None:
                    carried.setdefault(j, []).append(m.pairs()[1])
                results.append(res)
                bar.update()
                continue
            if engine is None:
                engine, owned = engines.open("corr", profile)
            t0 = time.perf_counter()
            try:
                v1, v2 = views.get(a), views.get(b)
                pts = None
                if cfg.corr.track_queries:
                    c = carried.get(i)
                    pts = track_points(a.camera.width, a.camera.height, grid, np.concatenate(c) if c else None)
                req = PairRequest(v1, v2, pts, key=(i, j))
                _, m = next(match_pairs(engine, profile, [req], grid=grid, fb_check=cfg.corr.fb_check,
                                        fb_thresh_px=cfg.corr.fb_thresh_px))
            except (ImageError, CameraError, OSError, ValueError) as exc:
                log.error("pair %s/%s: %s", a.id, b.id, exc)
                results.append(failed_pair(i, j, a.id, b.id, str(exc), "image"))
                bar.update(failed=1)
                continue
            except EngineError as exc:
                log.error("pair %s/%s: engine failed: %s", a.id, b.id, exc)
                results.append(failed_pair(i, j, a.id, b.id, f"engine: {exc}", "engine"))
                bar.update(failed=1)
                continue
            depth1 = load_depth(layout, a) if cfg.pose.use_depth else None
            pose, info = solve_pair(m, a.camera, b.camera, depth1, cfg.pose.estimator)
            del depth1
            counts = {"asked": len(m), "asked_backward": m.backward_queries, "valid": m.n_valid,
                      "failures": m.failure_counts(),
                      "fb_median_px": float(np.nanmedian(m.fb_error)) if m.fb_error is not None
                      and np.isfinite(m.fb_error).any() else None, "wall_s": time.perf_counter() - t0}
            res = classify(PairResult(i, j, a.id, b.id, "ok", pose, counts, information=info),
                           require_metric=require_metric)
            if res.status == "failed":
                log.warning("pair %s/%s failed: %s", a.id, b.id, res.error)
            _write_pair(f, res, m, cfg, rgb1=a.rgb() if cfg.corr.save_flow else None)
            carried.setdefault(j, []).append(m.pairs()[1])
            results.append(res)
            bar.update(queries=len(m) + m.backward_queries, failed=int(res.status == "failed"))
    finally:
        bar.close()
        if owned and engine is not None:
            engine.close()
    return results


# -- 3. poses asked of the pose profile

def vlm_pose_stage(infos: list[ImageInfo], pairs: list[tuple[int, int]], results: list[PairResult] | None,
                   cfg: ReconstructConfig, layout: RunLayout, engines, *,
                   require_metric: bool = True, progress: bool = False) -> list[PairResult]:
    """Ask the pose profile about every pair; source 'vlm' replaces the poses, 'both' cross-checks them."""
    profile = load_profile(cfg.pose.profile)
    if profile.task != "pose":
        raise ConfigError(f"pose.profile: {profile.name!r} is a {profile.task} profile, not a pose profile")
    by_pair = {(r.i, r.j): r for r in results or []}
    engine, owned = engines.open("pose", profile)
    views = _Views(lambda info: pose_view(info.rgb(), info.camera, profile))
    out_results = []
    bar = Progress(len(pairs), enabled=progress, label="pose questions")
    try:
        for i, j in pairs:
            a, b = infos[i], infos[j]
            res = by_pair.get((i, j))
            if not (a.ok and b.ok):
                out_results.append(res or _unusable(i, j, a, b))
                bar.update(failed=1)
                continue
            try:
                vp = ask_pose(engine, profile, views.get(a), views.get(b), id1=a.id, id2=b.id,
                              questions=cfg.pose.questions, path1=a.path, path2=b.path)
            except (ImageError, CameraError, OSError, EngineError) as exc:
                log.error("pair %s/%s: pose questions failed: %s", a.id, b.id, exc)
                out_results.append(res or failed_pair(i, j, a.id, b.id, f"pose questions: {exc}", "engine"))
                bar.update(failed=1)
                continue
            vpose = vp.pair_pose()
            if cfg.pose.source == "vlm":
                res = res or PairResult(i, j, a.id, b.id)
                res.status, res.error, res.error_kind = "ok", None, None
                res.pose, res.information = vpose, None
                res.vlm = vp.to_dict()
                classify(res, require_metric=require_metric)
            else:
                res = res or failed_pair(i, j, a.id, b.id, "no correspondence pose", "pose")
                res.vlm = vp.to_dict()
                if res.pose is not None and res.pose.R is not None:
                    res.cross_check = compare_poses(res.pose, vpose)
                    log.info("pair %s/%s: RANSAC vs VLM pose: rotation %.1f deg, direction %s deg", a.id, b.id,
                             res.cross_check["rotation_deg"], _fmt(res.cross_check["direction_deg"]))
            f = layout.pair(a.id, b.id)
            outputs.write_json(f.vlm_pose, {"answers": vp.to_dict(), "pose": vpose.to_dict(),
                                            "cross_check": res.cross_check})
            if cfg.pose.source == "vlm":
                _write_pair(f, res, None, cfg)
            out_results.append(res)
            bar.update(failed=int(res.status == "failed"))
    finally:
        bar.close()
        if owned:
            engine.close()
    return out_results


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


