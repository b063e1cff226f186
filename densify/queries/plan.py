"""Query plans: which pixels to ask about, in original-image pixels.

Pixels that map to the same prompt coordinates (or, for a marker profile, the same marked pixel) would get
the same prompt, so they are asked once. A marker profile's pixel too close to a border to be marked is
not asked: the plan lists it as unmarkable, and its answer record says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from densify.config.profiles import Marker
from densify.io.cameras import PixelMap


class PlanError(ValueError):
    pass


@dataclass
class QueryPlan:
    pixels: np.ndarray
    """Nx2 integer pixel positions (x, y) in the original image."""
    prompt_xy: np.ndarray | None
    """Nx2 integer prompt coordinates, or None for profiles that mark the pixel instead."""
    marked: np.ndarray | None = None
    """Nx2 integer preprocessed pixels the marker points at (marker profiles)."""
    unmarkable: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    """Mx2 original pixels not asked: too close to a border of the preprocessed image to be marked."""

    def __len__(self) -> int:
        return len(self.pixels)


def grid_points(width: int, height: int, *, stride: float | None = None,
                count: tuple[int, int] | int | None = None) -> np.ndarray:
    """A regular grid of pixel indices, centred in its cells.

    stride: one point every `stride` pixels; count: (nx, ny) points, or a total (aspect kept).
    """
    if (stride is None) == (count is None):
        raise PlanError("give exactly one of stride and count")
    if stride is not None:
        if stride <= 0:
            raise PlanError(f"stride must be positive, got {stride}")
        nx, ny = max(1, int(round(width / stride))), max(1, int(round(height / stride)))
    elif isinstance(count, (tuple, list)):
        nx, ny = int(count[0]), int(count[1])
    else:
        total = int(count)
        nx = max(1, int(round(np.sqrt(total * width / height))))
        ny = max(1, int(round(total / nx)))
    if nx <= 0 or ny <= 0:
        raise PlanError(f"grid needs positive counts, got {nx}x{ny}")
    xs = np.floor((np.arange(nx) + 0.5) * width / nx).astype(np.int64)
    ys = np.floor((np.arange(ny) + 0.5) * height / ny).astype(np.int64)
    gx, gy = np.meshgrid(np.clip(xs, 0, width - 1), np.clip(ys, 0, height - 1))
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def check_points(points: np.ndarray, width: int, height: int, source: str = "points") -> np.ndarray:
    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    bad = ~((pts[:, 0] >= 0) & (pts[:, 0] < width) & (pts[:, 1] >= 0) & (pts[:, 1] < height))
    if bad.any():
        first = pts[bad][0]
        raise PlanError(f"{source}: {int(bad.sum())} point(s) outside the {width}x{height} image, first "
                        f"({first[0]:g}, {first[1]:g}); pixels must satisfy 0 <= x < {width}, 0 <= y < {height}")
    return pts


def markable(pre_xy: np.ndarray, pre_size: tuple[int, int], marker: Marker) -> np.ndarray:
    """Which integer preprocessed pixels a marker can be drawn at whole (margin <= x < W - margin, ...)."""
    xy = np.asarray(pre_xy).reshape(-1, 2)
    m, (w, h) = marker.margin, pre_size
    return (xy[:, 0] >= m) & (xy[:, 0] < w - m) & (xy[:, 1] >= m) & (xy[:, 1] < h - m)


def plan_queries(points: np.ndarray, pixel_map: PixelMap, *, dedupe: bool = True,
                 marker: Marker | None = None) -> QueryPlan:
    """Attach prompt coordinates (or marked pixels) to pixels and drop pixels whose prompt would repeat.

    marker: the profile's marker; each pixel gets the preprocessed pixel it is marked at, and those that
    cannot be marked go to `unmarkable` instead of being asked."""
    pts = np.asarray(points).reshape(-1, 2)
    if marker is not None:
        marked = pixel_map.to_pixel(pts)
        ok = markable(marked, pixel_map.pre_size, marker)
        bad, pts, marked = pts[~ok], pts[ok], marked[ok]
        if dedupe and len(marked):
            _, keep = np.unique(marked, axis=0, return_index=True)
            keep = np.sort(keep)
            pts, marked = pts[keep], marked[keep]
        return QueryPlan(pts, None, marked, np.asarray(bad, float).reshape(-1, 2))
    if pixel_map.range_ is None:
        if dedupe:
            _, keep = np.unique(np.round(pts).astype(np.int64), axis=0, return_index=True)
            pts = pts[np.sort(keep)]
        return QueryPlan(pts, None)
    prompt = pixel_map.to_prompt_array(pts)
    if dedupe and len(prompt):
        _, keep = np.unique(prompt, axis=0, return_index=True)
        keep = np.sort(keep)
        pts, prompt = pts[keep], prompt[keep]
    return QueryPlan(pts, prompt)
