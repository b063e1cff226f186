"""Seeded synthetic indoor scenes rendered on the CPU with Open3D's RaycastingScene.

Each scene is a closed box room (floor, ceiling, four walls) with furniture-like boxes, spheres and
cylinders, seen by one or more pinhole cameras along a path. Every view carries exact ground truth:
z-depth, intrinsics and camera-to-world pose; the scene gives relative poses and dense pixel matches.

World frame: y up, floor at y = 0, ceiling at y = room height, x in [-W/2, W/2], z in [-D/2, D/2].
Camera frame (OpenCV): x right, y down, z forward. A pixel index (x, y) is the ray through (x, y),
i.e. X = (x - cx) / fx * Z (no half-pixel shift), matching densify.io.cameras.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open3d as o3d

from densify.geometry.rotations import matrix_from_euler
from densify.io.cameras import Camera

log = logging.getLogger(__name__)

_CAM_CLEARANCE_M = 0.6
"""No object's footprint comes closer than this to a camera position (or to the point 1 m ahead)."""
_WALL_MARGIN_M = 0.6
"""Cameras keep at least this distance to the walls."""
_VISIBLE_RTOL = 5e-3
"""Relative depth tolerance when deciding a point is the first surface seen from another camera."""


@dataclass
class SceneSpec:
    """Every knob of a scene; the same spec always gives the same scene."""

    seed: int = 0
    room_size: tuple[float, float, float] = (6.0, 3.0, 8.0)
    """x (width), y (height), z (depth) in metres."""
    n_objects: int = 8
    """Objects in total: about three quarters furniture-like boxes, the rest spheres and cylinders."""
    width: int = 640
    height: int = 480
    fov_deg: float = 60.0
    """Horizontal field of view."""
    n_views: int = 1
    trajectory: str = "arc"
    """"arc": walk forward while turning (heavily overlapping views); "orbit": circle looking at the
    room centre."""
    step_m: float = 0.25
    """Translation between consecutive views."""
    step_deg: float = 6.0
    """Rotation (yaw) between consecutive views."""


@dataclass
class View:
    """One rendered image with its exact ground truth."""

    rgb: np.ndarray
    """HxWx3 uint8."""
    depth: np.ndarray
    """HxW float32 metres, z-depth along the optical axis (not ray length); 0 where no hit."""
    camera: Camera
    cam_to_world: np.ndarray
    """4x4 float64; camera frame x right, y down, z forward."""
    object_ids: np.ndarray | None = None
    """HxW int16: id of the surface each pixel sees (`Scene.objects[k].id`), -1 where no hit."""


@dataclass(frozen=True)
class SceneObject:
    """One surface of the scene: a room surface (floor, ceiling, wall) or a piece of furniture.

    `id` is its Open3D geometry id, which is also its value in `View.object_ids`. Boxes carry their
    size in their own frame (x width, y height, z depth) and yaw about world y; spheres and cylinders
    their radius and height; room surfaces only their kind.
    """

    id: int
    kind: str
    """floor, ceiling, wall, shelf, table, cabinet, crate, sphere or cylinder."""
    center: tuple[float, float, float]
    """World position of the object's centre (metres)."""
    size: tuple[float, float, float]
    """Extents along the object's own x, y, z axes (metres): a sphere of radius r is (2r, 2r, 2r)."""
    yaw: float = 0.0
    """Rotation about world y (radians) of the object's frame."""

    @property
    def is_room(self) -> bool:
        return self.kind in ("floor", "ceiling", "wall")

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "center": list(self.center), "size": list(self.size),
                "yaw": self.yaw}


@dataclass
class Materials:
    """Per-geometry texture parameters (indexed by RaycastingScene geometry id) and the light."""

    base: np.ndarray          # G x 3 RGB in [0, 1]
    alt: np.ndarray           # G x 3 second colour of the pattern
    pattern: np.ndarray       # G, int: 0 checker, 1 stripes, 2 planks, 3 tiles, 4 blotches
    scale: np.ndarray         # G, pattern cell size in metres
    world_to_local: np.ndarray  # G x 3 x 4, object frame the pattern is laid out in
    face_offset: np.ndarray   # G x 6 x 2, decorrelates the noise of different objects and faces
    light: np.ndarray         # 3, point light position (world)
    lattice: np.ndarray       # 65536 float32, lattice values of the value noise and cell hashes


