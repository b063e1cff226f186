"""Pair stage: which image pairs to relate, and matches (+ depth) -> a relative pose with its record.

The record of every pair, failed or not, says what happened in words and numbers (it goes to
pairs.jsonl and the run summary): a pair that fails never stops a reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from densify.geometry.clouds import depth_at_pixels, unproject
from densify.geometry.pose import FAILED, PairPose, PoseConfig, essential_pose, estimate_pair_pose
from densify.geometry.posegraph import information_from_points
from densify.io.cameras import Camera
from densify.pairs.matching import Matches

__all__ = ["pair_list", "PairResult", "solve_pair", "solve_pair_xy", "pair_key", "failed_pair", "classify",
           "probe_verdict", "PAIR_MODES"]

PAIR_MODES = ("consecutive", "consecutive+skip2")


def pair_list(n: int, mode: str = "consecutive") -> list[tuple[int, int]]:
    """(i, i+1) for every i, plus (i, i+2) with 'consecutive+skip2'; sorted by i (then j). Other selections:
    densify.pairs.select."""
    if mode not in PAIR_MODES:
        raise ValueError(f"pairs must be one of {', '.join(PAIR_MODES)}, got {mode!r}")
    from densify.pairs.select import sequential_pairs

    return sequential_pairs(n, mode == "consecutive+skip2")


def probe_verdict(m: Matches, cam1: Camera, cam2: Camera, min_matches: int, cfg: PoseConfig) -> tuple[bool, dict]:
    """Does a probe's answers say the two images overlap? At least `min_matches` answers must pass the
    forward-backward check and be inliers of one essential matrix (random answers about a view that is
    not there almost never survive the round trip)."""
    xy1, xy2 = m.pairs()
    rec = {"asked": len(m), "asked_backward": m.backward_queries, "valid": len(xy1), "inliers": 0}
    if len(xy1) >= min_matches:
        e = essential_pose(xy1, xy2, cam1, cam2, cfg)
        rec["inliers"] = 0 if e is None else int(np.sum(e[2]))
    rec["verified"] = rec["inliers"] >= min_matches
    return rec["verified"], rec


def pair_key(id1: str, id2: str) -> str:
    return f"{id1}__{id2}"


@dataclass
class PairResult:
    i: int
    j: int
    id1: str
    id2: str
    status: str = "ok"
    """'ok' (a usable pose) | 'failed' | 'skipped' (outputs existed; loaded back)."""
    pose: PairPose | None = None
    matches: dict = field(default_factory=dict)
    """Counts: asked, valid, failure kinds."""
    error: str | None = None
    error_kind: str | None = None
    """'image' | 'depth' | 'engine' | 'matches' | 'pose' | 'scale' | 'no_overlap' (the probe did not verify)."""
    information: np.ndarray | None = None
    """6x6 pose-graph information of the metric pose (from the 3D points supporting it)."""
    vlm: dict | None = None
    cross_check: dict | None = None
    """Angles between the RANSAC and the VLM pose, when both were computed."""
    kind: str = "sequential"
    """'sequential' (a neighbour in a sequence) | 'candidate' (chosen by retrieval, a file or every pair)."""

    @property
    def usable(self) -> bool:
        return self.pose is not None and self.pose.ok and self.pose.T is not None

    def record(self) -> dict:
        rec = {"pair": [self.id1, self.id2], "index": [self.i, self.j], "status": self.status, "kind": self.kind,
               "matches": self.matches}
        if self.pose is not None:
            p = self.pose
            rec.update(verdict=p.verdict, reason=p.reason, source=p.source, inliers=p.inliers,
                       n_matches=p.n_matches, metric=p.t_metric is not None,
                       details={k: v for k, v in p.to_dict()["details"].items() if k not in ("texts",)})
        if self.error is not None:
            rec.update(error=self.error, error_kind=self.error_kind)
        if self.vlm is not None:
            rec["vlm"] = self.vlm
        if self.cross_check is not None:
            rec["cross_check"] = self.cross_check
        return rec


def solve_pair(m: Matches, cam1: Camera, cam2: Camera, depth1: np.ndarray | None,
               cfg: PoseConfig) -> tuple[PairPose, np.ndarray | None]:
    """Pose from the valid matches (+ depth of image 1 for the metric scale) and its information matrix."""
    return solve_pair_xy(*m.pairs(), cam1, cam2, depth1, cfg)


def solve_pair_xy(xy1: np.ndarray, xy2: np.ndarray, cam1: Camera, cam2: Camera, depth1: np.ndarray | None,
                  cfg: PoseConfig) -> tuple[PairPose, np.ndarray | None]:
    """solve_pair for any matcher's points (original pixels)."""
    pose = estimate_pair_pose(xy1, xy2, cam1, cam2, depth1=depth1, cfg=cfg)
    info = None
    if pose.ok and pose.T is not None and depth1 is not None and pose.inlier_mask is not None:
        a = xy1[pose.inlier_mask]
        z = depth_at_pixels(depth1, a)
        ok = np.isfinite(z) & (z > 0)
        X = unproject(a[ok], z[ok], cam1)
        T = pose.T
        if len(X) >= 3:
            info = information_from_points(X @ T[:3, :3].T + T[:3, 3])
    return pose, info


def failed_pair(i, j, id1, id2, error: str, kind: str, matches: dict | None = None) -> PairResult:
    return PairResult(i, j, id1, id2, "failed", PairPose.failed(error) if kind != "image" else None,
                      matches or {}, error, kind)


def classify(res: PairResult, *, require_metric: bool = True) -> PairResult:
    """Set status/error from the pose's verdict (in a reconstruction a pose without metric scale cannot
    enter the pose graph: require_metric)."""
    p = res.pose
    if p is None:
        return res
    if p.verdict == FAILED:
        res.status, res.error, res.error_kind = "failed", p.reason, res.error_kind or "pose"
    elif require_metric and p.T is None:
        res.status, res.error, res.error_kind = "failed", "no metric scale (no depth for image 1, or PnP " \
                                                          "failed): cannot join the pose graph", "scale"
    return res
