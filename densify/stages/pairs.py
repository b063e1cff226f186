"""The pairs stage: correspondences and relative poses for image pairs (and poses asked of a pose profile).

Per pair (i, j): correspondence questions over image 1 (a grid, or where earlier pairs' answers landed, so
matches chain into multi-view tracks), the forward-backward check, RANSAC and PnP on image 1's depth
(`densify.pairs.solve.solve_pair`); files under pairs/<id1>__<id2>/, result.json last with the settings'
fingerprint (a rerun skips a pair only when it matches). A candidate pair (chosen by retrieval, a pairs
file or every pair: not a sequence neighbour) is probed first: a few of its points are asked, and the rest
only when those verify an overlap. `vlm_pose_stage` asks the pose profile's questions instead or as a
cross-check. A pair that fails gets a record and the stage goes on.
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
from densify.io.layout import PairFiles, RunLayout, fingerprint
from densify.io.progress import Progress
from densify.pairs.matching import (Matches, PairRequest, corr_view, dense_flow, match_pairs, probe_subset,
                                    track_points)
from densify.pairs.select import CANDIDATE, SEQUENTIAL
from densify.pairs.solve import PairResult, classify, failed_pair, probe_verdict, solve_pair
from densify.queries.plan import grid_points
from densify.pairs.vlm_pose import ask_pose, compare_poses, pose_view
from densify.stages.settings import ReconstructConfig

log = logging.getLogger("densify.pairs.solve")

__all__ = ["ImageInfo", "PairStage", "pair_stage", "pair_fingerprint", "vlm_pose_stage", "load_depth"]

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
    timestamp_s: float | None = None
    """A video frame's time in the video (densify.io.video)."""

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


def pair_fingerprint(cfg: ReconstructConfig, profile, depth_fp: str | None, kind: str = SEQUENTIAL) -> str:
    """What shapes a pair's result: the corr profile, model and engine identity, the questions (grid, probe
    of a candidate pair, forward-backward check), the pose estimator and, when poses use depth, the depth
    stage's fingerprint (not memory, scheduling or network settings)."""
    # the answer store's identity too (the model is named on its own here)
    return fingerprint({"profile": profile.model_dump(mode="json"), "model": cfg.models.corr or profile.model,
                        "engine": cfg.engine.answer_identity(),
                        "corr": cfg.corr.model_dump(mode="json"),
                        "probe": [cfg.pairs.probe, cfg.pairs.probe_min_matches] if kind != SEQUENTIAL else None,
                        "use_depth": cfg.pose.use_depth, "estimator": cfg.pose.estimator.model_dump(mode="json"),
                        "depth": depth_fp if cfg.pose.use_depth else None})


def _write_pair(f: PairFiles, res: PairResult, m: Matches | None, cfg: ReconstructConfig, rgb1=None,
                fp: str | None = None) -> None:
    """The pair's files; with a fingerprint, result.json last (it certifies the others)."""
    outputs.sweep_temp_files(f.dir)  # what an interrupted write of this pair left
    f.result.unlink(missing_ok=True)
    written = [f.pose]
    if m is not None:
        inl = np.zeros(len(m), bool)
        if res.pose is not None and res.pose.inlier_mask is not None:
            inl[np.flatnonzero(m.valid)[res.pose.inlier_mask]] = True
        m.save(f.matches, inliers=inl)
        outputs.write_jsonl(f.answers, m.records())
        written += [f.matches, f.answers]
        if cfg.corr.save_flow and m.n_valid:
            method = cfg.corr.flow_method if rgb1 is not None else "linear"
            outputs.write_npy(f.flow, dense_flow(m, method=method, rgb1=rgb1).values)
            written.append(f.flow)
    outputs.write_json(f.pose, {"record": res.record(),
                                "pose": res.pose.to_dict() if res.pose is not None else None,
                                "information": res.information})
    if fp is not None:
        outputs.write_json(f.result, f.certify({"status": res.status, "fingerprint": fp}, written))


