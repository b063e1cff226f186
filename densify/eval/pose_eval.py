"""Pose, correspondence and reconstruction metrics, as the matching and pose literature reports them.

- rotation error: angle of R_est R_gt^T (degrees);
- translation-direction error: angle between unit translations, folded with 180 - e as in SuperGlue /
  LoFTR (the essential matrix fixes the direction only up to sign); the unfolded angle is also given;
- pose AUC@T: area under the recall curve of max(rotation, direction error) up to T degrees, normalised;
- match end-point error (EPE) in pixels against the exact match map;
- Chamfer: accuracy = mean distance fused -> ground-truth surface samples, completeness = ground truth ->
  fused (metres), with the ground truth limited to surface the cameras saw.
"""

from __future__ import annotations

import numpy as np

from densify.geometry.rotations import angle_between_deg, rotation_angle_deg

__all__ = ["rotation_error_deg", "translation_error_deg", "pose_errors", "pose_auc", "match_epe", "chamfer",
           "visible_surface_samples", "trajectory_error"]


def rotation_error_deg(R_est, R_gt) -> float:
    return rotation_angle_deg(np.asarray(R_est) @ np.asarray(R_gt).T)


def translation_error_deg(t_est, t_gt, *, fold: bool = True) -> float:
    e = angle_between_deg(t_est, t_gt)
    return min(e, 180.0 - e) if fold and np.isfinite(e) else e


def pose_errors(pose, T_gt: np.ndarray) -> dict:
    """Errors of a PairPose against the true x_2 = T_gt x_1 (inf when the pair failed: counts as a miss)."""
    T_gt = np.asarray(T_gt, float)
    inf = float("inf")
    if pose is None or pose.R is None:
        return {"rot_deg": inf, "trans_deg": inf, "trans_deg_signed": inf, "max_deg": inf, "trans_m": inf,
                "ok": False}
    r = rotation_error_deg(pose.R, T_gt[:3, :3])
    if pose.t is not None and np.linalg.norm(T_gt[:3, 3]) > 1e-9:
        t = translation_error_deg(pose.t, T_gt[:3, 3])
        ts = translation_error_deg(pose.t, T_gt[:3, 3], fold=False)
    else:
        t = ts = inf
    tm = float(np.linalg.norm(pose.t_metric - T_gt[:3, 3])) if pose.t_metric is not None else inf
    return {"rot_deg": r, "trans_deg": t, "trans_deg_signed": ts, "max_deg": max(r, t), "trans_m": tm,
            "ok": bool(pose.ok)}


def pose_auc(errors, thresholds=(5, 10, 30)) -> dict:
    """SuperGlue's pose AUC: recall(e) integrated from 0 to T, divided by T (failures count as inf)."""
    errors = np.sort(np.asarray(list(errors), float))
    n = len(errors)
    out = {}
    if n == 0:
        return {f"auc@{t}": float("nan") for t in thresholds}
    recall = (np.arange(n) + 1) / n
    errors = np.r_[0.0, errors]
    recall = np.r_[0.0, recall]
    for t in thresholds:
        last = np.searchsorted(errors, t)
        r = np.r_[recall[:last], recall[last - 1]]
        e = np.r_[errors[:last], t]
        out[f"auc@{t}"] = float(np.trapezoid(r, x=e) / t) if hasattr(np, "trapezoid") else float(np.trapz(r, x=e) / t)
    return out


def match_epe(xy1: np.ndarray, xy2: np.ndarray, gt_map: np.ndarray) -> np.ndarray:
    """End-point error (pixels of image 2) of each match whose source pixel is visible in image 2."""
    xy1, xy2 = np.asarray(xy1, float).reshape(-1, 2), np.asarray(xy2, float).reshape(-1, 2)
    h, w = gt_map.shape[:2]
    xi = np.clip(np.round(xy1[:, 0]).astype(int), 0, w - 1)
    yi = np.clip(np.round(xy1[:, 1]).astype(int), 0, h - 1)
    g = gt_map[yi, xi]
    return np.hypot(*(xy2 - g).T)  # NaN where the truth says "not visible"


