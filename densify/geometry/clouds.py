"""Depth maps -> coloured point clouds in the camera frame (x right, y down, z forward)."""

from __future__ import annotations

import numpy as np

from densify.io.cameras import Camera


def require_open3d() -> None:
    """Fail at once, with the fix, where Open3D is missing (GPU hosts often lack it): point-cloud outputs,
    pose graphs and fusion need it, and finding out after the engine has answered loses that work."""
    try:
        import open3d  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"point clouds (cloud.ply), pose graphs and fusion need Open3D, which is missing here "
                          f"({exc}): pip install open3d (Debian also needs libusb-1.0-0); `densify depth` and "
                          f"`label` run without it given --set outputs.ply=false") from None


def unproject(xy: np.ndarray, z: np.ndarray, camera: Camera) -> np.ndarray:
    """Pixels (Nx2) at depths z (N) -> Nx3 camera-frame points (pixel (x, y) is the ray through (x, y))."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    z = np.asarray(z, np.float64).reshape(-1)
    return np.stack([(xy[:, 0] - camera.cx) / camera.fx * z, (xy[:, 1] - camera.cy) / camera.fy * z, z], 1)


def depth_at_pixels(depth: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Nearest depth-map value at each (x, y), positions clamped to the image."""
    h, w = depth.shape
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    xi = np.clip(np.round(xy[:, 0]).astype(int), 0, w - 1)
    yi = np.clip(np.round(xy[:, 1]).astype(int), 0, h - 1)
    return depth[yi, xi].astype(np.float64)


def backproject(depth: np.ndarray, camera: Camera, mask: np.ndarray | None = None,
                stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Pixels with depth -> (Nx3 points in metres, Nx2 pixel indices (x, y)). Pixel (x, y) is the ray
    through (x, y), the same convention as the prompts."""
    h, w = depth.shape
    ys, xs = np.mgrid[0:h:stride, 0:w:stride]
    z = depth[::stride, ::stride]
    ok = np.isfinite(z) & (z > 0)
    if mask is not None:
        ok &= mask[::stride, ::stride]
    pix = np.stack([xs[ok], ys[ok]], 1)
    return unproject(pix, z[ok], camera), pix


def depth_to_cloud(depth: np.ndarray, rgb: np.ndarray, camera: Camera, *, mask: np.ndarray | None = None,
                   stride: int = 1, cam_to_world: np.ndarray | None = None):
    """An Open3D point cloud (coloured) from a depth map; in world coordinates when a pose is given."""
    import open3d as o3d

    pts, pix = backproject(depth, camera, mask, stride)
    if cam_to_world is not None:
        T = np.asarray(cam_to_world, float)
        pts = pts @ T[:3, :3].T + T[:3, 3]
    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
    pc.colors = o3d.utility.Vector3dVector(rgb[pix[:, 1], pix[:, 0]].astype(np.float64) / 255.0)
    return pc
