"""Answers to object questions from dense geometry: region -> 3D points -> robust extents -> answers.

Everything is measured in a gravity-aligned viewer frame (right, up, forward) expressed in camera
coordinates: "up" is the camera's -y axis ("camera") or the normal of a floor plane fitted to the depth map
("floor-plane"); forward is the optical axis made horizontal, right = forward x up. The same quantities
(centre, extents, nearest point) are computed for a region's back-projected pixels here and for an
object's true shape by the simulator, and one function turns them into an answer for every
SpatialRGPT-Bench category:

- left/right: centre along right; above/below: centre along up; behind/front: nearest point along forward
  (as SpatialRGPT compares the clouds' minimum z); big/small: box volume; tall/short: extent along up;
  wide/thin: extent along right;
- distance: between centres; horizontal: in the floor plane; vertical: along up;
- width/height: extents along right/up; direction: clock hour of B seen from A, 12 = forward, 3 = right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from densify.io.cameras import Camera
from densify.objects.questions import CATEGORIES, Category, Region


@dataclass(frozen=True)
class ViewerFrame:
    right: np.ndarray
    up: np.ndarray
    forward: np.ndarray
    source: str
    """camera | floor-plane | given"""

    def coords(self, P: np.ndarray) -> np.ndarray:
        """Nx3 camera points -> Nx3 (right, up, forward) coordinates."""
        return np.asarray(P, float) @ np.stack([self.right, self.up, self.forward], 1)


def frame_from_up(up, source: str) -> ViewerFrame:
    u = np.asarray(up, float)
    u = u / np.linalg.norm(u)
    f = np.array([0.0, 0.0, 1.0]) - u[2] * u
    if np.linalg.norm(f) < 1e-6:  # looking straight down or up: any horizontal forward will do
        f = np.array([0.0, 1.0, 0.0]) - u[1] * u
    f /= np.linalg.norm(f)
    r = np.cross(f, u)
    return ViewerFrame(r, u, f, source)


def camera_frame() -> ViewerFrame:
    return frame_from_up((0.0, -1.0, 0.0), "camera")


def backproject_pixels(depth: np.ndarray, camera: Camera, mask: np.ndarray) -> np.ndarray:
    """Camera-frame points of the masked pixels with a valid depth."""
    ys, xs = np.nonzero(mask & np.isfinite(depth) & (depth > 0))
    z = depth[ys, xs].astype(float)
    return np.stack([(xs - camera.cx) / camera.fx * z, (ys - camera.cy) / camera.fy * z, z], 1)


def estimate_floor_frame(depth: np.ndarray, camera: Camera, *, rng=None, iters: int = 300,
                         tol_m: float = 0.03, max_tilt_deg: float = 35.0, min_share: float = 0.05) -> ViewerFrame:
    """Up = the normal of the floor: the plane below the camera, within max_tilt_deg of level, with the most
    points within tol_m (RANSAC over the lower half of the image). Falls back to the camera's axes when no
    such plane holds min_share of the points."""
    rng = rng if rng is not None else np.random.default_rng(0)
    h, w = depth.shape
    step = max(1, int(math.sqrt(h * w / 20000)))
    sub = np.zeros_like(depth, dtype=bool)
    sub[h // 2::step, ::step] = True
    P = backproject_pixels(depth, camera, sub)
    if len(P) < 50:
        return camera_frame()
    cam_up = np.array([0.0, -1.0, 0.0])
    cos_max = math.cos(math.radians(max_tilt_deg))
    best, best_n = None, 0
    for _ in range(iters):
        a, b, c = P[rng.choice(len(P), 3, replace=False)]
        n = np.cross(b - a, c - a)
        nn = np.linalg.norm(n)
        if nn < 1e-9:
            continue
        n /= nn
        if n @ cam_up < 0:
            n = -n
        if n @ cam_up < cos_max:
            continue
        d = -(n @ a)          # plane n.x + d = 0; camera height above it = d
        if d < 0.2:           # the floor is below the camera
            continue
        cnt = int(np.sum(np.abs(P @ n + d) < tol_m))
        if cnt > best_n:
            best, best_n = (n, d), cnt
    if best is None or best_n < min_share * len(P):
        return camera_frame()
    n, d = best
    inl = P[np.abs(P @ n + d) < tol_m]
    # Least-squares refit on the inliers (the smallest principal axis).
    c = inl.mean(0)
    _, _, vt = np.linalg.svd(inl - c, full_matrices=False)
    n2 = vt[2] if vt[2] @ cam_up > 0 else -vt[2]
    return frame_from_up(n2, "floor-plane")


@dataclass
class RegionGeometry:
    """A region's measured shape in the viewer frame (metres)."""

    center: np.ndarray
    """(right, up, forward) of the centre of its robust extent box."""
    extent: np.ndarray
    """extents along right, up, forward."""
    near: float
    """nearest point along forward."""
    n_points: int = 0
    dropped: int = 0

    def to_dict(self) -> dict:
        return {"center": [round(float(v), 4) for v in self.center],
                "extent": [round(float(v), 4) for v in self.extent], "near": round(float(self.near), 4),
                "points": self.n_points, "outliers_dropped": self.dropped}