def chamfer(pred: np.ndarray, gt: np.ndarray, *, gt_mesh=None, thresholds=(0.05, 0.1)) -> dict:
    """accuracy (pred -> gt), completeness (gt -> pred), their mean, and F-scores at the thresholds.

    With `gt_mesh` (Open3D TriangleMesh) accuracy is the exact distance to the mesh surface, so it does not
    depend on how densely `gt` samples it (nearest-sample distances would add about half the spacing).
    """
    from scipy.spatial import cKDTree

    pred, gt = np.asarray(pred, float).reshape(-1, 3), np.asarray(gt, float).reshape(-1, 3)
    if not len(pred) or not len(gt):
        return {"accuracy": float("inf"), "completeness": float("inf"), "chamfer": float("inf"),
                "n_pred": len(pred), "n_gt": len(gt)}
    if gt_mesh is not None:
        import open3d as o3d

        rs = o3d.t.geometry.RaycastingScene()
        rs.add_triangles(o3d.t.geometry.TriangleMesh.from_legacy(gt_mesh))
        d_pg = rs.compute_distance(o3d.core.Tensor(pred.astype(np.float32))).numpy().astype(np.float64)
    else:
        d_pg = cKDTree(gt).query(pred)[0]
    d_gp = cKDTree(pred).query(gt)[0]
    out = {"accuracy": float(d_pg.mean()), "completeness": float(d_gp.mean()),
           "accuracy_median": float(np.median(d_pg)), "completeness_median": float(np.median(d_gp)),
           "n_pred": len(pred), "n_gt": len(gt)}
    out["chamfer"] = 0.5 * (out["accuracy"] + out["completeness"])
    for t in thresholds:
        p, r = float((d_pg < t).mean()), float((d_gp < t).mean())
        out[f"fscore@{t}"] = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return out


def visible_surface_samples(mesh, views, *, n: int = 200_000, seed: int = 0, rtol: float = 0.01,
                            max_depth: float | None = None) -> np.ndarray:
    """Uniform samples of a mesh (world frame) kept where at least one view sees them (depth test).

    views: iterable of (depth HxW, Camera, cam_to_world).
    """
    import open3d as o3d

    o3d.utility.random.seed(seed)
    pts = np.asarray(mesh.sample_points_uniformly(number_of_points=n).points)
    seen = np.zeros(len(pts), bool)
    for depth, cam, c2w in views:
        w2c = np.linalg.inv(np.asarray(c2w, float))
        pc = pts @ w2c[:3, :3].T + w2c[:3, 3]
        z = pc[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.round(cam.fx * pc[:, 0] / z + cam.cx)
            v = np.round(cam.fy * pc[:, 1] / z + cam.cy)
        ok = (z > 1e-6) & (u >= 0) & (u < cam.width) & (v >= 0) & (v < cam.height)
        if max_depth is not None:
            ok &= z <= max_depth
        idx = np.flatnonzero(ok)
        d = depth[v[idx].astype(int), u[idx].astype(int)]
        seen[idx[np.abs(d - z[idx]) <= rtol * z[idx] + 0.01]] = True
    return pts[seen]


def trajectory_error(est: dict, gt: dict, reference) -> dict:
    """Camera-centre error (metres) after expressing the estimate in the truth's world through the
    reference camera (no scale or rotation fitting: metric poses must be right on their own)."""
    keys = [k for k in est if k in gt]
    if not keys or reference not in gt:
        return {"ate_rmse_m": float("nan"), "rot_mean_deg": float("nan"), "n": 0}
    A = np.asarray(gt[reference], float)
    err_t, err_r = [], []
    for k in keys:
        P = A @ np.asarray(est[k], float)
        G = np.asarray(gt[k], float)
        err_t.append(np.linalg.norm(P[:3, 3] - G[:3, 3]))
        err_r.append(rotation_error_deg(P[:3, :3], G[:3, :3]))
    return {"ate_rmse_m": float(np.sqrt(np.mean(np.square(err_t)))), "ate_max_m": float(np.max(err_t)),
            "rot_mean_deg": float(np.mean(err_r)), "n": len(keys)}
