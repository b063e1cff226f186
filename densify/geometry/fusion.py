"""TSDF fusion of posed depth maps into one mesh and point cloud (Open3D tensor VoxelBlockGrid).

Frames are loaded one at a time (depth from the written depth.npy), so memory stays flat with the
number of images. Open3D pitfalls handled here: depth is float32 metres (depth_scale 1.0; 1000 for
uint16 millimetres), depth_trunc drops far samples, NaN depth becomes 0 (no sample), intrinsics and the
extrinsic are Float64 tensors, and integrate() wants the extrinsic as world-to-camera. The legacy
ScalableTSDFVolume of the installed Open3D (0.20, CPU) extracts empty meshes, hence the tensor API;
its extraction keeps voxels observed `weight_threshold` times or more.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from densify.io.cameras import Camera

log = logging.getLogger(__name__)

__all__ = ["FusionConfig", "FusionFrame", "tsdf_fuse"]


class FusionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    voxel_length: float = Field(0.03, gt=0, description="TSDF voxel size, metres (VLM depth noise, not the "
                                "voxel, limits the accuracy: 2 cm voxels fuse 3x slower for the same result)")
    sdf_trunc: float = Field(0.12, gt=0, description="truncation distance of the signed distance, metres "
                             "(a few voxels; larger smooths noisy depth more)")
    depth_trunc: float = Field(8.0, gt=0, description="depth beyond this many metres is not fused")
    depth_scale: float = Field(1.0, gt=0, description="depth units per metre: 1.0 for float metres, "
                               "1000 for uint16 millimetres")
    min_confidence: float = Field(0.0, ge=0, le=1, description="drop depth pixels whose densification "
                                  "confidence (confidence.npy) is below this")
    min_depth: float = Field(0.05, ge=0, description="depth below this (metres) is treated as missing")
    weight_threshold: float = Field(1.0, ge=0, description="extract only voxels integrated at least this many "
                                    "times (higher: fewer noisy surfaces, less coverage)")
    block_count: int = Field(2000, ge=100, description="initial voxel-block capacity (16^3 voxels each)")
    scale_check: bool = Field(True, description="divide each view's depth by its relative scale, estimated from "
                              "the pairs' metric poses (densify.geometry.scale), before fusing: removes per-image "
                              "scale errors; the scene's common scale stays")


@dataclass
class FusionFrame:
    """One image to fuse; depth and colour are loaded only when it is integrated."""

    camera: Camera
    cam_to_world: np.ndarray
    load_depth: Callable[[], np.ndarray]
    """-> HxW depth (float metres, or integers in depth_scale units)."""
    load_rgb: Callable[[], np.ndarray]
    load_confidence: Callable[[], np.ndarray | None] | None = None


def tsdf_fuse(frames: Iterable[FusionFrame], cfg: FusionConfig | None = None):
    """-> (legacy TriangleMesh, legacy PointCloud, frames integrated) in world coordinates."""
    import open3d as o3d
    import open3d.core as o3c

    cfg = cfg or FusionConfig()
    dev = o3c.Device("CPU:0")
    vbg = o3d.t.geometry.VoxelBlockGrid(attr_names=("tsdf", "weight", "color"),
                                        attr_dtypes=(o3c.float32, o3c.float32, o3c.float32),
                                        attr_channels=(1, 1, 3), voxel_size=cfg.voxel_length, block_resolution=16,
                                        block_count=cfg.block_count, device=dev)
    mult = cfg.sdf_trunc / cfg.voxel_length
    n = 0
    for fr in frames:
        depth = np.asarray(fr.load_depth())
        rgb = np.asarray(fr.load_rgb())
        cam = fr.camera
        if depth.shape != rgb.shape[:2] or depth.shape != (cam.height, cam.width):
            raise ValueError(f"depth {depth.shape}, colour {rgb.shape[:2]} and camera {cam.width}x{cam.height} "
                             f"disagree")
        d = depth.astype(np.float32) / np.float32(cfg.depth_scale)
        bad = ~np.isfinite(d) | (d < cfg.min_depth)
        if cfg.min_confidence > 0 and fr.load_confidence is not None:
            conf = fr.load_confidence()
            if conf is not None:
                bad |= conf < cfg.min_confidence
        d[bad] = 0.0
        dimg = o3d.t.geometry.Image(o3c.Tensor(np.ascontiguousarray(d)))
        cimg = o3d.t.geometry.Image(o3c.Tensor(np.ascontiguousarray(rgb, dtype=np.float32) / 255.0))
        K = o3c.Tensor(cam.K, o3c.float64)
        extrinsic = o3c.Tensor(np.linalg.inv(np.asarray(fr.cam_to_world, np.float64)), o3c.float64)  # world->cam
        # Depth is already in metres here: depth_scale 1.0 whatever the input units were.
        blocks = vbg.compute_unique_block_coordinates(dimg, K, extrinsic, 1.0, cfg.depth_trunc, mult)
        vbg.integrate(blocks, dimg, cimg, K, K, extrinsic, 1.0, cfg.depth_trunc, mult)
        n += 1
        del depth, rgb, d, dimg, cimg
    if n == 0:
        return o3d.geometry.TriangleMesh(), o3d.geometry.PointCloud(), 0
    mesh = vbg.extract_triangle_mesh(weight_threshold=cfg.weight_threshold).to_legacy()
    cloud = vbg.extract_point_cloud(weight_threshold=cfg.weight_threshold).to_legacy()
    mesh.compute_vertex_normals()
    log.info("fused %d frames: mesh %d vertices, cloud %d points", n, len(mesh.vertices), len(cloud.points))
    return mesh, cloud, n

