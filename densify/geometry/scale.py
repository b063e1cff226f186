"""Per-view depth scale from other views: a single image cannot reveal its own metric scale, other views can.

For a pair (i, j) with a metric pose, image i's points (its depth at the matched pixels) moved into camera j
give the depth image j should see there; the median log ratio of what j's depth map says to that is
log(s_j / s_i). Least squares over every such pair (mean log scale 0) estimates each view's relative
scale. Dividing each depth map by it before fusion removes the per-image scale errors a VLM makes (the
monocular ambiguity the focal normalisation only partly removes); the scene's common scale stays.
"""

from __future__ import annotations

import numpy as np

from densify.geometry.clouds import depth_at_pixels, unproject
from densify.io.cameras import Camera

__all__ = ["pair_log_scale", "relative_log_scales"]


def pair_log_scale(xy1: np.ndarray, xy2: np.ndarray, depth1: np.ndarray, depth2: np.ndarray, cam1: Camera,
                   R: np.ndarray, t_metric: np.ndarray, min_points: int = 20) -> float | None:
    """log(s_2 / s_1) from matched pixels and the metric pose x_2 = R x_1 + t; None with too few points."""
    if len(xy1) < min_points:
        return None
    X = unproject(xy1, depth_at_pixels(depth1, xy1), cam1)
    z2 = (X @ np.asarray(R, float).T + np.asarray(t_metric, float).reshape(3))[:, 2]
    d2 = depth_at_pixels(depth2, xy2)
    ok = np.isfinite(z2) & np.isfinite(d2) & (z2 > 0.1) & (d2 > 0)
    if ok.sum() < min_points:
        return None
    return float(np.median(np.log(d2[ok] / z2[ok])))


def relative_log_scales(n: int, pairs: list[tuple[int, int, float]], robust: float | None = None) -> np.ndarray | None:
    """Each view's log scale (mean 0) from (i, j, log(s_j / s_i)); None when no pair. Views no pair reaches
    keep 0 (no correction). robust: residuals beyond about this many log units count less (SciPy's soft-L1
    loss, e.g. 0.05), so a wrong pair's ratio cannot pull every view; None (the stages' default, as
    benchmarked): plain least squares."""
    if not pairs:
        return None
    A = np.zeros((len(pairs) + 1, n))
    b = np.zeros(len(pairs) + 1)
    for q, (i, j, lr) in enumerate(pairs):
        A[q, i], A[q, j], b[q] = -1.0, 1.0, lr
    A[-1] = 1.0  # the gauge: the scene keeps its mean scale
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    if robust is None or len(pairs) < 3:
        return x
    from scipy.optimize import least_squares

    w = np.r_[np.ones(len(pairs)), 10.0]  # the gauge row is a constraint, not a measurement
    return least_squares(lambda v: w * (A @ v - b), x, loss="soft_l1", f_scale=robust).x