def _load_pair(f: PairFiles, a: ImageInfo, b: ImageInfo) -> tuple[PairResult, Matches | None]:
    data = json.loads(f.pose.read_text())
    rec = data["record"]
    pose = PairPose.from_dict(data["pose"]) if data.get("pose") else None
    info = np.asarray(data["information"], float) if data.get("information") is not None else None
    res = PairResult(a.index, b.index, a.id, b.id, rec["status"], pose, rec.get("matches", {}), rec.get("error"),
                     rec.get("error_kind"), info, rec.get("vlm"), rec.get("cross_check"),
                     rec.get("kind", SEQUENTIAL))
    m = Matches.load(f.matches) if f.matches.is_file() else None
    return res, m


def _unusable(i, j, a: ImageInfo, b: ImageInfo) -> PairResult:
    bad = a if not a.ok else b
    return failed_pair(i, j, a.id, b.id, f"image {bad.id} unusable ({bad.error_kind}): {bad.error}", "image")


class PairStage:
    """Correspondences and RANSAC/PnP poses, one pair at a time, resumable (see the module docstring).

    A candidate pair (not a sequence neighbour) is first asked on a probe subset of its points; the rest
    only when the probe verifies, so a pair that does not overlap costs a few queries, one that does none
    more. A pair is skipped when its result.json certifies the current settings."""

    def __init__(self, infos: list[ImageInfo], cfg: ReconstructConfig, layout: RunLayout, engines, *,
                 require_metric: bool = True, depth_fp: str | None = None, progress: bool = True):
        self.infos, self.cfg, self.layout, self.engines = infos, cfg, layout, engines
        self.profile = load_profile(cfg.corr.profile)
        if self.profile.task != "corr":
            raise ConfigError(f"corr.profile: {self.profile.name!r} is a {self.profile.task} profile, not a "
                              f"correspondence profile")
        self.require_metric, self.progress = require_metric, progress
        self.fps = {k: pair_fingerprint(cfg, self.profile, depth_fp, k) for k in (SEQUENTIAL, CANDIDATE)}
        self.carried: dict[int, list[np.ndarray]] = {}
        self.engine, self.owned = None, False
        self.views = _Views(lambda info: corr_view(info.id, info.rgb(), info.camera, self.profile, path=info.path,
                                                   manifest=info.manifest))

    def run(self, pairs: list[tuple[int, int]], kinds: dict | None = None) -> list[PairResult]:
        bar = Progress(len(pairs), enabled=self.progress, label="pairs")
        results = []
        try:
            for i, j in pairs:
                for k in [k for k in self.carried if k < i]:
                    del self.carried[k]  # pairs come sorted by i: no later pair starts there
                kind = (kinds or {}).get((i, j), SEQUENTIAL)
                res, queries = self.one(i, j, kind)
                res.kind = kind
                results.append(res)
                bar.update(queries=queries, failed=int(res.status == "failed"))
        finally:
            bar.close()
            if self.owned and self.engine is not None:
                self.engine.close()
        return results

    def one(self, i: int, j: int, kind: str) -> tuple[PairResult, int]:
        """One pair's result and the queries it cost now (0 when it was done before)."""
        a, b = self.infos[i], self.infos[j]
        if not (a.ok and b.ok):
            return _unusable(i, j, a, b), 0
        f, fp = self.layout.pair(a.id, b.id), self.fps[kind]
        if self.cfg.overwrite:
            f.result.unlink(missing_ok=True)  # an interrupted overwrite must not look done
        elif f.done(fp) is not None and f.pose.is_file():
            res, m = _load_pair(f, a, b)
            self._carry(j, res, m)
            return res, 0
        if self.engine is None:
            self.engine, self.owned = self.engines.open("corr", self.profile)
        t0 = time.perf_counter()
        try:
            m, probe = self._ask(a, b, kind)
        except (ImageError, CameraError, OSError, ValueError) as exc:
            log.error("pair %s/%s: %s", a.id, b.id, exc)
            return failed_pair(i, j, a.id, b.id, str(exc), "image"), 0
        except EngineError as exc:
            log.error("pair %s/%s: engine failed: %s", a.id, b.id, exc)
            return failed_pair(i, j, a.id, b.id, f"engine: {exc}", "engine"), 0
        res = self._solve(a, b, m, probe, kind, time.perf_counter() - t0)
        _write_pair(f, res, m, self.cfg, rgb1=a.rgb() if self.cfg.corr.save_flow and probe.get("verified", True)
                    else None, fp=fp)
        self._carry(j, res, m)
        return res, len(m) + m.backward_queries

    def _carry(self, j: int, res: PairResult, m: Matches | None) -> None:
        if m is not None and res.status != "failed":
            self.carried.setdefault(j, []).append(m.pairs()[1])

    def _match(self, v1, v2, pts, key) -> Matches:
        c = self.cfg.corr
        return next(match_pairs(self.engine, self.profile, [PairRequest(v1, v2, pts, key=key)], grid=tuple(c.grid),
                                fb_check=c.fb_check, fb_thresh_px=c.fb_thresh_px))[1]

    def _ask(self, a: ImageInfo, b: ImageInfo, kind: str) -> tuple[Matches, dict]:
        """The pair's answers, through a probe first for a candidate pair; and the probe's record ({} without)."""
        v1, v2 = self.views.get(a), self.views.get(b)
        grid, carried = tuple(self.cfg.corr.grid), self.carried.get(a.index)
        W, H = a.camera.width, a.camera.height
        pts = (track_points(W, H, grid, np.concatenate(carried) if carried else None) if self.cfg.corr.track_queries
               else grid_points(W, H, count=grid).astype(float))
        probe = self.cfg.pairs.probe
        if kind == SEQUENTIAL or probe is None or probe[0] * probe[1] * 2 > len(pts):
            return self._match(v1, v2, pts, (a.index, b.index)), {}
        idx = probe_subset(pts, W, H, tuple(probe))
        first = self._match(v1, v2, pts[idx], (a.index, b.index))
        ok, rec = probe_verdict(first, a.camera, b.camera, self.cfg.pairs.probe_min_matches, self.cfg.pose.estimator)
        if not ok:
            return first, rec
        return Matches.concat([first, self._match(v1, v2, np.delete(pts, idx, 0), (a.index, b.index))]), rec

    def _solve(self, a: ImageInfo, b: ImageInfo, m: Matches, probe: dict, kind: str, wall_s: float) -> PairResult:
        i, j = a.index, b.index
        counts = {"asked": len(m), "asked_backward": m.backward_queries, "valid": m.n_valid,
                  "failures": m.failure_counts(),
                  "fb_median_px": float(np.nanmedian(m.fb_error)) if m.fb_error is not None
                  and np.isfinite(m.fb_error).any() else None, "wall_s": wall_s}
        if probe:
            counts["probe"] = probe
        if probe and not probe["verified"]:
            res = failed_pair(i, j, a.id, b.id, f"no overlap: {probe['valid']} of the probe's {probe['asked']} "
                              f"answers pass the forward-backward check, {probe['inliers']} fit one essential "
                              f"matrix (a probe needs {self.cfg.pairs.probe_min_matches}); the full grid was not "
                              f"asked", "no_overlap", counts)
            log.info("pair %s/%s: %s", a.id, b.id, res.error)
            return res
        depth1 = load_depth(self.layout, a) if self.cfg.pose.use_depth else None
        pose, info = solve_pair(m, a.camera, b.camera, depth1, self.cfg.pose.estimator)
        res = classify(PairResult(i, j, a.id, b.id, "ok", pose, counts, information=info, kind=kind),
                       require_metric=self.require_metric)
        if res.status == "failed":
            log.warning("pair %s/%s failed: %s", a.id, b.id, res.error)
        return res


def pair_stage(infos: list[ImageInfo], pairs: list[tuple[int, int]], cfg: ReconstructConfig, layout: RunLayout,
               engines, *, progress: bool = True, require_metric: bool = True, kinds: dict | None = None,
               depth_fp: str | None = None) -> list[PairResult]:
    """Correspondences and RANSAC/PnP poses for every pair, one pair at a time (resumable; see PairStage).

    engines: a `densify.stages.engine.StageEngines`. require_metric: a pose without metric scale counts as
    failed (it cannot join a pose graph). kinds: (i, j) -> 'sequential' | 'candidate' (default sequential:
    no probe). depth_fp: the depth stage's fingerprint (a pair's pose depends on image 1's depth)."""
    return PairStage(infos, cfg, layout, engines, require_metric=require_metric, depth_fp=depth_fp,
                     progress=progress).run(pairs, kinds)


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


