"""Ground truth for the simulated engine, looked up by image (`ImageRef`: id, file, manifest).

Only the simulated engine reads truth: nothing on the real data path (prompts, matching, poses, stages,
commands) carries it. A provider answers what it knows about an image in its ORIGINAL pixels, or None:

* `FileTruth` (the simulated engine's default): files beside the image, as `densify synth` / `Scene.save`
  write them (`<stem>.depth.npy`, `<stem>.objects.npy`, `<stem>.json` with intrinsics and `cam_to_world`,
  `objects.json` in the folder), and the image's record in its JSONL/Parquet manifest (`depth_path`, or
  DepthLM labels `pixel_coords` + `depth`). It works inside Ray actors (paths only).
* `SceneTruth`: a synthetic `Scene` in memory, images named by id (tests, demos, benchmarks).
* `ArrayTruth`: plain arrays by id (tests).

Pair truth (matches, relative pose) defaults to what depth, intrinsics and poses imply (`reproject_matches`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from densify.engines.base import ImageRef
from densify.geometry.clouds import backproject
from densify.io.cameras import Camera, read_sidecar, sidecar_path

__all__ = ["Truth", "FileTruth", "SceneTruth", "ArrayTruth", "ConstantTruth", "GroundTruth", "reproject_matches"]


@dataclass
class GroundTruth:
    """What the simulated engine knows about one prompt image, in that image's preprocessed pixel frame
    (built from a provider, cached per image)."""

    depth: np.ndarray | None = None
    """HxW metric depth (0 or NaN = unknown)."""
    label_xy: np.ndarray | None = None
    """Nx2 preprocessed pixel positions of sparse depth labels (with `label_depth`)."""
    label_depth: np.ndarray | None = None
    object_ids: np.ndarray | None = None
    """HxW int: the object each pixel sees (-1 none), for per-object errors and object questions."""
    objects: list | None = None
    """The objects' metadata ({"id", "kind", "center", "size", "yaw"} in world metres), for object questions."""
    cam_to_world: np.ndarray | None = None
    """4x4 camera-to-world pose (world +y up), for object questions."""


class Truth:
    """A truth provider: every lookup may return None (unknown)."""

    def depth(self, ref: ImageRef) -> np.ndarray | None:
        """HxW metric z-depth in the image's original pixels (0 or NaN where unknown)."""
        return None

    def labels(self, ref: ImageRef) -> tuple[np.ndarray, np.ndarray] | None:
        """Sparse labels: (Nx2 original pixels, N metres)."""
        return None

    def camera(self, ref: ImageRef) -> Camera | None:
        return None

    def cam_to_world(self, ref: ImageRef) -> np.ndarray | None:
        return None

    def object_ids(self, ref: ImageRef) -> np.ndarray | None:
        """HxW id of the object each pixel sees (-1: none), as the synthetic scenes write it."""
        return None

    def objects(self, ref: ImageRef) -> list[dict] | None:
        """The scene's objects (id, kind, centre, size, yaw; world frame)."""
        return None

    def matches(self, ref1: ImageRef, ref2: ImageRef) -> np.ndarray | None:
        """HxWx2 (image 1's original size): each pixel's position in image 2's original pixels, NaN where
        not visible there."""
        d1, d2 = self.depth(ref1), self.depth(ref2)
        c1, c2 = self.camera(ref1), self.camera(ref2)
        p1, p2 = self.cam_to_world(ref1), self.cam_to_world(ref2)
        if any(v is None for v in (d1, d2, c1, c2, p1, p2)):
            return None
        return reproject_matches(d1, c1, p1, d2, c2, p2)

    def relative_pose(self, ref1: ImageRef, ref2: ImageRef) -> np.ndarray | None:
        """4x4 T with x_2 = T @ x_1 (camera 1 frame -> camera 2 frame)."""
        p1, p2 = self.cam_to_world(ref1), self.cam_to_world(ref2)
        if p1 is None or p2 is None:
            return None
        return np.linalg.inv(p2) @ p1


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