@dataclass
class Scene:
    """A synthetic room, its views and its mesh (world coordinates)."""

    spec: SceneSpec
    views: list[View]
    mesh: o3d.geometry.TriangleMesh
    objects: list[SceneObject] = field(default_factory=list)
    """Every surface, indexed by id (room surfaces first)."""
    _raycaster: o3d.t.geometry.RaycastingScene | None = field(default=None, repr=False, compare=False)

    def raycaster(self) -> o3d.t.geometry.RaycastingScene:
        """A RaycastingScene of the whole mesh (one geometry), built once."""
        if self._raycaster is None:
            rs = o3d.t.geometry.RaycastingScene()
            rs.add_triangles(o3d.t.geometry.TriangleMesh.from_legacy(self.mesh))
            self._raycaster = rs
        return self._raycaster

    def relative_pose(self, i: int, j: int) -> np.ndarray:
        """4x4 T with x_j = T @ x_i (camera i frame -> camera j frame)."""
        return np.linalg.inv(self.views[j].cam_to_world) @ self.views[i].cam_to_world

    def matches(self, i: int, j: int, *, pixel_size: tuple[int, int] | None = None) -> np.ndarray:
        """HxWx2 float32: where each pixel (x, y) of view i lands in view j, NaN where not visible there.

        Visibility is exact: the ray of camera j towards the point must hit it first (not occluded) and
        land inside image j. pixel_size=(W', H') gives the map for both images resized to W' x H'
        (pure scale), computed from the geometry rather than by resampling.
        """
        vi, vj = self.views[i], self.views[j]
        cam_i, cam_j = vi.camera, vj.camera
        depth_i = vi.depth
        if pixel_size is not None and tuple(pixel_size) != (cam_i.width, cam_i.height):
            cam_i = cam_i.scaled(*pixel_size)
            cam_j = cam_j.scaled(*pixel_size)
            depth_i = self.depth_at(i, pixel_size)
        return _matches(self.raycaster(), cam_i, vi.cam_to_world, depth_i, cam_j, vj.cam_to_world)

    def depth_at(self, i: int, pixel_size: tuple[int, int] | None = None) -> np.ndarray:
        """View i's z-depth, or re-cast exactly for the image resized to pixel_size=(W', H')."""
        v = self.views[i]
        if pixel_size is None or tuple(pixel_size) == (v.camera.width, v.camera.height):
            return v.depth
        return _raycast_depth(self.raycaster(), v.camera.scaled(*pixel_size), v.cam_to_world)

    def save(self, folder, names: list[str] | None = None) -> list[Path]:
        """Write view_NNN.png, view_NNN.depth.npy, view_NNN.objects.npy (object id per pixel), view_NNN.json
        (intrinsics + cam_to_world), objects.json (every surface: id, kind, centre, size, yaw), scene.ply.
        names: other file stems, one per view (e.g. shuffled, so that file order says nothing)."""
        from PIL import Image

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        if names is not None and len(names) != len(self.views):
            raise ValueError(f"names: {len(names)} for {len(self.views)} views")
        for k, v in enumerate(self.views):
            stem = names[k] if names is not None else f"view_{k:03d}"
            img = folder / f"{stem}.png"
            Image.fromarray(v.rgb).save(img)
            np.save(folder / f"{stem}.depth.npy", v.depth.astype(np.float32))
            if v.object_ids is not None:
                np.save(folder / f"{stem}.objects.npy", v.object_ids.astype(np.int16))
            c = v.camera
            side = {"fx": c.fx, "fy": c.fy, "cx": c.cx, "cy": c.cy, "width": c.width, "height": c.height,
                    "cam_to_world": np.asarray(v.cam_to_world, float).tolist()}
            (folder / f"{stem}.json").write_text(json.dumps(side, indent=1))
            paths.append(img)
        (folder / "objects.json").write_text(json.dumps([o.to_dict() for o in self.objects], indent=1))
        o3d.io.write_triangle_mesh(str(folder / "scene.ply"), self.mesh)
        return paths


# ----------------------------------------------------------------------------------------------
# Scene construction


