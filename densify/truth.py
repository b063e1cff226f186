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

from densify.cameras import Camera, read_sidecar, sidecar_path
from densify.geometry.clouds import backproject
from densify.images import ImageSource

__all__ = ["TruthProvider", "SceneTruth", "SidecarTruth", "reproject_matches", "saved_depth"]


def saved_depth(src: ImageSource) -> np.ndarray | None:
    """Dense ground truth saved beside an image (<stem>.depth.npy, as Scene.save writes it), if any."""
    p = Path(src.extra.get("depth_path") or Path(src.path).with_suffix(".depth.npy"))
    return np.load(p).astype(np.float32) if p.is_file() else None


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
    pc, pix = backproject(depth_i, cam_i)
    T = np.linalg.inv(c2w_j) @ c2w_i
    pj = pc @ T[:3, :3].T + T[:3, 3]
    out = np.full((h, w, 2), np.nan, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = cam_j.fx * pj[:, 0] / pj[:, 2] + cam_j.cx
        v = cam_j.fy * pj[:, 1] / pj[:, 2] + cam_j.cy
    ok = (pj[:, 2] > 1e-6) & (u >= 0) & (u <= cam_j.width - 1) & (v >= 0) & (v <= cam_j.height - 1)
    idx = np.flatnonzero(ok)
    dj = depth_j[np.round(v[idx]).astype(int), np.round(u[idx]).astype(int)]
    vis = idx[np.abs(dj - pj[idx, 2]) <= rtol * pj[idx, 2]]
    out[pix[vis, 1], pix[vis, 0]] = np.stack([u[vis], v[vis]], 1)
    return out


class SidecarTruth:
    """Truth from files beside the images (as Scene.save writes them); missing files give None."""

    def __init__(self, sources: list[ImageSource]):
        self.sources = sources

    def _side(self, i: int) -> dict | None:
        side = sidecar_path(Path(self.sources[i].path))
        try:
            return json.loads(side.read_text()) if side is not None else None
        except (OSError, json.JSONDecodeError):
            return None

    def _pose(self, i: int) -> np.ndarray | None:
        side = self._side(i)
        if side is None or "cam_to_world" not in side:
            return None
        return np.asarray(side["cam_to_world"], float)

    def _depth_cam(self, i: int):
        side = sidecar_path(Path(self.sources[i].path))
        d = saved_depth(self.sources[i])
        if side is None or d is None:
            return None
        h, w = d.shape
        return d, read_sidecar(side, w, h)

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