class FileTruth(Truth):
    """Truth from files beside each image and from its manifest record (see the module docstring)."""

    def _stem(self, ref: ImageRef) -> Path:
        return Path(ref.path)

    def _record(self, ref: ImageRef) -> dict:
        if not ref.manifest or not ref.path:
            return {}
        return _manifest_index(str(Path(ref.manifest).resolve())).get(str(Path(ref.path).resolve()), {})

    def depth(self, ref):
        rec = self._record(ref)
        if not rec.get("depth_path") and not ref.path:
            return None
        p = Path(rec["depth_path"]) if rec.get("depth_path") else Path(ref.path).with_suffix(".depth.npy")
        return _load_npy(str(p), np.float32)

    def labels(self, ref):
        rec = self._record(ref)
        if rec.get("pixel_coords") is None or rec.get("depth") is None:
            return None
        return np.asarray(rec["pixel_coords"], float).reshape(-1, 2), np.asarray(rec["depth"], float)

    def _side(self, ref) -> dict | None:
        side = sidecar_path(Path(ref.path)) if ref.path else None
        if side is None:
            return None
        try:
            return json.loads(side.read_text())
        except (OSError, ValueError):
            return None

    def camera(self, ref):
        side = sidecar_path(Path(ref.path)) if ref.path else None
        d = self.depth(ref)
        if side is None or d is None:
            return None
        h, w = d.shape
        return read_sidecar(side, w, h)

    def cam_to_world(self, ref):
        side = self._side(ref)
        if side is None or "cam_to_world" not in side:
            return None
        return np.asarray(side["cam_to_world"], float)

    def object_ids(self, ref):
        return _load_npy(str(Path(ref.path).with_suffix(".objects.npy")), np.int16) if ref.path else None

    def objects(self, ref):
        if not ref.path:
            return None
        p = Path(ref.path).parent / "objects.json"
        try:
            return json.loads(p.read_text()) if p.is_file() else None
        except (OSError, ValueError):
            return None


@functools.lru_cache(maxsize=8)
def _load_npy(path: str, dtype) -> np.ndarray | None:
    p = Path(path)
    if not p.is_file():
        return None
    return np.load(p).astype(dtype)


@functools.lru_cache(maxsize=8)
def _manifest_index(manifest: str) -> dict[str, dict]:
    """Resolved image path -> its manifest record's truth fields (labels, depth_path)."""
    from densify.io.images import iter_sources

    out = {}
    for src in iter_sources([manifest]):
        rec = {}
        if src.labels is not None:
            rec["pixel_coords"], rec["depth"] = src.labels["pixels"], src.labels["depth"]
        if src.extra.get("depth_path"):
            rec["depth_path"] = src.extra["depth_path"]
        if rec:
            out[str(Path(src.path).resolve())] = rec
    return out


class SceneTruth(Truth):
    """A synthetic scene in memory; `ids` maps image ids to view indices (default view_000, view_001, ...)."""

    def __init__(self, scene, ids: dict[str, int] | None = None):
        self.scene = scene
        self.ids = ids if ids is not None else {f"view_{k:03d}": k for k in range(len(scene.views))}

    def _view(self, ref):
        k = self.ids.get(ref.id)
        return None if k is None else self.scene.views[k]

    def depth(self, ref):
        v = self._view(ref)
        return None if v is None else v.depth

    def camera(self, ref):
        v = self._view(ref)
        return None if v is None else v.camera

    def cam_to_world(self, ref):
        v = self._view(ref)
        return None if v is None else v.cam_to_world

    def object_ids(self, ref):
        v = self._view(ref)
        return None if v is None else v.object_ids

    def objects(self, ref):
        return [o.to_dict() for o in self.scene.objects] if self._view(ref) is not None else None

    def matches(self, ref1, ref2):
        i, j = self.ids.get(ref1.id), self.ids.get(ref2.id)
        return None if i is None or j is None else self.scene.matches(i, j)


class ArrayTruth(Truth):
    """Arrays by image id: depth maps, labels, cameras, poses (tests)."""

    def __init__(self, depth: dict | None = None, labels: dict | None = None, cameras: dict | None = None,
                 poses: dict | None = None):
        self._depth, self._labels = depth or {}, labels or {}
        self._cameras, self._poses = cameras or {}, poses or {}

    def depth(self, ref):
        return self._depth.get(ref.id)

    def labels(self, ref):
        return self._labels.get(ref.id)

    def camera(self, ref):
        return self._cameras.get(ref.id)

    def cam_to_world(self, ref):
        return self._poses.get(ref.id)


class ConstantTruth(Truth):
    """Every image is a wall at `depth` metres (benchmarks that only need answers to exist)."""

    def __init__(self, depth: float = 3.0):
        self.value = float(depth)

    def depth(self, ref):
        w, h = ref.size
        return np.full((h, w), self.value, np.float32)
