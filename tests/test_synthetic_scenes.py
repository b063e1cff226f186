"""Synthetic scenes: determinism, exact depth and poses, dense matches, texture, files."""

from __future__ import annotations

import json

import cv2
import numpy as np
import open3d as o3d
import pytest

from densify.io.cameras import read_sidecar
from densify.synthetic.scenes import Scene, SceneSpec, make_scene


@pytest.fixture(scope="module")
def arc() -> Scene:
    return make_scene(seed=1, n_views=4)


@pytest.fixture(scope="module")
def orbit() -> Scene:
    return make_scene(seed=2, n_views=4, trajectory="orbit", step_deg=15.0, step_m=0.6)


def _backproject(view, xs, ys):
    """World points of pixels (xs, ys) of a view, from its depth."""
    c = view.camera
    z = view.depth[ys, xs].astype(np.float64)
    pc = np.stack([(xs - c.cx) / c.fx * z, (ys - c.cy) / c.fy * z, z], 1)
    T = view.cam_to_world
    return pc @ T[:3, :3].T + T[:3, 3]


def _project(view, pw):
    """Pixel positions and z-depths of world points in a view."""
    T = np.linalg.inv(view.cam_to_world)
    pc = pw @ T[:3, :3].T + T[:3, 3]
    c = view.camera
    return c.fx * pc[:, 0] / pc[:, 2] + c.cx, c.fy * pc[:, 1] / pc[:, 2] + c.cy, pc[:, 2]


def test_deterministic():
    a = make_scene(seed=5, n_views=2, width=160, height=120)
    b = make_scene(SceneSpec(seed=5, n_views=2, width=160, height=120))
    c = make_scene(seed=6, n_views=2, width=160, height=120)
    for va, vb in zip(a.views, b.views):
        assert np.array_equal(va.rgb, vb.rgb)
        assert np.array_equal(va.depth, vb.depth)
        assert np.array_equal(va.cam_to_world, vb.cam_to_world)
    assert np.array_equal(np.asarray(a.mesh.vertices), np.asarray(b.mesh.vertices))
    assert not np.array_equal(a.views[0].rgb, c.views[0].rgb)


def test_views_and_cameras(arc):
    assert len(arc.views) == 4
    for v in arc.views:
        assert v.rgb.shape == (480, 640, 3) and v.rgb.dtype == np.uint8
        assert v.depth.shape == (480, 640) and v.depth.dtype == np.float32
        assert v.camera.source == "synthetic"
        assert v.camera.fx == pytest.approx(320 / np.tan(np.radians(30)))
        R = v.cam_to_world[:3, :3]
        assert np.allclose(R @ R.T, np.eye(3), atol=1e-9) and np.linalg.det(R) == pytest.approx(1.0)


def test_depth_closed_room(arc, orbit):
    for v in arc.views + orbit.views:
        assert np.all(np.isfinite(v.depth))
        assert (v.depth > 0).mean() > 0.999
        assert v.depth.max() < np.linalg.norm(arc.spec.room_size)


def test_backprojection_lands_on_mesh(arc, orbit):
    rng = np.random.default_rng(0)
    for scene in (arc, orbit):
        rs = scene.raycaster()
        for v in scene.views:
            xs = rng.integers(0, v.camera.width, 3000)
            ys = rng.integers(0, v.camera.height, 3000)
            pw = _backproject(v, xs, ys)
            d = rs.compute_distance(o3d.core.Tensor(pw.astype(np.float32))).numpy()
            assert d.max() < 1e-3


def test_cameras_inside_room_and_clear_of_objects(arc, orbit):
    for scene in (arc, orbit):
        W, H, D = scene.spec.room_size
        rs = scene.raycaster()
        for v in scene.views:
            x, y, z = v.cam_to_world[:3, 3]
            assert abs(x) < W / 2 and 0 < y < H and abs(z) < D / 2
            assert 1.35 <= y <= 1.65
            d = rs.compute_distance(o3d.core.Tensor(np.array([[x, y, z]], np.float32))).numpy()[0]
            assert d > 0.5


def test_arc_path_steps(arc):
    for i in range(len(arc.views) - 1):
        T = arc.relative_pose(i, i + 1)
        step = np.linalg.norm(T[:3, 3])
        angle = np.degrees(np.arccos(np.clip((np.trace(T[:3, :3]) - 1) / 2, -1, 1)))
        assert 0.15 < step < 0.35
        assert 2.0 < angle < 12.0