def make_scene(spec: SceneSpec | None = None, **overrides) -> Scene:
    """Build and render a scene from `spec` (defaults if None) with fields replaced by `overrides`."""
    spec = dataclasses.replace(spec or SceneSpec(), **overrides)
    if spec.trajectory not in ("arc", "orbit"):
        raise ValueError(f"trajectory must be 'arc' or 'orbit', got {spec.trajectory!r}")
    if spec.n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {spec.n_views}")
    rng = np.random.default_rng(spec.seed)
    poses = _camera_path(spec, rng)
    meshes, kinds, frames, objects = _build_geometry(spec, rng, poses)

    rs = o3d.t.geometry.RaycastingScene()
    whole = o3d.geometry.TriangleMesh()
    for m in meshes:
        # Geometry ids come out 0, 1, 2, ... in this order; Materials is indexed by them.
        rs.add_triangles(o3d.t.geometry.TriangleMesh.from_legacy(m))
        whole += m
    materials = _make_materials(spec, rng, kinds, frames)

    camera = Camera.default(spec.width, spec.height, spec.fov_deg)
    camera = dataclasses.replace(camera, source="synthetic")
    views = [render_view(rs, materials, camera, T) for T in poses]
    return Scene(spec=spec, views=views, mesh=whole, objects=objects)


