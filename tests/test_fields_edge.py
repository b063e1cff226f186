"""Edge-aware densification: discontinuities, confidence, exactness, log-probabilities, registration."""

import numpy as np
import pytest

from densify import fields
from densify.fields import densify_depth, densify_depth_edge, densify_flow, densify_flow_edge
from densify.fields.adaptive import grid_within

H, W = 120, 160


def step_scene(seed=0):
    """A textured slanted wall (far) with a box in front (near); distinct colours, mild texture."""
    rng = np.random.default_rng(seed)
    gy, gx = np.mgrid[0:H, 0:W].astype(float)
    inv = 1.0 / 6.0 + 0.0004 * gx + 0.0002 * gy          # a plane: inverse depth affine in the pixel
    depth = 1.0 / inv
    box = (gx >= 53) & (gx < 111) & (gy >= 37) & (gy < 95)
    depth[box] = 2.0
    rgb = np.empty((H, W, 3), np.float32)
    rgb[:] = (70, 110, 200)
    rgb[box] = (200, 150, 60)
    rgb += rng.normal(0, 6, rgb.shape)                     # texture
    rgb[(gx.astype(int) % 23 == 0) & ~box] *= 0.8          # wall stripes (texture edges)
    return np.clip(rgb, 0, 255).astype(np.uint8), depth.astype(np.float32), box


def band(mask, r=4):
    import cv2

    m = mask.astype(np.uint8)
    e = cv2.dilate(m, np.ones((3, 3), np.uint8)) != cv2.erode(m, np.ones((3, 3), np.uint8))
    return cv2.dilate(e.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))) > 0


def answers(depth, n, sigma=0.08, seed=1):
    rng = np.random.default_rng(seed)
    pts = grid_within(W, H, n).astype(float)
    d = depth[pts[:, 1].astype(int), pts[:, 0].astype(int)] * np.exp(rng.normal(0, sigma, len(pts)))
    return pts, d


def absrel(pred, gt, m):
    return float(np.mean(np.abs(pred[m] - gt[m]) / gt[m]))


def test_edge_aware_beats_linear_near_discontinuities():
    rgb, depth, box = step_scene()
    pts, d = answers(depth, 300)
    lin = densify_depth(pts, d, (H, W)).values
    edge = densify_depth_edge(pts, d, rgb)
    assert edge.values.shape == (H, W) and edge.values.dtype == np.float32
    b = band(box)
    e_lin, e_edge = absrel(lin, depth, b), absrel(edge.values, depth, b)
    assert e_edge < 0.7 * e_lin, (e_edge, e_lin)
    # and everywhere (noise averaging within surfaces)
    allpx = np.ones_like(box)
    assert absrel(edge.values, depth, allpx) < 0.8 * absrel(lin, depth, allpx)


def test_exact_on_a_plane_without_noise():
    rgb, depth, box = step_scene()
    gy, gx = np.mgrid[0:H, 0:W]
    plane = (1.0 / (1.0 / 6.0 + 0.0004 * gx + 0.0002 * gy)).astype(np.float32)
    pts, d = answers(plane, 200, sigma=0.0)
    f = densify_depth_edge(pts, d, rgb)
    np.testing.assert_allclose(f.values, plane, rtol=2e-3)


def test_confidence_lower_near_edges_and_far_from_samples():
    rgb, depth, box = step_scene()
    pts, d = answers(depth, 300)
    f = densify_depth_edge(pts, d, rgb)
    c = f.confidence
    assert c.shape == (H, W) and c.dtype == np.float32
    assert 0.0 <= c.min() and c.max() <= 1.0
    b = band(box, 3)
    far = ~band(box, 15)
    assert c[b].mean() < 0.8 * c[far].mean()
    # Far from samples: at the answers vs half-way between them (smooth region only).
    xi, yi = pts[:, 0].astype(int), pts[:, 1].astype(int)
    at = far[yi, xi]
    at_samples = c[yi[at], xi[at]].mean()
    s = np.sqrt(H * W / len(pts))
    mx = np.clip((xi[at] + s / 2).astype(int), 0, W - 1)
    my = np.clip((yi[at] + s / 2).astype(int), 0, H - 1)
    between = c[my, mx][far[my, mx]].mean()
    assert between < 0.9 * at_samples