def geometry_of(coords: np.ndarray, *, robust: bool = True, pct: float = 1.0, mad_k: float = 3.5) -> RegionGeometry:
    """Viewer-frame coordinates -> centre, extents and nearest point. robust: drop points further than
    mad_k robust standard deviations from the median on any axis, then take the pct..100-pct percentiles."""
    X = np.asarray(coords, float).reshape(-1, 3)
    n = len(X)
    if n == 0:
        raise ValueError("region has no 3D points (no valid depth inside it)")
    dropped = 0
    if robust and n >= 10:
        med = np.median(X, 0)
        mad = 1.4826 * np.median(np.abs(X - med), 0) + 0.01
        keep = np.all(np.abs(X - med) <= mad_k * mad, axis=1)
        if keep.sum() >= max(5, n // 4):
            dropped = int(n - keep.sum())
            X = X[keep]
        lo, hi = np.percentile(X, pct, 0), np.percentile(X, 100 - pct, 0)
    else:
        lo, hi = X.min(0), X.max(0)
    return RegionGeometry((lo + hi) / 2, hi - lo, float(lo[2]), n, dropped)


def box_foreground(depth: np.ndarray, box, *, log_tol: float = 0.35) -> np.ndarray:
    """Mask of a box's pixels that belong to its main object: depth within log_tol (in log space) of the
    median depth of the box's central half (a box holds background too)."""
    h, w = depth.shape
    x1, y1, x2, y2 = box
    xa, xb = max(0, int(math.floor(x1))), min(w, int(math.ceil(x2)))
    ya, yb = max(0, int(math.floor(y1))), min(h, int(math.ceil(y2)))
    m = np.zeros((h, w), bool)
    m[ya:yb, xa:xb] = True
    valid = np.isfinite(depth) & (depth > 0)
    cx0, cx1 = xa + (xb - xa) // 4, xb - (xb - xa) // 4
    cy0, cy1 = ya + (yb - ya) // 4, yb - (yb - ya) // 4
    core = depth[cy0:max(cy1, cy0 + 1), cx0:max(cx1, cx0 + 1)]
    core = core[np.isfinite(core) & (core > 0)]
    if core.size == 0:
        return m & valid
    d0 = float(np.median(core))
    with np.errstate(divide="ignore", invalid="ignore"):
        near = np.abs(np.log(np.where(valid, depth, np.nan) / d0)) < log_tol
    return m & valid & near


def region_geometry(depth: np.ndarray, camera: Camera, region: Region, frame: ViewerFrame) -> RegionGeometry:
    """A region (box, or its mask when given) of a depth map in the camera's pixels -> its geometry."""
    if region.mask is not None:
        x1, y1, x2, y2 = region.box
        box = np.zeros(depth.shape, bool)
        box[max(0, int(y1)):int(math.ceil(y2)), max(0, int(x1)):int(math.ceil(x2))] = True
        mask = np.asarray(region.mask, bool) & (box if box.any() else True)
    else:
        mask = box_foreground(depth, region.box)
    P = backproject_pixels(depth, camera, mask)
    if len(P) == 0:
        raise ValueError(f"{region.name}: no valid depth inside the region; check the box or the depth map")
    return geometry_of(frame.coords(P))


def quantity(g: RegionGeometry, name: str) -> float:
    if name == "x":
        return float(g.center[0])
    if name == "up":
        return float(g.center[1])
    if name == "near":
        return float(g.near)
    if name == "width":
        return float(g.extent[0])
    if name == "height":
        return float(g.extent[1])
    if name == "volume":
        return float(np.prod(np.maximum(g.extent, 1e-3)))
    raise KeyError(name)


def clock_hour(a: RegionGeometry, b: RegionGeometry) -> int:
    """Where B is seen from A, as a clock hour: 12 straight ahead (forward), 3 to the right."""
    d = b.center - a.center
    ang = math.degrees(math.atan2(d[0], d[2])) % 360.0
    h = int(round(ang / 30.0)) % 12
    return 12 if h == 0 else h


def answer(category: str | Category, geoms: list[RegionGeometry]):
    """The answer to one category from the regions' geometry: bool (predicate), region index (choice),
    metres (metric) or clock hour (direction)."""
    cat = CATEGORIES[category] if isinstance(category, str) else category
    if len(geoms) < cat.regions:
        raise ValueError(f"{cat.name} needs {cat.regions} region(s), got {len(geoms)}")
    if cat.kind == "predicate":
        return cat.sign * (quantity(geoms[0], cat.quantity) - quantity(geoms[1], cat.quantity)) > 0
    if cat.kind == "choice":
        qa, qb = (cat.sign * quantity(g, cat.quantity) for g in geoms[:2])
        return 0 if qa > qb else 1
    if cat.kind == "clock":
        return clock_hour(geoms[0], geoms[1])
    if cat.quantity in ("width", "height"):
        return quantity(geoms[0], cat.quantity)
    d = geoms[1].center - geoms[0].center
    if cat.quantity == "distance":
        return float(np.linalg.norm(d))
    if cat.quantity == "horizontal_distance":
        return float(math.hypot(d[0], d[2]))
    if cat.quantity == "vertical_distance":
        return float(abs(d[1]))
    raise KeyError(cat.quantity)


def margin(category: str | Category, geoms: list[RegionGeometry]) -> float:
    """How clear a qualitative answer is: |difference| / larger magnitude of the compared quantity (0..)."""
    cat = CATEGORIES[category] if isinstance(category, str) else category
    if cat.kind not in ("predicate", "choice"):
        return float("inf")
    qa, qb = quantity(geoms[0], cat.quantity), quantity(geoms[1], cat.quantity)
    if cat.quantity in ("x", "up", "near"):
        return abs(qa - qb)  # positions: metres apart
    return abs(qa - qb) / max(abs(qa), abs(qb), 1e-6)


def agree(category: str | Category, a, b, *, rel_tol: float = 0.25) -> bool | None:
    """Whether two answers to the same question agree (None when either is missing): equal for
    predicates and choices, within rel_tol of each other for lengths, within one hour for directions."""
    cat = CATEGORIES[category] if isinstance(category, str) else category
    if a is None or b is None:
        return None
    if cat.kind in ("predicate", "choice"):
        return bool(a == b)
    if cat.kind == "clock":
        d = abs(int(a) - int(b)) % 12
        return min(d, 12 - d) <= 1
    hi = max(abs(a), abs(b))
    return hi == 0 or abs(a - b) <= rel_tol * hi
