"""Correspondences: corr answers -> matches in original pixels, forward-backward check, flow, tracks plan."""

import json

import numpy as np
import pytest

from densify.config.profiles import load_profile
from densify.eval.pose_eval import match_epe
from densify.io.cameras import PixelMap
from densify.pairs.matching import Matches, corr_view, dense_flow, match_pair, plan_pair, sift_matches, track_points
from densify.sim.engine import ErrorModel, SimulatedEngine, corr_truth
from densify.sim.truth import SceneTruth


@pytest.fixture(scope="module")
def scene():
    from densify.synthetic.scenes import SceneSpec, make_scene

    return make_scene(SceneSpec(seed=2, n_views=3, width=320, height=240))


@pytest.fixture(scope="module")
def corr_profile():
    return load_profile("vlm3-corr")


@pytest.fixture(scope="module")
def views(scene, corr_profile):
    return [corr_view(f"v{k}", v.rgb, v.camera, corr_profile) for k, v in enumerate(scene.views)]


def _sim(scene, profile, **kw):
    """A simulated corr engine that knows the scene (views named v0, v1, ...)."""
    return SimulatedEngine(profile, truth=SceneTruth(scene, {f"v{k}": k for k in range(len(scene.views))}), **kw)


def test_corr_truth_maps_original_matches_into_both_preprocessed_frames():
    h, w = 40, 60
    orig = np.full((h, w, 2), np.nan, np.float32)
    orig[10, 20] = (30.0, 15.0)          # pixel (20, 10) of image 1 -> (30, 15) in image 2
    p1 = PixelMap((w, h), (120, 80), 1000)   # image 1 doubled
    p2 = PixelMap((90, 45), (180, 90), 1000)  # image 2 another size, doubled
    m = corr_truth(orig, p1, p2)
    assert m.shape == (80, 120, 2)
    np.testing.assert_allclose(m[20, 40], (60.0, 30.0))   # sampled at pre (40, 20) = orig (20, 10); scaled x2
    assert np.isnan(m[0, 0]).all()


def test_exact_answers_map_back_to_original_pixels(scene, views, corr_profile):
    eng = _sim(scene, corr_profile, noise=False)
    m = match_pair(eng, corr_profile, views[0], views[1], fb_check=False)
    assert len(m) == 24 * 18
    gt = scene.matches(0, 1)
    e = match_epe(*m.pairs(), gt)
    vis = np.isfinite(e)
    assert vis.sum() > 250
    assert np.mean(e[vis]) < 1.5, np.mean(e[vis])
    # the asked positions are the prompt coordinates mapped back (within half a prompt unit of the grid)
    grid = plan_pair(views[0])
    assert np.abs(m.xy1 - grid.pixels).max() <= 0.5 * 320 / 1000 + 1e-9


def test_default_noise_gives_pixel_level_matches(scene, views, corr_profile):
    eng = _sim(scene, corr_profile, seed=1)
    m = match_pair(eng, corr_profile, views[0], views[1])
    e = match_epe(*m.pairs(), scene.matches(0, 1))
    e = e[np.isfinite(e)]
    # corr_sigma 4 of 1000 -> 1.3 px per axis at 320 px wide
    assert 0.5 < np.median(e) < 3.0
    assert m.n_valid > 200


def test_forward_backward_check_drops_injected_outliers(scene, views, corr_profile):
    err = ErrorModel(outlier_rate=0.25, unparseable_rate=0.0, corr_sigma=2.0)
    eng = _sim(scene, corr_profile, seed=3, error=err)
    gt = scene.matches(0, 1)
    raw = match_pair(eng, corr_profile, views[0], views[1], fb_check=False)
    checked = match_pair(eng, corr_profile, views[0], views[1], fb_check=True, fb_thresh_px=6.0)
    bad_raw = np.sum(np.nan_to_num(match_epe(*raw.pairs(), gt), nan=1e3) > 20)
    bad_checked = np.sum(np.nan_to_num(match_epe(*checked.pairs(), gt), nan=1e3) > 20)
    assert bad_raw > 60                      # about a quarter of 432, plus points not visible in image 2
    assert bad_checked <= 0.02 * checked.n_valid
    assert checked.failure_counts().get("fb_rejected", 0) >= bad_raw * 0.8
    assert checked.n_valid > 150
    fb = checked.fb_error[checked.valid]
    assert np.all(fb <= 6.0)


