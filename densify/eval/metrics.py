"""Depth and correspondence metrics, as the papers define them."""

from __future__ import annotations

import numpy as np


def _valid(pred, gt):
    pred, gt = np.asarray(pred, float), np.asarray(gt, float)
    ok = np.isfinite(pred) & np.isfinite(gt) & (gt > 0) & (pred > 0)
    return pred[ok], gt[ok]


def delta1(pred, gt, thresh: float = 1.25) -> float:
    """Share of points with max(pred/gt, gt/pred) < 1.25."""
    p, g = _valid(pred, gt)
    return float(np.mean(np.maximum(p / g, g / p) < thresh)) if len(p) else float("nan")


def absrel(pred, gt) -> float:
    p, g = _valid(pred, gt)
    return float(np.mean(np.abs(p - g) / g)) if len(p) else float("nan")


def rmse(pred, gt) -> float:
    p, g = _valid(pred, gt)
    return float(np.sqrt(np.mean((p - g) ** 2))) if len(p) else float("nan")


def depth_report(pred, gt) -> dict:
    p, g = _valid(pred, gt)
    return {"delta1": delta1(pred, gt), "absrel": absrel(pred, gt), "rmse": rmse(pred, gt), "n": int(len(p))}


def epe(pred_xy, gt_xy) -> dict:
    d = np.linalg.norm(np.asarray(pred_xy, float) - np.asarray(gt_xy, float), axis=-1)
    d = d[np.isfinite(d)]
    return {"mean": float(d.mean()) if len(d) else float("nan"),
            "median": float(np.median(d)) if len(d) else float("nan"), "n": int(len(d))}
