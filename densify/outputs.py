"""Outputs: every file is written to a temporary name and renamed, so a crash never leaves half a file."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; rename it into place when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def write_jsonl(path, records) -> Path:
    return write_text(path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in records))


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def write_npy(path, array: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)
    return Path(path)


def write_png(path, image: np.ndarray) -> Path:
    """uint8 RGB/gray or uint16 gray."""
    img = image[..., ::-1] if image.ndim == 3 else image
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img))
    if not ok:
        raise OSError(f"could not encode {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())
    return Path(path)


def depth_png16(depth: np.ndarray) -> np.ndarray:
    """Metres -> uint16 millimetres, 0 = no depth (values beyond 65.535 m clipped)."""
    d = np.nan_to_num(np.asarray(depth, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(np.round(d * 1000.0), 0, 65535).astype(np.uint16)


def depth_preview(depth: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """A colourised RGB preview (turbo, near = warm), black where no depth."""
    d = np.asarray(depth, np.float64)
    ok = np.isfinite(d) & (d > 0)
    if not ok.any():
        return np.zeros(d.shape + (3,), np.uint8)
    inv = np.zeros_like(d)
    inv[ok] = 1.0 / d[ok]
    lo_i = 1.0 / hi if hi else np.percentile(inv[ok], 2)
    hi_i = 1.0 / lo if lo else np.percentile(inv[ok], 98)
    n = np.clip((inv - lo_i) / max(hi_i - lo_i, 1e-9), 0, 1)
    bgr = cv2.applyColorMap((n * 255).astype(np.uint8), cv2.COLORMAP_TURBO)
    bgr[~ok] = 0
    return bgr[..., ::-1].copy()


def write_ply(path, cloud) -> Path:
    import open3d as o3d

    with atomic_path(path) as tmp:
        if not o3d.io.write_point_cloud(str(tmp), cloud, write_ascii=False):
            raise OSError(f"Open3D could not write {path}")
    return Path(path)


def write_mesh(path, mesh) -> Path:
    import open3d as o3d

    with atomic_path(path) as tmp:
        if not o3d.io.write_triangle_mesh(str(tmp), mesh, write_ascii=False):
            raise OSError(f"Open3D could not write {path}")
    return Path(path)
