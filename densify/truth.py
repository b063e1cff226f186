"""Ground truth for the simulated engine's pair questions (correspondences, relative pose).

Pairs are named by image index (position in the input list). Two providers: `SceneTruth` wraps a
synthetic Scene (exact visibility by ray casting), `SidecarTruth` reads what Scene.save wrote beside each
image (<stem>.depth.npy and a JSON sidecar with intrinsics and cam_to_world) and decides visibility with a
depth test, so `densify reconstruct --engine simulated` works on a saved scene folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np

from densify.cameras import Camera
from densify.images import ImageSource

__all__ = ["TruthProvider", "SceneTruth", "SidecarTruth", "reproject_matches"]


class TruthProvider(Protocol):
    def matches(self, i: int, j: int) -> np.ndarray | None:
        """HxWx2 (image i's original size): image j original pixel of each pixel, NaN where not visible."""
        ...

    def relative_pose(self, i: int, j: int) -> np.ndarray | None:
        """4x4 with x_j = T @ x_i."""
        ...


class SceneTruth:
    def __init__(self, scene):
        self.scene = scene

    def matches(self, i, j):
        return self.scene.matches(i, j)

    def relative_pose(self, i, j):
        return self.scene.relative_pose(i, j)


def reproject_matches(depth_i: np.ndarray, cam_i: Camera, c2w_i: np.ndarray, depth_j: np.ndarray, cam_j: Camera,
                      c2w_j: np.ndarray, rtol: float = 0.02) -> np.ndarray:
    """Matches from depth and poses: pixel of i -> 3D -> j, kept where j's depth agrees (not occluded)."""
    h, w = depth_i.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    z = depth_i.astype(np.float64)
    pc = np.stack([(xs - cam_i.cx) / cam_i.fx * z, (ys - cam_i.cy) / cam_i.fy * z, z], -1).reshape(-1, 3)
    T = np.linalg.inv(c2w_j) @ c2w_i
    pj = pc @ T[:3, :3].T + T[:3, 3]
    out = np.full((h * w, 2), np.nan, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = cam_j.fx * pj[:, 0] / pj[:, 2] + cam_j.cx
        v = cam_j.fy * pj[:, 1] / pj[:, 2] + cam_j.cy
    ok = (z.ravel() > 0) & (pj[:, 2] > 1e-6) & (u >= 0) & (u <= cam_j.width - 1) & (v >= 0) & (v <= cam_j.height - 1)
    idx = np.flatnonzero(ok)
    dj = depth_j[np.round(v[idx]).astype(int), np.round(u[idx]).astype(int)]
    vis = idx[np.abs(dj - pj[idx, 2]) <= rtol * pj[idx, 2]]
    out[vis, 0], out[vis, 1] = u[vis], v[vis]
    return out.reshape(h, w, 2)


class SidecarTruth:
    """Truth from files beside the images (as Scene.save writes them); missing files give None."""

    def __init__(self, sources: list[ImageSource]):
        self.sources = sources

    def _side(self, i: int) -> dict | None:
        p = self.sources[i].path
        for cand in (p.with_suffix(".json"), p.with_name(p.name + ".json")):
            if cand.is_file():
                try:
                    return json.loads(cand.read_text())
                except (OSError, json.JSONDecodeError):
                    return None
        return None

    def _pose(self, i: int) -> np.ndarray | None:
        side = self._side(i)
        if side is None or "cam_to_world" not in side:
            return None
        return np.asarray(side["cam_to_world"], float)

    def _depth_cam(self, i: int):
        side = self._side(i)
        dp = Path(self.sources[i].path).with_suffix(".depth.npy")
        if side is None or not dp.is_file():
            return None
        d = np.load(dp).astype(np.float32)
        h, w = d.shape
        cam = Camera(float(side["fx"]), float(side["fy"]), float(side["cx"]), float(side["cy"]),
                     int(side.get("width", w)), int(side.get("height", h)))
        return d, cam

    def matches(self, i, j):
        a, b = self._depth_cam(i), self._depth_cam(j)
        pi, pj = self._pose(i), self._pose(j)
        if a is None or b is None or pi is None or pj is None:
            return None
        return reproject_matches(a[0], a[1], pi, b[0], b[1], pj)

    def relative_pose(self, i, j):
        pi, pj = self._pose(i), self._pose(j)
        if pi is None or pj is None:
            return None
        return np.linalg.inv(pj) @ pi
