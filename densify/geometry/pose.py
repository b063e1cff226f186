"""Relative pose of an image pair from point matches: essential matrix (+ metric PnP with a depth map).

Convention (OpenCV's recoverPose): x_2 = R @ x_1 + t, points in camera 1's frame -> camera 2's frame;
camera frames x right, y down, z forward. `t` is a unit vector; `t_metric` carries metres when image 1
has a depth map (3D points from depth + their matches in image 2 -> PnP; the essential matrix then
cross-checks it).

The two images may have different intrinsics: points are normalised with each K first and the essential
matrix is estimated with an identity K, so the RANSAC threshold is in normalised units (pixels / focal).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from densify.geometry.clouds import depth_at_pixels, unproject
from densify.geometry.rotations import angle_between_deg, rotation_angle_deg
from densify.io.cameras import Camera

log = logging.getLogger(__name__)

__all__ = ["PairPose", "PoseConfig", "estimate_pair_pose", "essential_pose", "pnp_pose", "depth_scale",
           "rotation_only_residual", "pose_matrix", "GOOD", "WEAK", "FAILED"]

GOOD, WEAK, FAILED = "good", "weak", "failed"


class PoseConfig(BaseModel):
    """Robust estimation and the thresholds of the per-pair verdict."""
    model_config = ConfigDict(extra="forbid")
    ransac_thresh_px: float = Field(2.0, gt=0, description="essential-matrix inlier threshold, in pixels "
                                    "(converted to normalised units with the mean focal length)")
    confidence: float = Field(0.9999, gt=0, lt=1, description="RANSAC confidence")
    max_iters: int = Field(10000, ge=100, description="RANSAC iterations at most")
    min_matches: int = Field(15, ge=5, description="fewer valid matches: the pair fails")
    min_inliers: int = Field(12, ge=5, description="fewer inliers: the pair fails")
    min_inlier_ratio: float = Field(0.25, ge=0, le=1, description="lower inlier ratio: the pair fails")
    good_inlier_ratio: float = Field(0.5, ge=0, le=1, description="lower inlier ratio: the pair is weak")
    good_inliers: int = Field(40, ge=0, description="fewer inliers: the pair is weak")
    min_parallax_px: float = Field(1.0, ge=0, description="median residual of the best rotation-only "
                                   "homography below this (pixels): pure rotation, no translation direction")
    parallax_noise_ratio: float = Field(3.0, ge=0, description="... or below this many times the median "
                                        "epipolar residual (the match noise level)")
    pnp_thresh_px: float = Field(4.0, gt=0, description="PnP inlier reprojection threshold, pixels")
    pnp_min_inliers: int = Field(12, ge=4, description="fewer PnP inliers: no metric pose")
    agree_deg: float = Field(5.0, gt=0, description="essential and PnP rotations further apart: weak")
    prefer: Literal["pnp", "essential"] = Field("pnp", description="with a depth map: the PnP pose (robust "
                                                "to the essential matrix's ambiguities on short forward steps), or "
                                                "the essential matrix's R and direction with the depth's scale")
    essential_units: Literal["normalised", "pixels"] = Field(
        "normalised", description="coordinates the essential RANSAC sees: each image's points normalised with its "
        "own K and an identity K (threshold / focal), or those normalised points times the mean focal length "
        "(threshold in pixels). With OpenCV's MAGSAC, 'pixels' is ~5x more accurate on precise (SIFT) matches, "
        "'normalised' about 2x on noisy VLM answers (benchmarks/reconstruct_bench.py)")
    seed: int = Field(0, description="RANSAC random seed (results are reproducible)")


def pose_matrix(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = np.asarray(t, float).ravel()
    return T


@dataclass
class PairPose:
    """The relative pose of one ordered pair and how far to trust it."""

    R: np.ndarray | None
    """3x3, x_2 = R @ x_1 + t."""
    t: np.ndarray | None
    """Unit translation (direction only)."""
    t_metric: np.ndarray | None
    """Translation in metres (from depth + PnP, or the VLM's distance), else None."""
    inliers: int
    n_matches: int
    verdict: str
    """'good' | 'weak' | 'failed'."""
    reason: str = ""
    source: str = "essential"
    """'essential' | 'pnp' | 'vlm': which estimate R and t come from."""
    details: dict = field(default_factory=dict)
    """Diagnostics: inlier ratio, parallax, PnP inliers, essential-vs-PnP angles, ..."""
    inlier_mask: np.ndarray | None = field(default=None, repr=False)
    """N bool over the input matches (essential inliers, or PnP's for source 'pnp')."""

    @property
    def ok(self) -> bool:
        return self.verdict != FAILED and self.R is not None

    @property
    def T(self) -> np.ndarray | None:
        """4x4 metric transform camera 1 -> camera 2, when the scale is known."""
        if self.R is None or self.t_metric is None:
            return None
        return pose_matrix(self.R, self.t_metric)

    def to_dict(self) -> dict:
        return {"R": None if self.R is None else self.R.tolist(), "t": None if self.t is None else self.t.tolist(),
                "t_metric": None if self.t_metric is None else self.t_metric.tolist(),
                "T_2_from_1": None if self.T is None else self.T.tolist(),
                "inliers": int(self.inliers), "n_matches": int(self.n_matches), "verdict": self.verdict,
                "reason": self.reason, "source": self.source, "details": _plain(self.details)}

    @classmethod
    def from_dict(cls, d: dict) -> "PairPose":
        arr = lambda v: None if v is None else np.asarray(v, float)  # noqa: E731
        return cls(arr(d["R"]), arr(d["t"]), arr(d["t_metric"]), d["inliers"], d["n_matches"], d["verdict"],
                   d.get("reason", ""), d.get("source", "essential"), d.get("details", {}))

    @classmethod
    def failed(cls, reason: str, n_matches: int = 0, **details) -> "PairPose":
        return cls(None, None, None, 0, n_matches, FAILED, reason, details=details)


def _plain(d):
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(d, (np.floating, np.integer)):
        return d.item()
    if isinstance(d, np.ndarray):
        return d.tolist()
    return d


def _normalise(xy: np.ndarray, cam: Camera) -> np.ndarray:
    return cv2.undistortPoints(np.ascontiguousarray(xy, np.float64).reshape(-1, 1, 2), cam.K, None).reshape(-1, 2)


def _robust_method() -> int:
    return getattr(cv2, "USAC_MAGSAC", cv2.RANSAC)


def essential_pose(xy1: np.ndarray, xy2: np.ndarray, cam1: Camera, cam2: Camera, cfg: PoseConfig):
    """(R, unit t, inlier mask) from the essential matrix, or None when no model is found."""
    n1, n2 = _normalise(xy1, cam1), _normalise(xy2, cam2)
    f = np.mean([cam1.fx, cam1.fy, cam2.fx, cam2.fy])
    if cfg.essential_units == "pixels":
        # The same normalised points, scaled by one shared focal length: pixel-sized numbers, one K.
        n1, n2, K, thr = n1 * f, n2 * f, np.diag([f, f, 1.0]), cfg.ransac_thresh_px
    else:
        K, thr = np.eye(3), cfg.ransac_thresh_px / f
    cv2.setRNGSeed(cfg.seed)
    try:
        E, mask = cv2.findEssentialMat(n1, n2, K, method=_robust_method(), prob=cfg.confidence,
                                       threshold=thr, maxIters=cfg.max_iters)
    except cv2.error as exc:  # USAC unavailable in this build, or a degenerate sample set
        log.debug("findEssentialMat with USAC failed (%s); falling back to RANSAC", exc)
        E, mask = cv2.findEssentialMat(n1, n2, K, method=cv2.RANSAC, prob=cfg.confidence, threshold=thr,
                                       maxIters=cfg.max_iters)
    if E is None or mask is None or E.shape[0] < 3:
        return None
    best = None
    # The 5-point solver may return up to ten stacked solutions: keep the one with most cheiral inliers.
    for k in range(E.shape[0] // 3):
        Ek = E[3 * k:3 * k + 3]
        n_in, R, t, m = cv2.recoverPose(Ek, n1, n2, K, mask=mask.copy())
        if best is None or n_in > best[0]:
            best = (n_in, R, t.ravel(), m.ravel() > 0, Ek)
    n_in, R, t, inl, Ek = best
    if n_in == 0:
        return None
    return R, t / max(np.linalg.norm(t), 1e-12), inl, Ek


def epipolar_residual_px(E: np.ndarray, xy1, xy2, cam1: Camera, cam2: Camera) -> np.ndarray:
    """Distance of each point in image 2 to its epipolar line, in pixels of image 2."""
    n1, n2 = _normalise(xy1, cam1), _normalise(xy2, cam2)
    h1 = np.c_[n1, np.ones(len(n1))]
    h2 = np.c_[n2, np.ones(len(n2))]
    lines = h1 @ E.T
    d = np.abs(np.sum(lines * h2, 1)) / np.maximum(np.hypot(lines[:, 0], lines[:, 1]), 1e-12)
    return d * 0.5 * (cam2.fx + cam2.fy)


def rotation_only_residual(xy1, xy2, cam1: Camera, cam2: Camera) -> tuple[np.ndarray, np.ndarray]:
    """Best rotation-only model (Kabsch on bearing vectors, one trimmed refit) -> (R, residual pixels).

    Under a pure rotation every match obeys x_2 ~ K2 R K1^-1 x_1 up to noise: a small median residual means
    there is no parallax to recover a translation direction from.
    """
    b1 = np.c_[_normalise(xy1, cam1), np.ones(len(xy1))]
    b2 = np.c_[_normalise(xy2, cam2), np.ones(len(xy2))]
    b1 /= np.linalg.norm(b1, axis=1, keepdims=True)
    b2 /= np.linalg.norm(b2, axis=1, keepdims=True)

    def fit(sel):
        U, _, Vt = np.linalg.svd(b2[sel].T @ b1[sel])
        D = np.diag([1, 1, np.sign(np.linalg.det(U @ Vt))])
        return U @ D @ Vt

    def resid(R):
        H = cam2.K @ R @ np.linalg.inv(cam1.K)
        p = np.c_[xy1, np.ones(len(xy1))] @ H.T
        with np.errstate(divide="ignore", invalid="ignore"):
            p = p[:, :2] / p[:, 2:3]
        r = np.hypot(*(p - xy2).T)
        return np.where(np.isfinite(r), r, np.inf)

    R = fit(np.ones(len(b1), bool))
    r = resid(R)
    R = fit(r <= np.percentile(r, 80))
    return R, resid(R)


def depth_scale(xy1, xy2, R, t, depth1: np.ndarray, cam1: Camera, cam2: Camera) -> tuple[float | None, int]:
    """Metric length of a unit translation from image 1's depth map: a weighted median over the inliers of
    depth * triangulated inverse depth (unit baseline).

    The inverse depth is taken signed (homogeneous triangulation), so points with little parallax carry
    symmetric noise instead of being clipped away; each vote is weighted by its inverse variance
    (parallax per unit inverse depth, squared, over depth squared). Dropping low-parallax points instead
    would bias the scale up; a PnP fit on noisy 3D points biases it down.
    """
    h, w = depth1.shape
    z = depth1[np.clip(np.round(xy1[:, 1]).astype(int), 0, h - 1),
               np.clip(np.round(xy1[:, 0]).astype(int), 0, w - 1)].astype(np.float64)
    n1, n2 = _normalise(xy1, cam1), _normalise(xy2, cam2)
    t = np.asarray(t, float).ravel()
    P1 = np.hstack([np.eye(3), np.zeros((3, 1))])
    P2 = np.hstack([R, t.reshape(3, 1)])
    Xh = cv2.triangulatePoints(P1, P2, n1.T.astype(np.float64), n2.T.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = Xh[3] / Xh[2]            # signed inverse depth in camera 1, unit baseline
    # parallax in image 2 (pixels) per unit of inverse depth, at the ray of each point
    b = np.c_[n1, np.ones(len(n1))] @ R.T
    eps = 1e-3

    def proj(q):
        return q[:, :2] / q[:, 2:3]

    with np.errstate(divide="ignore", invalid="ignore"):
        J = np.linalg.norm(proj(b + eps * t) - proj(b), axis=1) / eps * 0.5 * (cam2.fx + cam2.fy)
    votes = z * inv
    wts = (J / np.maximum(z, 1e-9)) ** 2
    ok = np.isfinite(z) & (z > 0) & np.isfinite(votes) & np.isfinite(wts) & (wts > 0)
    if ok.sum() < 5:
        return None, int(ok.sum())
    v, wv = votes[ok], wts[ok]
    order = np.argsort(v)
    cw = np.cumsum(wv[order])
    s = float(v[order][np.searchsorted(cw, 0.5 * cw[-1])])
    return (s if s > 0 else None), int(ok.sum())


def _rotation_only_inliers(xy1, xy2, cam1: Camera, cam2: Camera, cfg: PoseConfig):
    """(R, median residual px, inlier share) of a rotation-only fit on a homography's inliers."""
    if len(xy1) < 8:
        return None, float("inf"), 0.0
    cv2.setRNGSeed(cfg.seed)
    H, mask = cv2.findHomography(xy1, xy2, cv2.RANSAC, 2 * cfg.ransac_thresh_px, maxIters=cfg.max_iters,
                                 confidence=cfg.confidence)
    if H is None or mask is None or mask.sum() < 4:
        return None, float("inf"), 0.0
    m = mask.ravel() > 0
    R, res = rotation_only_residual(xy1[m], xy2[m], cam1, cam2)
    return R, float(np.median(res)), float(m.mean())


def pnp_pose(xy1: np.ndarray, xy2: np.ndarray, depth1: np.ndarray, cam1: Camera, cam2: Camera,
             cfg: PoseConfig, guess: tuple[np.ndarray, np.ndarray] | None = None):
    """Metric (R, t, inlier mask) from 3D points of image 1 (its depth map) and their matches in image 2."""
    z = depth_at_pixels(depth1, xy1)
    ok = np.isfinite(z) & (z > 0)
    if ok.sum() < max(cfg.pnp_min_inliers, 6):
        return None
    X = unproject(xy1, z, cam1)
    Xo, xo = np.ascontiguousarray(X[ok]), np.ascontiguousarray(xy2[ok], np.float64)
    res = None
    cv2.setRNGSeed(cfg.seed)
    if hasattr(cv2, "UsacParams"):
        try:
            p = cv2.UsacParams()
            p.threshold = cfg.pnp_thresh_px
            p.confidence = cfg.confidence
            p.maxIterations = cfg.max_iters
            p.randomGeneratorState = cfg.seed
            p.score = getattr(cv2, "SCORE_METHOD_MAGSAC", p.score)
            p.loMethod = getattr(cv2, "LOCAL_OPTIM_SIGMA", p.loMethod)
            p.sampler = getattr(cv2, "SAMPLING_UNIFORM", p.sampler)
            okr, _, rvec, tvec, inl = cv2.solvePnPRansac(Xo, xo, cam2.K, None, params=p)
            if okr and inl is not None:
                res = (rvec, tvec, inl)
        except cv2.error as exc:
            log.debug("USAC PnP failed (%s); using classic RANSAC", exc)
    if res is None:
        okr, rvec, tvec, inl = cv2.solvePnPRansac(Xo, xo, cam2.K, None, iterationsCount=cfg.max_iters,
                                                  reprojectionError=cfg.pnp_thresh_px, confidence=cfg.confidence,
                                                  flags=cv2.SOLVEPNP_SQPNP)
        if not okr or inl is None:
            return None
        res = (rvec, tvec, inl)
    rvec, tvec, inl = res
    inl = inl.ravel()
    if len(inl) < cfg.pnp_min_inliers:
        return None
    rvec, tvec = cv2.solvePnPRefineLM(Xo[inl], xo[inl], cam2.K, None, rvec.copy(), tvec.copy())
    R = cv2.Rodrigues(rvec)[0]
    # Re-score inliers with the refined pose (the refit may recover a few).
    proj = cv2.projectPoints(Xo, rvec, tvec, cam2.K, None)[0].reshape(-1, 2)
    inl_mask = np.zeros(len(xy1), bool)
    inl_mask[np.flatnonzero(ok)] = np.hypot(*(proj - xo).T) <= cfg.pnp_thresh_px
    return R, tvec.ravel(), inl_mask


def estimate_pair_pose(xy1: np.ndarray, xy2: np.ndarray, cam1: Camera, cam2: Camera, *,
                       depth1: np.ndarray | None = None, cfg: PoseConfig | None = None) -> PairPose:
    """Relative pose from matches (original pixels of each image) with a verdict.

    Without depth: the essential matrix (R, unit t). With a depth map of image 1 (image 1's size) the pose
    is metric: PnP on the 3D points (RANSAC + LM refinement) is the pose (cfg.prefer 'pnp'), and the
    essential matrix its cross-check. VLM answers are noisy against the parallax of a short forward step,
    where the essential matrix can settle on the rotation-translation ambiguity; the depth map removes it.
    With prefer 'essential', R and the direction come from the essential matrix and only the length from
    the depth (PnP's translation along it, else depth over triangulated depth).
    """
    cfg = cfg or PoseConfig()
    xy1 = np.asarray(xy1, np.float64).reshape(-1, 2)
    xy2 = np.asarray(xy2, np.float64).reshape(-1, 2)
    fin = np.all(np.isfinite(xy1), 1) & np.all(np.isfinite(xy2), 1)
    idx = np.flatnonzero(fin)
    xy1, xy2 = xy1[fin], xy2[fin]
    n = len(xy1)
    if n < cfg.min_matches:
        return PairPose.failed(f"too few matches: {n} < {cfg.min_matches}", n)

    def full_mask(m):
        out = np.zeros(len(fin), bool)
        out[idx[m]] = True
        return out

    ess = essential_pose(xy1, xy2, cam1, cam2, cfg)
    pnp = pnp_pose(xy1, xy2, depth1, cam1, cam2, cfg) if depth1 is not None else None
    details: dict = {"pnp_inliers": int(pnp[2].sum()) if pnp else 0}
    pnp_ok = pnp is not None and pnp[2].sum() >= cfg.min_inliers and pnp[2].mean() >= cfg.min_inlier_ratio

    # -- what the essential matrix says (also the pure-rotation test)
    e_fail, pure_why = None, None
    if ess is None:
        e_fail = "degenerate: no essential matrix found"
        # Often a pure rotation (every translation fits, the solver refuses): a homography's inliers that
        # a rotation alone explains tell it apart from other degeneracies.
        Rr, parallax, frac = _rotation_only_inliers(xy1, xy2, cam1, cam2, cfg)
        if Rr is not None:
            details.update(parallax_px=parallax, rotation_only_inlier_ratio=frac)
            if frac >= cfg.min_inlier_ratio and parallax < max(cfg.min_parallax_px, 2 * cfg.ransac_thresh_px):
                pure_why = (f"pure rotation detected: median parallax {parallax:.2f} px after the best rotation; "
                            f"translation direction undefined")
                e_fail = pure_why
                if not pnp_ok:
                    return PairPose(Rr, None, None, int(round(frac * n)), n, FAILED, pure_why, details=details)
    else:
        R, t, inl, E = ess
        n_in = int(inl.sum())
        ratio = n_in / n
        details.update(inlier_ratio=ratio, essential_inliers=n_in)
        if n_in >= 3:
            rot_res = rotation_only_residual(xy1[inl], xy2[inl], cam1, cam2)[1]
            epi = epipolar_residual_px(E, xy1[inl], xy2[inl], cam1, cam2)
            parallax, noise = float(np.median(rot_res)), float(np.median(epi))
            details.update(parallax_px=parallax, epipolar_px=noise)
            if parallax < max(cfg.min_parallax_px, cfg.parallax_noise_ratio * noise):
                pure_why = (f"pure rotation detected: median parallax {parallax:.2f} px vs match noise "
                            f"{noise:.2f} px; translation direction undefined")
        if n_in < cfg.min_inliers:
            e_fail = f"too few inliers: {n_in} < {cfg.min_inliers}"
        elif ratio < cfg.min_inlier_ratio:
            e_fail = f"low inlier ratio: {ratio:.2f} < {cfg.min_inlier_ratio}"
        elif pure_why:
            e_fail = pure_why
        if pnp is not None:
            Rp, tp, _ = pnp
            details.update(essential_vs_pnp_rotation_deg=rotation_angle_deg(R @ Rp.T),
                           essential_vs_pnp_direction_deg=angle_between_deg(t, tp), pnp_t=tp.tolist())

    # -- metric pose from depth + PnP
    if pnp_ok and (cfg.prefer == "pnp" or e_fail is not None):
        Rp, tp, pin = pnp
        n_p = int(pin.sum())
        ratio_p = n_p / n
        details.update(pnp_inlier_ratio=ratio_p)
        reasons = []
        if e_fail is not None:
            reasons.append(f"{e_fail}; metric pose from depth + PnP")
        if ratio_p < cfg.good_inlier_ratio:
            reasons.append(f"PnP inlier ratio {ratio_p:.2f} < {cfg.good_inlier_ratio}")
        if n_p < cfg.good_inliers:
            reasons.append(f"{n_p} PnP inliers < {cfg.good_inliers}")
        d_rot = details.get("essential_vs_pnp_rotation_deg")
        if e_fail is None and d_rot is not None and d_rot > cfg.agree_deg:
            reasons.append(f"essential and PnP rotations differ by {d_rot:.1f} deg")
        nt = float(np.linalg.norm(tp))
        return PairPose(Rp, tp / nt if nt > 0 else np.zeros(3), tp, n_p, n, WEAK if reasons else GOOD,
                        "; ".join(reasons), "pnp", details, full_mask(pin))

    # -- the essential matrix alone (no depth, PnP unusable, or prefer 'essential')
    if ess is None or e_fail is not None:
        if ess is None:
            return PairPose.failed(e_fail, n, **details)
        R_out = R if pure_why and e_fail == pure_why else None  # the rotation is still right
        return PairPose(R_out, None, None, n_in, n, FAILED, e_fail, details=details, inlier_mask=full_mask(inl))
    reasons = []
    if ratio < cfg.good_inlier_ratio:
        reasons.append(f"inlier ratio {ratio:.2f} < {cfg.good_inlier_ratio}")
    if n_in < cfg.good_inliers:
        reasons.append(f"{n_in} inliers < {cfg.good_inliers}")
    t_metric = None
    if depth1 is not None:
        scale = None
        if pnp is not None and float(t @ pnp[1]) > 0:
            scale = float(t @ pnp[1])  # PnP's translation along the essential direction
            d_rot = details["essential_vs_pnp_rotation_deg"]
            if d_rot > cfg.agree_deg:
                reasons.append(f"essential and PnP rotations differ by {d_rot:.1f} deg")
        else:
            scale, votes = depth_scale(xy1[inl], xy2[inl], R, t, depth1, cam1, cam2)
            details.update(scale_triangulation=scale, scale_votes=votes)
        if scale is not None:
            t_metric = t * scale
        else:
            reasons.append("no metric scale: PnP failed and too few points with depth")
    return PairPose(R, t, t_metric, n_in, n, WEAK if reasons else GOOD, "; ".join(reasons), "essential", details,
                    full_mask(inl))