def test_relative_pose_consistent(arc):
    rng = np.random.default_rng(1)
    pw = rng.uniform(-2, 2, (50, 3))
    for i, j in [(0, 1), (0, 3), (2, 1)]:
        T = arc.relative_pose(i, j)
        wi, wj = np.linalg.inv(arc.views[i].cam_to_world), np.linalg.inv(arc.views[j].cam_to_world)
        xi = pw @ wi[:3, :3].T + wi[:3, 3]
        xj = pw @ wj[:3, :3].T + wj[:3, 3]
        assert np.allclose(xi @ T[:3, :3].T + T[:3, 3], xj, atol=1e-9)
        assert np.allclose(T @ arc.relative_pose(j, i), np.eye(4), atol=1e-9)
    assert np.allclose(arc.relative_pose(2, 2), np.eye(4))


@pytest.mark.parametrize("pair", [(0, 1), (0, 3), (3, 1)])
def test_matches_reproject(arc, pair):
    i, j = pair
    m = arc.matches(i, j)
    assert m.shape == (480, 640, 2) and m.dtype == np.float32
    ys, xs = np.nonzero(np.isfinite(m[..., 0]))
    assert len(xs) > 1000
    sel = np.random.default_rng(2).choice(len(xs), 500, replace=False)
    xs, ys = xs[sel], ys[sel]
    u, v, z = _project(arc.views[j], _backproject(arc.views[i], xs, ys))
    assert np.allclose(m[ys, xs, 0], u, atol=1e-3) and np.allclose(m[ys, xs, 1], v, atol=1e-3)
    # Visible points agree with view j's own depth at the matched pixel (away from depth edges).
    dj = arc.views[j].depth[np.round(v).astype(int), np.round(u).astype(int)]
    assert np.mean(np.abs(dj - z) < 0.02 * z) > 0.95
    # A pixel matched to itself.
    ident = arc.matches(i, i)
    grid = np.stack(np.meshgrid(np.arange(640), np.arange(480)), -1)
    assert np.nanmax(np.abs(ident - grid)) < 1e-3


def test_occluded_and_outside_are_nan(orbit):
    i, j = 0, len(orbit.views) - 1
    m = orbit.matches(i, j)
    vi, vj = orbit.views[i], orbit.views[j]
    H, W = vi.depth.shape
    ys, xs = np.mgrid[0:H, 0:W]
    xs, ys = xs.ravel(), ys.ravel()
    u, v, z = _project(vj, _backproject(vi, xs, ys))
    inside = (z > 0) & (u >= 1) & (u <= W - 2) & (v >= 1) & (v <= H - 2)
    outside = (z <= 0) | (u < -1) | (u > W) | (v < -1) | (v > H)
    assert outside.sum() > 100
    assert np.all(np.isnan(m[ys[outside], xs[outside]]))
    xi, yi, ui, vi_, zi = xs[inside], ys[inside], u[inside], v[inside], z[inside]
    u0, v0 = np.floor(ui).astype(int), np.floor(vi_).astype(int)
    # Occluded beyond doubt: view j sees something clearly nearer at all four neighbouring pixels.
    near = np.ones(len(zi), bool)
    for du in (0, 1):
        for dv in (0, 1):
            near &= vj.depth[v0 + dv, u0 + du] < 0.95 * zi
    assert near.sum() > 100, "test pair should contain occlusions"
    assert np.all(np.isnan(m[yi[near], xi[near]]))
    # Clearly visible: depth agrees at all four neighbours -> finite.
    agree = np.ones(len(zi), bool)
    for du in (0, 1):
        for dv in (0, 1):
            agree &= np.abs(vj.depth[v0 + dv, u0 + du] - zi) < 0.005 * zi
    assert agree.sum() > 1000
    assert np.mean(np.isfinite(m[yi[agree], xi[agree], 0])) > 0.999


def test_consecutive_views_overlap(arc, orbit):
    for scene in (arc, orbit):
        for i in range(len(scene.views) - 1):
            assert np.isfinite(scene.matches(i, i + 1)[..., 0]).mean() > 0.6
    assert np.isfinite(arc.matches(1, 0)[..., 0]).mean() > 0.6