def test_outliers_dropped_and_low_logprob_answers_ignored():
    rgb, depth, box = step_scene()
    pts, d = answers(depth, 300, sigma=0.05)
    rng = np.random.default_rng(3)
    bad = rng.random(len(d)) < 0.15
    d_bad = d.copy()
    d_bad[bad] *= np.exp(rng.choice([-1, 1], bad.sum()) * 0.35)   # wrong, but not wild outliers
    lp = np.where(bad, -4.0, -0.2)
    plain = densify_depth_edge(pts, d_bad, rgb)
    with_lp = densify_depth_edge(pts, d_bad, rgb, logprobs=lp)
    allpx = np.ones_like(box)
    assert absrel(with_lp.values, depth, allpx) < 0.8 * absrel(plain.values, depth, allpx)
    # low-confidence answers lower the confidence map around them
    assert with_lp.confidence.mean() < plain.confidence.mean()
    # NaN answers are skipped, `used` marks kept answers
    d_nan = d.copy()
    d_nan[:5] = np.nan
    f = densify_depth_edge(pts, d_nan, rgb)
    assert not f.used[:5].any() and np.isfinite(f.values).all()


def test_without_image_and_degenerate_inputs():
    _, depth, _ = step_scene()
    pts, d = answers(depth, 100)
    f = densify_depth_edge(pts, d, None, shape=(H, W))
    assert np.isfinite(f.values).all()
    empty = densify_depth_edge(pts[:0], d[:0], None, shape=(H, W))
    assert np.isnan(empty.values).all() and (empty.confidence == 0).all()
    few = densify_depth_edge(pts[:2], d[:2], None, shape=(H, W))
    assert np.isfinite(few.values).all()
    with pytest.raises(ValueError):
        densify_depth_edge(pts, d, None)


def test_flow_exact_on_affine_flow():
    rgb, _, _ = step_scene()
    A = np.array([[1.02, 0.03], [-0.02, 0.97]])
    t = np.array([5.5, -3.25])
    pts = grid_within(W, H, 150).astype(float)
    tgt = pts @ A.T + t
    f = densify_flow_edge(pts, tgt, rgb)
    gy, gx = np.mgrid[0:H, 0:W]
    truth = np.stack([gx, gy], -1) @ A.T + t
    assert f.values.shape == (H, W, 2)
    np.testing.assert_allclose(f.values, truth, atol=2e-2)
    assert f.used.all()


def test_flow_edge_on_scene_matches_beats_linear_near_motion_boundaries():
    from densify.synthetic.scenes import SceneSpec, make_scene

    scene = make_scene(SceneSpec(seed=4, n_views=2, width=320, height=240, step_m=0.4, step_deg=4.0))
    m = scene.matches(0, 1)
    rgb = scene.views[0].rgb
    h, w = m.shape[:2]
    rng = np.random.default_rng(0)
    pts = grid_within(w, h, 600)
    tgt = m[pts[:, 1], pts[:, 0]].astype(float) + rng.normal(0, 1.0, (len(pts), 2))
    ok = np.isfinite(m).all(-1)
    disp = np.linalg.norm(m - np.stack(np.mgrid[0:h, 0:w][::-1], -1), axis=-1)
    # motion boundaries: neighbouring displacements differ by > 1.5 px
    gyy, gxx = np.gradient(np.where(ok, disp, np.nan))
    mb = np.nan_to_num(np.hypot(gxx, gyy), nan=0.0) > 1.5
    import cv2

    mb = (cv2.dilate(mb.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0) & ok
    lin = densify_flow(pts, tgt, (h, w)).values
    edge = densify_flow_edge(pts, tgt, rgb)
    e_lin = np.linalg.norm(lin - m, axis=-1)
    e_edge = np.linalg.norm(edge.values - m, axis=-1)
    assert np.nanmean(e_edge[ok]) < np.nanmean(e_lin[ok])
    if mb.sum() > 50:
        assert np.nanmean(e_edge[mb]) < 1.05 * np.nanmean(e_lin[mb])


def test_registered_for_the_pipeline():
    assert fields.densify_depth_edge is densify_depth_edge
    assert fields.densify_flow_edge is densify_flow_edge