def test_failures_are_recorded_per_answer(scene, views, corr_profile):
    eng = _sim(scene, corr_profile, seed=4, error=ErrorModel(unparseable_rate=0.3))
    m = match_pair(eng, corr_profile, views[0], views[1])
    counts = m.failure_counts()
    assert counts.get("no_match", 0) > 50
    recs = list(m.records())
    assert len(recs) == len(m)
    json.dumps(recs)
    bad = [r for r in recs if not r["valid"]]
    assert all(r["failure"] for r in bad)
    assert any(r["failure"] == "no_match" and r["xy2"] is None for r in bad)


def test_matches_save_load_roundtrip(tmp_path, scene, views, corr_profile):
    eng = _sim(scene, corr_profile, seed=5)
    m = match_pair(eng, corr_profile, views[1], views[2])
    m.save(tmp_path / "m.npz", inliers=m.valid)
    back = Matches.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(back.valid, m.valid)
    np.testing.assert_allclose(back.pairs()[1], m.pairs()[1])
    assert (back.id1, back.id2) == ("v1", "v2")


def test_dense_flow_passes_through_matches(scene, views, corr_profile):
    eng = _sim(scene, corr_profile, noise=False)
    m = match_pair(eng, corr_profile, views[0], views[1], fb_check=False)
    flow = dense_flow(m)
    assert flow.values.shape == (240, 320, 2)
    a, b = m.pairs()
    # at integer sample positions the flow reproduces the match (interpolation is exact at samples)
    xi, yi = np.round(a[:, 0]).astype(int), np.round(a[:, 1]).astype(int)
    d = np.hypot(*(flow.values[yi, xi] - b).T)
    assert np.median(d) < 0.5


def test_track_points_ask_where_earlier_answers_landed():
    grid = (8, 6)
    base = track_points(320, 240, grid, None)
    carried = np.array([[21.3, 17.9], [25.0, 19.0], [300.2, 230.1], [-5, 3], [np.nan, 4]])
    pts = track_points(320, 240, grid, carried)
    assert len(pts) == len(base) == 48
    # cell (0, 0) takes the carried point nearest its centre (20, 20); the far corner cell its point
    np.testing.assert_allclose(pts[0], (21.3, 17.9))
    np.testing.assert_allclose(pts[-1], (300.2, 230.1))
    assert np.sum(np.any(pts != base, axis=1)) == 2


def test_track_query_reuses_the_answer_prompt(scene, views, corr_profile):
    """A landed answer asked again from image 2 gives the same prompt coordinates: keypoints chain exactly."""
    eng = _sim(scene, corr_profile, seed=6)
    m = match_pair(eng, corr_profile, views[0], views[1])
    landed = m.pairs()[1]
    pts = track_points(320, 240, (24, 18), landed)
    plan = plan_pair(views[1], pts)
    asked = {tuple(p) for p in np.round(np.stack(views[1].prep.pixel_map.prompt_to_orig(*plan.prompt_xy.T), 1), 6)}
    hits = sum(tuple(p) in asked for p in np.round(landed, 6))
    assert hits > 0.5 * len(landed)


def test_sift_baseline_matches(scene):
    a, b = sift_matches(scene.views[0].rgb, scene.views[1].rgb)
    assert len(a) > 50
    e = match_epe(a, b, scene.matches(0, 1))
    assert np.nanmedian(e) < 1.5


def test_edge_flow_beats_linear_against_true_flow(scene, views, corr_profile):
    """The image-guided flow densifier (the default in reconstruct) is closer to the scene's true flow."""
    eng = _sim(scene, corr_profile, seed=0)
    m = match_pair(eng, corr_profile, views[0], views[1], fb_check=True)
    true = scene.matches(0, 1)
    ok = np.all(np.isfinite(true), axis=-1)
    errs = {}
    for method in ("linear", "edge"):
        f = dense_flow(m, method=method, rgb1=scene.views[0].rgb)
        errs[method] = float(np.median(np.hypot(*(f.values[ok] - true[ok]).T)))
    assert errs["edge"] < errs["linear"]
    with pytest.raises(ValueError, match="rgb1"):
        dense_flow(m, method="edge")