def test_matches_resized(arc):
    full = arc.matches(0, 1)
    half = arc.matches(0, 1, pixel_size=(320, 240))
    assert half.shape == (240, 320, 2)
    ref = full[::2, ::2] / 2
    both = np.isfinite(ref[..., 0]) & np.isfinite(half[..., 0])
    assert np.mean(np.isfinite(ref[..., 0]) == np.isfinite(half[..., 0])) > 0.995
    assert np.allclose(half[both], ref[both], atol=1e-3)
    assert np.allclose(arc.depth_at(0, (320, 240)), arc.views[0].depth[::2, ::2], rtol=1e-5)


def test_images_have_texture(arc, orbit):
    sift = cv2.SIFT_create()
    for v in (arc.views[0], orbit.views[0]):
        gray = cv2.cvtColor(v.rgb, cv2.COLOR_RGB2GRAY)
        assert len(sift.detect(gray, None)) > 300
        assert cv2.Laplacian(gray, cv2.CV_64F).var() > 100
        # No large flat areas: local standard deviation over 16x16 blocks is rarely tiny.
        blocks = gray[:480 // 16 * 16, :640 // 16 * 16].reshape(30, 16, 40, 16).astype(float)
        assert np.mean(blocks.std(axis=(1, 3)) < 1.0) < 0.05


def test_save(arc, tmp_path):
    paths = arc.save(tmp_path / "out")
    assert [p.name for p in paths] == [f"view_{k:03d}.png" for k in range(4)]
    for k, p in enumerate(paths):
        assert p.is_file()
        depth = np.load(tmp_path / "out" / f"view_{k:03d}.depth.npy")
        assert depth.dtype == np.float32 and np.array_equal(depth, arc.views[k].depth)
        side = tmp_path / "out" / f"view_{k:03d}.json"
        cam = read_sidecar(side, 640, 480)
        c = arc.views[k].camera
        assert (cam.fx, cam.fy, cam.cx, cam.cy, cam.width, cam.height) == \
            pytest.approx((c.fx, c.fy, c.cx, c.cy, c.width, c.height))
        T = np.array(json.loads(side.read_text())["cam_to_world"])
        assert np.allclose(T, arc.views[k].cam_to_world)
        assert np.array_equal(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB), arc.views[k].rgb)
    mesh = o3d.io.read_triangle_mesh(str(tmp_path / "out" / "scene.ply"))
    assert len(mesh.triangles) == len(arc.mesh.triangles)


def test_spec_overrides_and_errors():
    s = make_scene(SceneSpec(seed=3), width=96, height=64, n_objects=3)
    assert s.spec.seed == 3 and s.views[0].rgb.shape == (64, 96, 3)
    with pytest.raises(ValueError):
        make_scene(trajectory="spiral", width=32, height=24)
    with pytest.raises(ValueError):
        make_scene(n_views=0, width=32, height=24)


def test_object_ids_name_the_surface_each_pixel_sees(arc):
    """Every pixel labelled with a box's id back-projects inside that box (its own frame, 2 cm slack)."""
    v = arc.views[0]
    cam = v.camera
    ys, xs = np.nonzero(v.depth > 0)
    z = v.depth[ys, xs].astype(float)
    pc = np.stack([(xs - cam.cx) / cam.fx * z, (ys - cam.cy) / cam.fy * z, z], 1)
    pw = pc @ v.cam_to_world[:3, :3].T + v.cam_to_world[:3, 3]
    ids = v.object_ids[ys, xs]
    assert (v.object_ids[v.depth == 0] == -1).all() and (ids >= 0).all()
    boxes = [o for o in arc.objects if o.kind in ("shelf", "table", "cabinet", "crate")]
    seen = 0
    for o in boxes:
        sel = ids == o.id
        if not sel.any():
            continue
        seen += 1
        c, s = np.cos(o.yaw), np.sin(o.yaw)
        R = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])  # object -> world
        local = (pw[sel] - np.asarray(o.center)) @ R
        assert np.all(np.abs(local) <= np.asarray(o.size) / 2 + 0.02), o.kind
    assert seen >= 2
    floor = pw[ids == 0]
    assert len(floor) and np.allclose(floor[:, 1], 0.0, atol=1e-3)
