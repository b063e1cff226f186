"""Scene exports: multi-view tracks from pairwise matches, a COLMAP model (text, and binary through
pycolmap), nerfstudio transforms.json, and a glTF binary (.glb: the fused mesh or cloud with a frustum per
camera, through trimesh) that any 3D viewer opens.

Tracks: each match joins two (image, keypoint) nodes, keypoints quantised to whole pixels; union-find
chains i -> i+1 -> i+2 into tracks. When a track holds two different keypoints of one image, that
image's observations are dropped from it. Each track is triangulated from all its views with the known
poses (linear DLT), or placed from the depth map of its first view when the views are too close to
triangulate, and kept only if it reprojects within `max_reproj_px` in every view.

Pixel convention: densify (like OpenCV) puts pixel (0, 0)'s centre at 0.0; COLMAP and nerfstudio put it
at 0.5. Exports shift the principal point and the 2D points by +0.5 (PIXEL_CENTER), so the given
intrinsics mean the same rays in every tool.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from densify.geometry.clouds import depth_at_pixels, unproject
from densify.io import outputs
from densify.io.cameras import Camera

log = logging.getLogger(__name__)

__all__ = ["ExportConfig", "Track", "TrackSet", "build_tracks", "triangulate_tracks", "write_colmap_text",
           "write_colmap_binary", "read_colmap_check", "write_nerfstudio", "write_glb", "camera_frustum",
           "rotmat_to_qvec", "OPENCV_TO_OPENGL"]

OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])
"""Right-multiply a camera-to-world (OpenCV axes: y down, z forward) to get OpenGL axes (y up, z back)."""


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    colmap: bool = Field(True, description="write a COLMAP text model (colmap/) and read it back with pycolmap")
    colmap_binary: bool = Field(True, description="also the same model in COLMAP's binary format (colmap/bin/, "
                                "written by pycolmap from the text model)")
    glb: bool = Field(True, description="scene.glb: the fused mesh (or cloud) with a frustum per camera, y up "
                      "(glTF binary, written with trimesh)")
    nerfstudio: bool = Field(True, description="write transforms.json (nerfstudio, OpenGL camera axes)")
    min_track_length: int = Field(2, ge=2, description="views a track needs to become a 3D point")
    max_reproj_px: float = Field(4.0, gt=0, description="drop tracks reprojecting worse than this in any view")
    min_triangulation_deg: float = Field(1.0, ge=0, description="smaller ray angles: take the point from depth")
    use_depth_fallback: bool = Field(True, description="place poorly triangulated tracks from the depth map")


@dataclass
class Track:
    obs: list[tuple[int, float, float]]
    """(image index, x, y) observations, one per image."""
    xyz: np.ndarray | None = None
    error: float = float("nan")
    """Mean reprojection error, pixels."""
    rgb: tuple[int, int, int] = (128, 128, 128)
    source: str = ""


@dataclass
class TrackSet:
    tracks: list[Track]
    inconsistent: int = 0
    stats: dict = field(default_factory=dict)


def build_tracks(matches, min_length: int = 2) -> TrackSet:
    """Union-find over (image, quantised keypoint) nodes.

    matches: iterable of (i, j, xy_i Nx2, xy_j Nx2) with valid matches only (original pixels).
    """
    parent: dict = {}
    pos: dict = {}

    def find(a):
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def node(img, xy):
        key = (img, int(round(xy[0])), int(round(xy[1])))
        if key not in parent:
            parent[key] = key
            pos[key] = (float(xy[0]), float(xy[1]))
        return key

    for i, j, a, b in matches:
        for p, q in zip(np.asarray(a, float), np.asarray(b, float)):
            if not (np.all(np.isfinite(p)) and np.all(np.isfinite(q))):
                continue
            ra, rb = find(node(i, p)), find(node(j, q))
            if ra != rb:
                parent[rb] = ra
    groups: dict = {}
    for key in parent:
        groups.setdefault(find(key), []).append(key)
    tracks, bad, dropped_obs = [], 0, 0
    for members in groups.values():
        imgs = [k[0] for k in members]
        if len(set(imgs)) != len(imgs):
            # Two keypoints of one image in a track (noisy answers landing a pixel apart, or a wrong
            # chain): which one is right is unknown, so that image's observations leave the track.
            bad += 1
            counts = {}
            for k in imgs:
                counts[k] = counts.get(k, 0) + 1
            dropped_obs += sum(c for c in counts.values() if c > 1)
            members = [k for k in members if counts[k[0]] == 1]
        if len(members) < min_length:
            continue
        members.sort()
        tracks.append(Track([(k[0], *pos[k]) for k in members]))
    lengths = np.array([len(t.obs) for t in tracks]) if tracks else np.zeros(0, int)
    stats = {"tracks": len(tracks), "inconsistent": bad, "conflicting_observations_dropped": dropped_obs,
             "length_hist": {int(k): int(v) for k, v in zip(*np.unique(lengths, return_counts=True))}}
    return TrackSet(tracks, bad, stats)


def _projection(cam: Camera, cam_to_world: np.ndarray) -> np.ndarray:
    w2c = np.linalg.inv(cam_to_world)
    return cam.K @ w2c[:3, :]


def _reproject(P: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, float]:
    x = P @ np.r_[X, 1.0]
    return x[:2] / x[2], x[2]


def triangulate_tracks(tracks: TrackSet, cameras: dict[int, Camera], cam_to_world: dict[int, np.ndarray], *,
                       cfg: ExportConfig | None = None, load_depth: Callable[[int], np.ndarray | None] | None = None,
                       load_rgb: Callable[[int], np.ndarray | None] | None = None) -> TrackSet:
    """3D points for tracks whose views all have poses; drops the rest. Depth and colour are loaded one
    image at a time (tracks grouped by their first view)."""
    cfg = cfg or ExportConfig()
    P = {k: _projection(cameras[k], cam_to_world[k]) for k in cam_to_world}
    centres = {k: np.asarray(cam_to_world[k])[:3, 3] for k in cam_to_world}
    kept: list[Track] = []
    reasons = {"unposed": 0, "reprojection": 0, "behind": 0}
    by_first: dict[int, list[Track]] = {}
    for t in tracks.tracks:
        obs = [o for o in t.obs if o[0] in P]
        if len(obs) < cfg.min_track_length:
            reasons["unposed"] += 1
            continue
        t.obs = obs
        by_first.setdefault(obs[0][0], []).append(t)
    for first in sorted(by_first):
        depth = load_depth(first) if load_depth is not None and cfg.use_depth_fallback else None
        rgb = load_rgb(first) if load_rgb is not None else None
        for t in by_first[first]:
            X = _dlt([P[k] for k, _, _ in t.obs], [(x, y) for _, x, y in t.obs])
            angle = _max_ray_angle(X, [centres[k] for k, _, _ in t.obs])
            t.source = "triangulated"
            if (X is None or angle < cfg.min_triangulation_deg) and depth is not None:
                X = _from_depth(t.obs[0], depth, cameras[first], cam_to_world[first])
                t.source = "depth"
            if X is None:
                reasons["behind"] += 1
                continue
            errs, ok = [], True
            for k, x, y in t.obs:
                uv, z = _reproject(P[k], X)
                if z <= 0:
                    ok = False
                    break
                errs.append(float(np.hypot(uv[0] - x, uv[1] - y)))
            if not ok:
                reasons["behind"] += 1
                continue
            if max(errs) > cfg.max_reproj_px:
                reasons["reprojection"] += 1
                continue
            t.xyz, t.error = X, float(np.mean(errs))
            if rgb is not None:
                _, x, y = t.obs[0]
                h, w = rgb.shape[:2]
                t.rgb = tuple(int(c) for c in rgb[min(int(round(y)), h - 1), min(int(round(x)), w - 1)])
            kept.append(t)
        del depth, rgb
    lengths = np.array([len(t.obs) for t in kept]) if kept else np.zeros(0, int)
    stats = dict(tracks.stats)
    stats.update(points=len(kept), rejected=reasons,
                 mean_track_length=float(lengths.mean()) if len(lengths) else 0.0,
                 tracks_ge3=int((lengths >= 3).sum()),
                 from_depth=sum(t.source == "depth" for t in kept),
                 mean_reproj_px=float(np.mean([t.error for t in kept])) if kept else float("nan"))
    return TrackSet(kept, tracks.inconsistent, stats)


def _dlt(Ps, xys) -> np.ndarray | None:
    A = []
    for Pm, (x, y) in zip(Ps, xys):
        A.append(x * Pm[2] - Pm[0])
        A.append(y * Pm[2] - Pm[1])
    A = np.asarray(A)
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    _, _, Vt = np.linalg.svd(A)
    X = Vt[-1]
    if abs(X[3]) < 1e-12:
        return None
    return X[:3] / X[3]


def _max_ray_angle(X, centres) -> float:
    if X is None:
        return 0.0
    rays = [(X - c) / max(np.linalg.norm(X - c), 1e-12) for c in centres]
    best = 0.0
    for a in range(len(rays)):
        for b in range(a + 1, len(rays)):
            best = max(best, float(np.degrees(np.arccos(np.clip(rays[a] @ rays[b], -1, 1)))))
    return best


def _from_depth(ob, depth, cam: Camera, c2w) -> np.ndarray | None:
    _, x, y = ob
    z = depth_at_pixels(depth, [x, y])
    if not (np.isfinite(z[0]) and z[0] > 0):
        return None
    pc = unproject([x, y], z, cam)[0]
    return c2w[:3, :3] @ pc + c2w[:3, 3]


def rotmat_to_qvec(R: np.ndarray) -> np.ndarray:
    """Hamilton quaternion (qw, qx, qy, qz), qw >= 0, as COLMAP writes it."""
    from scipy.spatial.transform import Rotation

    x, y, z, w = Rotation.from_matrix(np.asarray(R, float)).as_quat()
    q = np.array([w, x, y, z])
    return -q if q[0] < 0 else q


PIXEL_CENTER = 0.5
"""Added to principal points and 2D points on export (COLMAP / nerfstudio pixel-centre convention)."""


def write_colmap_text(folder: str | Path, images: list[tuple[int, str, Camera, np.ndarray]], tracks: TrackSet) -> Path:
    """cameras.txt (PINHOLE fx fy cx cy per image), images.txt (world-to-camera qvec/tvec and 2D points),
    points3D.txt (tracks). images: (image index, file name, Camera, cam_to_world)."""
    folder = Path(folder)
    idx_to_id = {idx: k + 1 for k, (idx, *_rest) in enumerate(images)}
    pts2d: dict[int, list[tuple[float, float, int]]] = {idx: [] for idx, *_ in images}
    track_refs = []
    for pid, t in enumerate(tracks.tracks, 1):
        refs = []
        for k, x, y in t.obs:
            refs.append((idx_to_id[k], len(pts2d[k])))
            pts2d[k].append((x, y, pid))
        track_refs.append(refs)
    cam_lines = ["# Camera list with one line of data per camera:",
                 "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]", f"# Number of cameras: {len(images)}"]
    img_lines = ["# Image list with two lines of data per image:",
                 "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
                 "#   POINTS2D[] as (X, Y, POINT3D_ID)", f"# Number of images: {len(images)}"]
    for idx, name, cam, c2w in images:
        iid = idx_to_id[idx]
        cam_lines.append(f"{iid} PINHOLE {cam.width} {cam.height} {cam.fx:.10g} {cam.fy:.10g} "
                         f"{cam.cx + PIXEL_CENTER:.10g} {cam.cy + PIXEL_CENTER:.10g}")
        w2c = np.linalg.inv(np.asarray(c2w, float))
        q = rotmat_to_qvec(w2c[:3, :3])
        tv = w2c[:3, 3]
        img_lines.append(f"{iid} {q[0]:.12g} {q[1]:.12g} {q[2]:.12g} {q[3]:.12g} {tv[0]:.12g} {tv[1]:.12g} "
                         f"{tv[2]:.12g} {iid} {name}")
        img_lines.append(" ".join(f"{x + PIXEL_CENTER:.4f} {y + PIXEL_CENTER:.4f} {pid}" for x, y, pid in pts2d[idx]))
    pt_lines = ["# 3D point list with one line of data per point:",
                "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)",
                f"# Number of points: {len(tracks.tracks)}"]
    for pid, (t, refs) in enumerate(zip(tracks.tracks, track_refs), 1):
        X = t.xyz
        pt_lines.append(f"{pid} {X[0]:.8g} {X[1]:.8g} {X[2]:.8g} {t.rgb[0]} {t.rgb[1]} {t.rgb[2]} {t.error:.6g} "
                        + " ".join(f"{iid} {k}" for iid, k in refs))
    outputs.write_text(folder / "cameras.txt", "\n".join(cam_lines) + "\n")
    outputs.write_text(folder / "images.txt", "\n".join(img_lines) + "\n")
    outputs.write_text(folder / "points3D.txt", "\n".join(pt_lines) + "\n")
    return folder


def write_colmap_binary(text_folder: str | Path, folder: str | Path) -> Path:
    """The text model converted to COLMAP's binary files (cameras.bin, images.bin, points3D.bin) by pycolmap."""
    import pycolmap

    import os
    import shutil
    import tempfile

    folder = Path(folder)
    rec = pycolmap.Reconstruction(str(text_folder))
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=outputs.temp_name(folder), dir=folder.parent))
    try:  # written aside, then each file renamed into place: never a half-written model
        rec.write_binary(str(tmp))
        for f in tmp.iterdir():
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_colmap_check(folder: str | Path) -> dict:
    """Read the model back with pycolmap: counts, track lengths, mean reprojection error."""
    import pycolmap

    rec = pycolmap.Reconstruction(str(folder))
    lengths = [p.track.length() for p in rec.points3D.values()]
    return {"images": rec.num_images(), "registered": rec.num_reg_images(), "points3D": rec.num_points3D(),
            "mean_track_length": float(np.mean(lengths)) if lengths else 0.0,
            "max_track_length": int(max(lengths)) if lengths else 0,
            "tracks_ge3": int(sum(n >= 3 for n in lengths)),
            "mean_reprojection_error": float(rec.compute_mean_reprojection_error()) if lengths else float("nan")}