def _look_rotation(yaw_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    """Camera-to-world rotation; yaw 0 looks along world +z, yaw > 0 turns right (towards world -x)."""
    # Columns: camera x (right), y (down), z (forward) in world coordinates at yaw = pitch = roll = 0.
    base = np.array([[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]]).T
    return base @ matrix_from_euler(yaw_deg, pitch_deg, roll_deg)


def _camera_path(spec: SceneSpec, rng: np.random.Generator) -> list[np.ndarray]:
    W, H, D = spec.room_size
    n = spec.n_views
    lo = np.array([-W / 2 + _WALL_MARGIN_M, -D / 2 + _WALL_MARGIN_M])
    hi = np.array([W / 2 - _WALL_MARGIN_M, D / 2 - _WALL_MARGIN_M])
    if np.any(hi <= lo):
        raise ValueError(f"room {spec.room_size} too small for cameras")
    y_lo, y_hi = min(1.4, 0.45 * H), min(1.6, H - 0.4)
    height0 = rng.uniform(y_lo, y_hi)
    heights = np.clip(height0 + rng.normal(0, 0.02, n), y_lo, y_hi)
    pitch = rng.normal(0, 1.5, n)
    roll = rng.normal(0, 1.0, n)

    if spec.trajectory == "arc":
        turn = spec.step_deg * (1 if rng.random() < 0.5 else -1)
        yaw0 = rng.uniform(-8, 8)
        yaws = yaw0 + turn * np.arange(n)
        # Walk along the heading of each view: position k+1 = position k + step along heading k.
        hd = np.radians(yaws[:-1])
        steps = spec.step_m * np.stack([-np.sin(hd), np.cos(hd)], 1)
        xz = np.concatenate([np.zeros((1, 2)), np.cumsum(steps, 0)], 0)
        # Centre the path across the room (with jitter in the slack) and start near the back wall.
        span_x = xz[:, 0].max() - xz[:, 0].min()
        slack = max(0.0, (hi[0] - lo[0]) - span_x)
        x_shift = lo[0] + rng.uniform(0.3, 0.7) * slack - xz[:, 0].min()
        z_shift = lo[1] + rng.uniform(0.0, 0.3) - xz[:, 1].min()
        xz = xz + [x_shift, z_shift]
        # Long paths that would leave the room are held at the safe margin.
        xz = np.clip(xz, lo, hi)
    else:
        step = math.radians(spec.step_deg)
        r_fit = min(hi - lo) / 2
        radius = min(spec.step_m / (2 * math.sin(step / 2)) if step > 0 else r_fit, r_fit)
        phi = rng.uniform(0, 2 * math.pi) + step * np.arange(n)
        xz = radius * np.stack([np.cos(phi), np.sin(phi)], 1)
        # Looking at the centre: heading is the direction -xz; yaw 0 = +z, yaw > 0 towards -x.
        yaws = np.degrees(np.arctan2(xz[:, 0], -xz[:, 1]))
        pitch = pitch - np.degrees(np.arctan2(heights - 1.0, max(radius, 1e-6)))

    poses = []
    for k in range(n):
        T = np.eye(4)
        T[:3, :3] = _look_rotation(yaws[k], pitch[k], roll[k])
        T[:3, 3] = [xz[k, 0], heights[k], xz[k, 1]]
        poses.append(T)
    return poses


def _box_mesh(size, center, yaw) -> o3d.geometry.TriangleMesh:
    m = o3d.geometry.TriangleMesh.create_box(*size)
    m.translate(-np.asarray(size) / 2)
    m.rotate(_rot_y(yaw), center=np.zeros(3))
    m.translate(center)
    return m


def _rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _quad(corners) -> o3d.geometry.TriangleMesh:
    m = o3d.geometry.TriangleMesh()
    m.vertices = o3d.utility.Vector3dVector(np.asarray(corners, float))
    m.triangles = o3d.utility.Vector3iVector(np.array([[0, 1, 2], [0, 2, 3]]))
    return m


def _room_meshes(W, H, D):
    """Floor, ceiling and four walls, normals facing into the room."""
    x0, x1, z0, z1 = -W / 2, W / 2, -D / 2, D / 2
    quads = [
        [(x0, 0, z0), (x0, 0, z1), (x1, 0, z1), (x1, 0, z0)],      # floor (+y)
        [(x0, H, z0), (x1, H, z0), (x1, H, z1), (x0, H, z1)],      # ceiling (-y)
        [(x0, 0, z0), (x1, 0, z0), (x1, H, z0), (x0, H, z0)],      # back wall (+z)
        [(x0, 0, z1), (x0, H, z1), (x1, H, z1), (x1, 0, z1)],      # front wall (-z)
        [(x0, 0, z0), (x0, H, z0), (x0, H, z1), (x0, 0, z1)],      # left wall x0 (+x)
        [(x1, 0, z0), (x1, 0, z1), (x1, H, z1), (x1, H, z0)],      # right wall x1 (-x)
    ]
    out = []
    for q in quads:
        m = _quad(q)
        m.compute_triangle_normals()
        out.append(m)
    return out


def _build_geometry(spec: SceneSpec, rng: np.random.Generator, poses):
    """Meshes (room first), their kinds and pattern frames (world -> local, 3x4)."""
    W, H, D = spec.room_size
    meshes = _room_meshes(W, H, D)
    kinds = ["floor", "ceiling", "wall", "wall", "wall", "wall"]
    frames = [np.eye(4)[:3] for _ in meshes]
    room = [((0, 0, 0), (W, 0, D)), ((0, H, 0), (W, 0, D)), ((0, H / 2, -D / 2), (W, H, 0)),
            ((0, H / 2, D / 2), (W, H, 0)), ((-W / 2, H / 2, 0), (0, H, D)), ((W / 2, H / 2, 0), (0, H, D))]
    objects = [SceneObject(k, kinds[k], tuple(map(float, c)), tuple(map(float, sz))) for k, (c, sz) in enumerate(room)]

    def add(mesh, kind, frame, center, size, yaw=0.0):
        objects.append(SceneObject(len(meshes), kind, tuple(map(float, center)), tuple(map(float, size)), float(yaw)))
        meshes.append(mesh)
        kinds.append(kind)
        frames.append(frame)

    # Points the furniture must keep clear of: camera positions and 1 m ahead of each camera.
    keep = []
    for T in poses:
        c = T[:3, 3]
        ahead = c + 1.0 * T[:3, 2]
        keep += [c[[0, 2]], ahead[[0, 2]]]
    keep = np.array(keep)
    placed: list[tuple[np.ndarray, float]] = []   # footprint centre (x, z), bounding radius
    tables: list[tuple[np.ndarray, np.ndarray, float, float]] = []  # centre, size, yaw, top y

    def free(cxz, rad):
        if np.min(np.linalg.norm(keep - cxz, axis=1)) < rad + _CAM_CLEARANCE_M:
            return False
        return all(np.linalg.norm(cxz - p) >= rad + r + 0.05 for p, r in placed)

    n_round = max(1, round(spec.n_objects / 4)) if spec.n_objects >= 3 else 0
    n_boxes = spec.n_objects - n_round
    box_kinds = ["shelf", "table", "cabinet", "crate"]
    for k in range(n_boxes):
        kind = box_kinds[k % 4] if k < 4 else box_kinds[rng.integers(4)]
        for _ in range(200):
            if kind == "shelf":
                size = np.array([rng.uniform(0.6, 1.5), rng.uniform(1.5, min(2.2, H - 0.3)),
                                 rng.uniform(0.3, 0.5)])
            elif kind == "table":
                size = np.array([rng.uniform(0.8, 1.6), rng.uniform(0.68, 0.8), rng.uniform(0.6, 1.0)])
            elif kind == "cabinet":
                size = np.array([rng.uniform(0.5, 1.0), rng.uniform(0.8, 1.2), rng.uniform(0.4, 0.6)])
            else:
                size = np.array([rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.7)])
            rad = 0.5 * math.hypot(size[0], size[2])
            if kind in ("shelf", "cabinet") and rng.random() < 0.7:
                # Against a wall, facing into the room.
                wall = rng.integers(4)
                yaw = [0.0, math.pi, math.pi / 2, -math.pi / 2][wall]
                along = rng.uniform(-0.5, 0.5)
                gap = size[2] / 2 + 0.02
                cxz = [np.array([along * (W - 2 * rad), -D / 2 + gap]),
                       np.array([along * (W - 2 * rad), D / 2 - gap]),
                       np.array([-W / 2 + gap, along * (D - 2 * rad)]),
                       np.array([W / 2 - gap, along * (D - 2 * rad)])][wall]
            else:
                yaw = rng.uniform(-math.pi, math.pi) if rng.random() < 0.6 else 0.0
                cxz = np.array([rng.uniform(-W / 2 + rad, W / 2 - rad), rng.uniform(-D / 2 + rad, D / 2 - rad)])
            if free(cxz, rad):
                break
        else:
            log.debug("no free spot for a %s; skipped", kind)
            continue
        center = np.array([cxz[0], size[1] / 2, cxz[1]])
        add(_box_mesh(size, center, yaw), kind, _local_frame(center, yaw), center, size, yaw)
        placed.append((cxz, rad))
        if kind in ("table", "cabinet", "crate"):
            tables.append((cxz, size, yaw, size[1]))

    for k in range(n_round):
        sphere = k % 2 == 0
        on_table = sphere and tables and rng.random() < 0.5
        if on_table:
            cxz, tsize, tyaw, top = tables[rng.integers(len(tables))]
            r = rng.uniform(0.1, min(0.25, 0.45 * min(tsize[0], tsize[2])))
            center = np.array([cxz[0], top + r, cxz[1]])
            if np.min(np.linalg.norm(keep - cxz, axis=1)) < _CAM_CLEARANCE_M:
                continue
            m = o3d.geometry.TriangleMesh.create_sphere(r, resolution=24)
            m.translate(center)
            add(m, "sphere", _local_frame(center, 0.0), center, (2 * r, 2 * r, 2 * r))
            continue
        for _ in range(200):
            if sphere:
                r = rng.uniform(0.2, 0.45)
                h = 2 * r
            else:
                r = rng.uniform(0.12, 0.35)
                h = rng.uniform(0.4, H) if rng.random() < 0.7 else H  # bins, posts, or a pillar
            cxz = np.array([rng.uniform(-W / 2 + r, W / 2 - r), rng.uniform(-D / 2 + r, D / 2 - r)])
            if free(cxz, r):
                break
        else:
            continue
        if sphere:
            m = o3d.geometry.TriangleMesh.create_sphere(r, resolution=24)
            center = np.array([cxz[0], r, cxz[1]])
            m.translate(center)
        else:
            # create_cylinder is along z; stand it up along y.
            m = o3d.geometry.TriangleMesh.create_cylinder(r, h, resolution=32, split=1)
            m.rotate(np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float), center=np.zeros(3))
            center = np.array([cxz[0], h / 2, cxz[1]])
            m.translate(center)
        add(m, "sphere" if sphere else "cylinder", _local_frame(center, rng.uniform(-math.pi, math.pi)), center,
            (2 * r, h, 2 * r))
        placed.append((cxz, r))

    for m in meshes:
        m.compute_triangle_normals()
        m.compute_vertex_normals()
    return meshes, kinds, frames, objects


