"""Depth previews: the image beside its depth in colour, with a colour bar in metres.

Colours follow the docs figures (matplotlib's turbo on depth): near is blue, far is dark red; black where
there is no depth.
"""

from __future__ import annotations

import cv2
import numpy as np


def depth_range(depth: np.ndarray) -> tuple[float, float] | None:
    d = np.asarray(depth, np.float64)
    ok = np.isfinite(d) & (d > 0)
    if not ok.any():
        return None
    lo, hi = np.percentile(d[ok], [2, 98])
    return float(lo), float(max(hi, lo + 1e-3))


def colorize(depth: np.ndarray, lo: float, hi: float) -> np.ndarray:
    d = np.asarray(depth, np.float64)
    ok = np.isfinite(d) & (d > 0)
    n = np.clip((np.nan_to_num(d) - lo) / (hi - lo), 0, 1)
    bgr = cv2.applyColorMap((n * 255).astype(np.uint8), cv2.COLORMAP_TURBO)
    bgr[~ok] = 0
    return bgr[..., ::-1].copy()


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = (hi - lo) / max(n - 1, 1)
    mag = 10 ** np.floor(np.log10(step)) if step > 0 else 1.0
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= step), default=step)
    first = np.ceil(lo / step) * step
    return [float(v) for v in np.arange(first, hi + 1e-9, step)]


def colour_bar(height: int, lo: float, hi: float, width: int = 70) -> np.ndarray:
    """A vertical bar (near at the top) with tick labels in metres."""
    bar = np.full((height, width, 3), 255, np.uint8)
    ramp = np.linspace(lo, hi, height)[:, None].repeat(16, 1)
    bar[:, 4:20] = colorize(ramp, lo, hi)
    scale = max(0.35, min(0.5, height / 960))
    for v in _ticks(lo, hi):
        y = int(round((v - lo) / (hi - lo) * (height - 1)))
        cv2.line(bar, (20, y), (25, y), (0, 0, 0), 1)
        label = f"{v:.1f} m" if hi - lo >= 1 else f"{v:.2f} m"
        ty = min(max(y + 4, 10), height - 3)
        cv2.putText(bar, label, (27, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return bar


def depth_preview(rgb: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """HxW(2W+bar)x3 uint8: the image, its depth in colour, and the colour bar."""
    h = depth.shape[0]
    rng = depth_range(depth)
    if rng is None:
        return np.concatenate([rgb, np.zeros_like(rgb)], axis=1)
    lo, hi = rng
    return np.concatenate([rgb, colorize(depth, lo, hi), colour_bar(h, lo, hi)], axis=1)