def write_nerfstudio(path: str | Path, frames: list[tuple[str, Camera, np.ndarray]], *,
                     depth_paths: list[str | None] | None = None) -> Path:
    """nerfstudio transforms.json. frames: (image path relative to the file, Camera, cam_to_world OpenCV).

    Intrinsics are global when every frame shares them, else per frame. transform_matrix is
    camera-to-world in OpenGL axes (y up, z back): the OpenCV camera's y and z axes flipped.
    """
    cams = [c for _, c, _ in frames]
    keys = ("fl_x", "fl_y", "cx", "cy", "w", "h")

    def intr(c: Camera) -> dict:
        return dict(zip(keys, (c.fx, c.fy, c.cx + PIXEL_CENTER, c.cy + PIXEL_CENTER, int(c.width), int(c.height))))

    shared = bool(cams) and all(intr(c) == intr(cams[0]) for c in cams)
    out: dict = {"camera_model": "OPENCV"}
    if shared:
        out.update(intr(cams[0]))
    out["frames"] = []
    for k, (fp, cam, c2w) in enumerate(frames):
        fr = {"file_path": str(fp), "transform_matrix": (np.asarray(c2w, float) @ OPENCV_TO_OPENGL).tolist()}
        if not shared:
            fr.update(intr(cam))
        if depth_paths and depth_paths[k]:
            fr["depth_file_path"] = str(depth_paths[k])
        out["frames"].append(fr)
    if depth_paths and any(depth_paths):
        out["depth_unit_scale_factor"] = 0.001  # depth.png holds uint16 millimetres
    return outputs.write_json(path, out)