def _local_frame(center, yaw) -> np.ndarray:
    R = _rot_y(yaw).T
    return np.concatenate([R, (-R @ np.asarray(center, float))[:, None]], 1)


def _make_materials(spec: SceneSpec, rng: np.random.Generator, kinds, frames) -> Materials:
    G = len(kinds)
    W, H, D = spec.room_size
    hue = rng.uniform(0, 1, G)
    sat = rng.uniform(0.25, 0.7, G)
    val = rng.uniform(0.45, 0.85, G)
    base = _hsv_to_rgb(hue, sat, val)
    hue2 = (hue + rng.uniform(0.08, 0.5, G) * rng.choice([-1, 1], G)) % 1.0
    alt = _hsv_to_rgb(hue2, np.clip(sat + rng.uniform(-0.2, 0.2, G), 0.1, 0.9),
                      np.clip(val * rng.uniform(0.45, 0.75, G), 0.1, 1.0))
    pattern = rng.integers(0, 5, G)
    scale = rng.uniform(0.15, 0.45, G)
    for g, kind in enumerate(kinds):
        if kind == "floor":
            pattern[g] = rng.choice([2, 3])
            scale[g] = rng.uniform(0.2, 0.4)
        elif kind == "ceiling":
            pattern[g] = 3
            scale[g] = rng.uniform(0.5, 0.7)
        elif kind in ("sphere", "cylinder"):
            pattern[g] = rng.choice([1, 4])
            scale[g] = rng.uniform(0.08, 0.2)
    light = np.array([rng.uniform(-0.25, 0.25) * W, H - 0.25, rng.uniform(-0.25, 0.25) * D])
    return Materials(base=base, alt=alt, pattern=pattern, scale=scale,
                     world_to_local=np.stack(frames).astype(np.float64),
                     face_offset=rng.uniform(0, 200, (G, 6, 2)).astype(np.float32), light=light,
                     lattice=rng.uniform(0, 1, 65536).astype(np.float32))


