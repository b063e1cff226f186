"""Query plans: which pixels to ask about, in original-image pixels.

Pixels that map to the same prompt coordinates would get the same prompt, so they are asked once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from densify.io.cameras import PixelMap


class PlanError(ValueError):
    pass


@dataclass
class QueryPlan:
    pixels: np.ndarray
    """Nx2 integer pixel positions (x, y) in the original image."""
    prompt_xy: np.ndarray | None
    """Nx2 integer prompt coordinates, or None for profiles that mark the pixel instead."""

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


def plan_queries(points: np.ndarray, pixel_map: PixelMap, *, dedupe: bool = True) -> QueryPlan:
    """Attach prompt coordinates to pixels and drop pixels whose prompt would repeat."""
    pts = np.asarray(points).reshape(-1, 2)
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