def camera_frustum(cam: Camera, cam_to_world: np.ndarray, size: float) -> np.ndarray:
    """Line segments (Nx2x3, world) of a camera's frustum: centre to the image corners at depth `size`, the
    image rectangle, and a tick on its top edge (which way is up)."""
    w, h = cam.width - 1, cam.height - 1
    uv = np.array([[0, 0], [w, 0], [w, h], [0, h], [w / 2, -0.15 * h]], float)
    pc = np.c_[(uv[:, 0] - cam.cx) / cam.fx, (uv[:, 1] - cam.cy) / cam.fy, np.ones(len(uv))] * size
    T = np.asarray(cam_to_world, float)
    c = T[:3, 3]
    p = pc @ T[:3, :3].T + c
    segs = [(c, p[k]) for k in range(4)] + [(p[k], p[(k + 1) % 4]) for k in range(4)] + [(p[0], p[4]), (p[4], p[1])]
    return np.asarray(segs)


def write_glb(path: str | Path, cameras: list[tuple[str, Camera, np.ndarray]], *, mesh=None, cloud=None,
              frustum_size: float | None = None) -> Path:
    """scene.glb: the fused mesh (Open3D TriangleMesh, vertex colours kept), else the cloud, and each camera
    as a frustum of lines named camera_<id> (the reference camera in red). World axes are turned from
    OpenCV's (y down, z forward) to glTF's (y up), so viewers show the scene upright."""
    import trimesh

    flip = OPENCV_TO_OPENGL[:3, :3]
    scene = trimesh.Scene()
    pts = None
    if mesh is not None and len(mesh.triangles):
        pts = np.asarray(mesh.vertices) @ flip.T
        colours = (np.clip(np.asarray(mesh.vertex_colors), 0, 1) * 255).astype(np.uint8) if mesh.has_vertex_colors() \
            else None
        scene.add_geometry(trimesh.Trimesh(pts, np.asarray(mesh.triangles), vertex_colors=colours, process=False),
                           geom_name="mesh")
    elif cloud is not None and len(cloud.points):
        pts = np.asarray(cloud.points) @ flip.T
        colours = (np.clip(np.asarray(cloud.colors), 0, 1) * 255).astype(np.uint8) if cloud.has_colors() else None
        scene.add_geometry(trimesh.PointCloud(pts, colors=colours), geom_name="cloud")
    centres = np.array([np.asarray(T)[:3, 3] for _, _, T in cameras]) if cameras else np.zeros((0, 3))
    if frustum_size is None:
        ext = np.ptp(np.r_[centres @ flip.T, pts if pts is not None else np.zeros((0, 3))], 0) if len(centres) else [1]
        frustum_size = max(0.04 * float(np.linalg.norm(ext)), 1e-3)
    for k, (name, cam, T) in enumerate(cameras):
        segs = camera_frustum(cam, T, frustum_size) @ flip.T
        colour = [220, 40, 40, 255] if k == 0 else [40, 90, 220, 255]
        path3d = trimesh.load_path(segs)
        path3d.colors = np.tile(colour, (len(path3d.entities), 1))
        scene.add_geometry(path3d, geom_name=f"camera_{name}")
    data = scene.export(file_type="glb")
    with outputs.atomic_path(Path(path)) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)