def _hsv_to_rgb(h, s, v) -> np.ndarray:
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack(c, -1) for c in
                      [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]], 0)
    return table[i, np.arange(len(h))]


# ----------------------------------------------------------------------------------------------
# Rendering


@functools.lru_cache(maxsize=8)
def _unit_dirs(camera: Camera) -> tuple[np.ndarray, np.ndarray]:
    """Unit ray directions in the camera frame (H*W x 3) and their z components."""
    xs = (np.arange(camera.width, dtype=np.float64) - camera.cx) / camera.fx
    ys = (np.arange(camera.height, dtype=np.float64) - camera.cy) / camera.fy
    d = np.empty((camera.height, camera.width, 3))
    d[..., 0] = xs[None, :]
    d[..., 1] = ys[:, None]
    d[..., 2] = 1.0
    d = d.reshape(-1, 3)
    dz = 1.0 / np.sqrt(np.einsum("ij,ij->i", d, d))
    d *= dz[:, None]
    d.flags.writeable = False
    dz.flags.writeable = False
    return d, dz


def _camera_rays(camera: Camera, cam_to_world: np.ndarray):
    """World-space unit rays (H*W x 6, float32) and each ray's z component in the camera frame."""
    d, dz = _unit_dirs(camera)
    R, t = cam_to_world[:3, :3], cam_to_world[:3, 3]
    rays = np.empty((len(d), 6), np.float32)
    rays[:, :3] = t
    rays[:, 3:] = np.einsum("ij,nj->ni", R, d)
    return rays, dz


def _raycast_depth(rs, camera: Camera, cam_to_world: np.ndarray) -> np.ndarray:
    rays, dz = _camera_rays(camera, cam_to_world)
    t = rs.cast_rays(o3d.core.Tensor(rays))["t_hit"].numpy().astype(np.float64)
    depth = np.where(np.isfinite(t), t * dz, 0.0)
    return depth.reshape(camera.height, camera.width).astype(np.float32)


def render_view(rs_scene, materials: Materials, camera: Camera, cam_to_world) -> View:
    """Ray-cast one view: textured, shaded RGB and exact z-depth."""
    cam_to_world = np.asarray(cam_to_world, np.float64)
    rays, dz = _camera_rays(camera, cam_to_world)
    hit = rs_scene.cast_rays(o3d.core.Tensor(rays))
    t = hit["t_hit"].numpy()
    ok = np.isfinite(t)
    depth = np.where(ok, t.astype(np.float64) * dz, 0.0).reshape(camera.height, camera.width)
    depth = depth.astype(np.float32)

    rgb = np.zeros((len(t), 3), np.float32)
    all_hit = bool(ok.all())
    idx = slice(None) if all_hit else np.nonzero(ok)[0]
    if all_hit or len(idx):
        # Shading and texture work on float32 coordinate rows (3 x N): contiguous and fast.
        dirs = np.ascontiguousarray(rays[idx, 3:].T)
        p = cam_to_world[:3, 3, None].astype(np.float32) + t[idx][None] * dirs
        gid = hit["geometry_ids"].numpy()[idx].astype(np.int64)
        n = np.ascontiguousarray(hit["primitive_normals"].numpy()[idx].T)
        # Face the normal towards the camera so shading does not depend on triangle winding.
        flip = np.where(n[0] * dirs[0] + n[1] * dirs[1] + n[2] * dirs[2] > 0, -1.0, 1.0).astype(np.float32)
        n *= flip
        rgb[idx] = _albedo(materials, p, n, gid) * _shading(rs_scene, materials, p, n)[:, None]
    img = np.clip(rgb, 0, 1) ** np.float32(1 / 2.2) * 255 + 0.5
    img = img.astype(np.uint8).reshape(camera.height, camera.width, 3)
    gids = hit["geometry_ids"].numpy().astype(np.int64)
    ids = np.where(ok, gids, -1).reshape(camera.height, camera.width).astype(np.int16)
    return View(rgb=img, depth=depth, camera=camera, cam_to_world=cam_to_world, object_ids=ids)


def _shading(rs, mat: Materials, p, n) -> np.ndarray:
    """Lambertian from a point light near the ceiling, with hard shadows and some ambient."""
    orig = p + n * np.float32(2e-3)
    to_l = mat.light.astype(np.float32)[:, None] - orig
    dist = np.sqrt(to_l[0] * to_l[0] + to_l[1] * to_l[1] + to_l[2] * to_l[2])
    lam = np.clip((n[0] * to_l[0] + n[1] * to_l[1] + n[2] * to_l[2]) / dist, 0, 1)
    srays = np.concatenate([orig, to_l], 0).T
    shadow = rs.test_occlusions(o3d.core.Tensor(np.ascontiguousarray(srays)), tnear=1e-4, tfar=0.999).numpy()
    direct = lam * np.where(shadow, np.float32(0.15), np.float32(1.0)) * (4.0 / (1.0 + 0.12 * dist * dist))
    # A faint fixed directional fill keeps surfaces facing away from the light distinguishable.
    fill = 0.12 * np.abs(0.48 * n[0] + 0.64 * n[1] + 0.6 * n[2])
    return np.clip(0.22 + fill + 0.6 * direct, 0, 1.6).astype(np.float32)


def _albedo(mat: Materials, p, n, gid) -> np.ndarray:
    """Procedural texture from the world hit point, laid out per geometry (one pass per geometry)."""
    out = np.empty((p.shape[1], 3), np.float32)
    order = np.argsort(gid, kind="stable")
    ids, starts = np.unique(gid[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    for g, a, b in zip(ids, starts, ends):
        sel = order[a:b]
        out[sel] = _surface_colour(mat, int(g), p[:, sel], n[:, sel])
    return out


def _surface_colour(mat: Materials, g: int, p, n) -> np.ndarray:
    M = mat.world_to_local[g].astype(np.float32)
    qx, qy, qz = (M[k, 0] * p[0] + M[k, 1] * p[1] + M[k, 2] * p[2] + M[k, 3] for k in range(3))
    nl = [M[k, 0] * n[0] + M[k, 1] * n[1] + M[k, 2] * n[2] for k in range(3)]
    ax, ay, az = (np.abs(c) for c in nl)
    # Lay the 2D pattern in the plane most facing the normal: each box face gets its own coordinates,
    # and its own noise offset so that opposite faces do not mirror each other.
    axis = np.where((ax >= ay) & (ax >= az), 0, np.where(ay >= az, 1, 2))
    positive = np.choose(axis, nl) > 0
    u = np.where(axis == 0, qz, qx)
    v = np.where(axis == 1, qz, qy)
    fo = mat.face_offset[g][axis * 2 + positive]
    nu, nv = u + fo[:, 0], v + fo[:, 1]
    s = np.float32(mat.scale[g])

    coarse = _value_noise2(mat, nu * 0.7, nv * 0.7)
    mid = _value_noise2(mat, nu * 3.1 + 5.3, nv * 3.1 + 2.1)
    fine = _value_noise2(mat, nu * 11.0 + 9.7, nv * 11.0 + 4.4)
    # Domain warp so that patterns are never perfectly regular.
    uw = u + 0.35 * s * (mid - 0.5)
    vw = v + 0.7 * s * (coarse - 0.5)
    cu, cv = np.floor(uw / s), np.floor(vw / s)
    cell = _hash2(mat, cu + 57 * g, cv + 13 * axis)   # per-cell random value in [0, 1)

    pat = mat.pattern[g]
    if pat == 0:        # checker with per-cell shade
        m = 0.2 + 0.6 * ((cu + cv) % 2) + 0.2 * cell
    elif pat == 1:      # stripes
        m = 0.15 + 0.6 * (np.floor(uw / (0.5 * s)) % 2) + 0.25 * cell
    elif pat == 2:      # planks: rows of width s, staggered joints, each plank its own shade
        row = cv
        shift = _hash2(mat, row, np.full_like(row, 7)) * 4 * s
        along = (uw + shift) / (4 * s)
        seam = (np.abs((vw / s) % 1.0 - 0.5) > 0.46) | (np.abs(along % 1.0 - 0.5) > 0.49)
        m = np.where(seam, 1.0, 0.55 * _hash2(mat, np.floor(along), row + 11))
    elif pat == 3:      # tiles: grout lines and per-tile colour variation
        grout = ((uw / s) % 1.0 < 0.05) | ((vw / s) % 1.0 < 0.05)
        m = np.where(grout, 1.0, 0.6 * cell)
    else:               # blotches: thresholded noise gives sharp-edged spots
        blot = _value_noise2(mat, nu / s + 3.3, nv / s + 8.8)
        m = np.clip((blot - 0.45) * 8, 0, 1)
    m = m.astype(np.float32)[:, None]
    col = (1 - m) * mat.base[g].astype(np.float32) + m * mat.alt[g].astype(np.float32)
    # Multi-scale noise modulates brightness (large stains to fine grain).
    fbm = 0.5 * coarse + 0.3 * mid + 0.2 * fine
    # Dark speckles everywhere: small distinct blobs give a matcher features even on plain regions.
    speck = np.clip((fine - 0.75) * 10, 0, 1)
    return col * ((0.6 + 0.8 * fbm) * (1 - 0.5 * speck))[:, None]


def _hash2(mat: Materials, a, b) -> np.ndarray:
    """A random value in [0, 1) per integer pair (a, b)."""
    ia = a.astype(np.int64) & 255
    ib = b.astype(np.int64) & 255
    return mat.lattice[ia * 256 + ib]


def _value_noise2(mat: Materials, x, y) -> np.ndarray:
    """2D value noise in [0, 1] with smooth (quintic) interpolation, float32."""
    fx, fy = np.floor(x), np.floor(y)
    tx, ty = x - fx, y - fy
    ix, iy = fx.astype(np.int64) & 255, fy.astype(np.int64) & 255
    wx = tx * tx * tx * (tx * (tx * 6 - 15) + 10)
    wy = ty * ty * ty * (ty * (ty * 6 - 15) + 10)
    ix1, iy1 = (ix + 1) & 255, (iy + 1) & 255
    row0, row1 = ix * 256, ix1 * 256
    lat = mat.lattice
    a = lat[row0 + iy] + wx * (lat[row1 + iy] - lat[row0 + iy])
    b = lat[row0 + iy1] + wx * (lat[row1 + iy1] - lat[row0 + iy1])
    return a + wy * (b - a)


# ----------------------------------------------------------------------------------------------
# Correspondences


def _matches(rs, cam_i: Camera, T_i: np.ndarray, depth_i: np.ndarray, cam_j: Camera,
             T_j: np.ndarray) -> np.ndarray:
    H, W = depth_i.shape
    z = depth_i.astype(np.float64).reshape(-1)
    x = np.tile((np.arange(W, dtype=np.float64) - cam_i.cx) / cam_i.fx, H) * z
    y = np.repeat((np.arange(H, dtype=np.float64) - cam_i.cy) / cam_i.fy, W) * z
    T = np.linalg.inv(T_j) @ T_i
    xj, yj, zj = (T[k, 0] * x + T[k, 1] * y + T[k, 2] * z + T[k, 3] for k in range(3))
    out = np.full((H * W, 2), np.nan, np.float32)
    valid = (z > 0) & (zj > 1e-6)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = cam_j.fx * xj / zj + cam_j.cx
        v = cam_j.fy * yj / zj + cam_j.cy
    valid &= (u >= 0) & (u <= cam_j.width - 1) & (v >= 0) & (v <= cam_j.height - 1)
    idx = np.nonzero(valid)[0]
    if len(idx):
        # Occlusion: the ray from camera j towards the point must not hit anything noticeably before it.
        R = T_j[:3, :3]
        rays = np.empty((len(idx), 6), np.float32)
        rays[:, :3] = T_j[:3, 3]
        for k in range(3):   # world direction = R @ (point in camera j)
            rays[:, 3 + k] = R[k, 0] * xj[idx] + R[k, 1] * yj[idx] + R[k, 2] * zj[idx]
        t = rs.cast_rays(o3d.core.Tensor(rays))["t_hit"].numpy()
        keep = idx[t >= 1.0 - _VISIBLE_RTOL]
        out[keep, 0] = u[keep]
        out[keep, 1] = v[keep]
    return out.reshape(H, W, 2)
