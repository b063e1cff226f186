"""Relative pose: essential matrix, PnP metric scale, verdicts, VLM3-pose answers, pose graph, metrics."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from densify.config.profiles import load_profile
from densify.eval.pose_eval import pose_auc, pose_errors, translation_error_deg
from densify.geometry.pose import PairPose, PoseConfig, estimate_pair_pose, pose_matrix
from densify.geometry.posegraph import PoseEdge, connected_components, optimize_poses
from densify.geometry.rotations import rotation_angle_deg
from densify.io.cameras import Camera
from densify.pairs.matching import corr_view, match_pair
from densify.pairs.vlm_pose import ask_pose, compare_poses, pose_view, vlm_answer_from_T
from densify.sim.engine import SimulatedEngine
from densify.sim.truth import SceneTruth


def _random_T(rng, rot_deg=10.0, trans=0.5):
    R = Rotation.from_rotvec(np.radians(rot_deg) * rng.normal(size=3) / np.sqrt(3)).as_matrix()
    return pose_matrix(R, rng.normal(size=3) * trans / np.sqrt(3))


def _project(X, T, cam):
    Xc = X @ T[:3, :3].T + T[:3, 3]
    return np.stack([cam.fx * Xc[:, 0] / Xc[:, 2] + cam.cx, cam.fy * Xc[:, 1] / Xc[:, 2] + cam.cy], 1), Xc[:, 2]


def _synthetic_pair(rng, T, cam1, cam2, n=300, noise=0.0):
    """Points in front of camera 1 (depth 2-6 m), seen by both cameras."""
    xy1 = rng.uniform([0, 0], [cam1.width, cam1.height], (n * 3, 2))
    z = rng.uniform(2, 6, n * 3)
    X = np.stack([(xy1[:, 0] - cam1.cx) / cam1.fx * z, (xy1[:, 1] - cam1.cy) / cam1.fy * z, z], 1)
    xy2, z2 = _project(X, T, cam2)
    ok = (z2 > 0) & (xy2[:, 0] >= 0) & (xy2[:, 0] < cam2.width) & (xy2[:, 1] >= 0) & (xy2[:, 1] < cam2.height)
    xy1, xy2, z = xy1[ok][:n], xy2[ok][:n], z[ok][:n]
    if noise:
        xy1 = xy1 + rng.normal(0, noise, xy1.shape)
        xy2 = xy2 + rng.normal(0, noise, xy2.shape)
    return xy1, xy2, z


def _depth_map(cam, xy, z):
    """A depth map holding z at the given pixels (NaN elsewhere)."""
    d = np.full((cam.height, cam.width), np.nan, np.float32)
    d[np.round(xy[:, 1]).astype(int).clip(0, cam.height - 1), np.round(xy[:, 0]).astype(int).clip(0, cam.width - 1)] = z
    return d


CAM = Camera(500.0, 500.0, 320.0, 240.0, 640, 480)


def test_essential_pose_from_exact_matches():
    rng = np.random.default_rng(0)
    T = _random_T(rng)
    xy1, xy2, _ = _synthetic_pair(rng, T, CAM, CAM)
    p = estimate_pair_pose(xy1, xy2, CAM, CAM)
    e = pose_errors(p, T)
    assert p.verdict == "good" and p.source == "essential"
    assert e["rot_deg"] < 0.05 and e["trans_deg"] < 0.2
    assert p.t_metric is None and p.T is None
    assert p.inliers > 280


def test_different_intrinsics_are_normalised_separately():
    rng = np.random.default_rng(1)
    cam2 = Camera(800.0, 780.0, 400.0, 250.0, 800, 520)
    T = _random_T(rng, 8, 0.4)
    xy1, xy2, z = _synthetic_pair(rng, T, CAM, cam2, noise=0.5)
    p = estimate_pair_pose(xy1, xy2, CAM, cam2, depth1=_depth_map(CAM, xy1, z))
    e = pose_errors(p, T)
    assert e["rot_deg"] < 0.5 and e["trans_deg"] < 3.0
    assert e["trans_m"] < 0.02


def test_pnp_gives_metric_translation():
    rng = np.random.default_rng(2)
    T = _random_T(rng, 6, 0.3)
    xy1, xy2, z = _synthetic_pair(rng, T, CAM, CAM, noise=0.5)
    exact = estimate_pair_pose(xy1, xy2, CAM, CAM, depth1=_depth_map(CAM, np.round(xy1), z))
    assert exact.T is not None
    assert np.linalg.norm(exact.t_metric - T[:3, 3]) < 0.01
    assert exact.source == "pnp" and exact.verdict == "good"
    noisy_z = z * np.exp(rng.normal(0, 0.1, len(z)))  # 10 % independent depth noise per point
    noisy = estimate_pair_pose(xy1, xy2, CAM, CAM, depth1=_depth_map(CAM, np.round(xy1), noisy_z))
    # independent 3D-point noise dilutes PnP's translation a little (errors in variables)
    assert np.linalg.norm(noisy.t_metric - T[:3, 3]) < 0.15 * np.linalg.norm(T[:3, 3])
    assert noisy.details["essential_vs_pnp_rotation_deg"] < 1.0
    ess = estimate_pair_pose(xy1, xy2, CAM, CAM, depth1=_depth_map(CAM, np.round(xy1), noisy_z),
                             cfg=PoseConfig(prefer="essential"))
    assert ess.source == "essential" and pose_errors(ess, T)["trans_deg"] < 2.0
    assert np.linalg.norm(ess.t_metric - T[:3, 3]) < 0.15 * np.linalg.norm(T[:3, 3])


def test_pure_rotation_is_detected():
    rng = np.random.default_rng(3)
    T = pose_matrix(Rotation.from_euler("y", 8, degrees=True).as_matrix(), np.zeros(3))
    xy1, xy2, z = _synthetic_pair(rng, T, CAM, CAM, noise=0.7)
    p = estimate_pair_pose(xy1, xy2, CAM, CAM)
    assert p.verdict == "failed" and "pure rotation" in p.reason
    assert p.R is not None and rotation_angle_deg(p.R @ T[:3, :3].T) < 1.0   # the rotation itself is fine
    # with depth, PnP still gives a (weak) metric pose: translation about zero
    q = estimate_pair_pose(xy1, xy2, CAM, CAM, depth1=_depth_map(CAM, np.round(xy1), z))
    assert q.verdict == "weak" and q.source == "pnp" and "pure rotation" in q.reason
    assert np.linalg.norm(q.t_metric) < 0.05


def test_bad_pairs_fail_with_reasons():
    rng = np.random.default_rng(4)
    few = estimate_pair_pose(rng.uniform(0, 400, (8, 2)), rng.uniform(0, 400, (8, 2)), CAM, CAM)
    assert few.verdict == "failed" and few.reason.startswith("too few matches")
    junk = estimate_pair_pose(rng.uniform(0, 480, (300, 2)), rng.uniform(0, 480, (300, 2)), CAM, CAM)
    assert junk.verdict == "failed"
    assert any(k in junk.reason for k in ("inlier", "degenerate", "pure rotation"))
    d = junk.to_dict()
    assert d["verdict"] == "failed" and d["reason"]
    again = PairPose.from_dict(d)
    assert again.verdict == "failed"


def test_weak_verdict_with_many_outliers():
    rng = np.random.default_rng(5)
    T = _random_T(rng)
    xy1, xy2, _ = _synthetic_pair(rng, T, CAM, CAM, n=300, noise=0.5)
    k = 180
    xy2[:k] = rng.uniform([0, 0], [640, 480], (k, 2))
    p = estimate_pair_pose(xy1, xy2, CAM, CAM)
    assert p.verdict == "weak" and "inlier ratio" in p.reason
    assert pose_errors(p, T)["rot_deg"] < 1.0


# -- with the simulated engine on a rendered scene

@pytest.fixture(scope="module")
def scene():
    from densify.synthetic.scenes import SceneSpec, make_scene

    return make_scene(SceneSpec(seed=5, n_views=3, width=320, height=240, step_m=0.35))


def test_essential_pose_from_simulated_answers_default_noise(scene):
    prof = load_profile("vlm3-corr")
    eng = SimulatedEngine(prof, seed=0, truth=SceneTruth(scene, {"v0": 0, "v1": 1, "v2": 2}))
    v = [corr_view(f"v{k}", s.rgb, s.camera, prof) for k, s in enumerate(scene.views)]
    for i, j in [(0, 1), (0, 2)]:
        m = match_pair(eng, prof, v[i], v[j])
        p = estimate_pair_pose(*m.pairs(), scene.views[i].camera, scene.views[j].camera,
                               depth1=scene.views[i].depth)
        e = pose_errors(p, scene.relative_pose(i, j))
        assert p.ok, p.reason
        assert e["rot_deg"] < 2.0 and e["trans_deg"] < 6.0, e
        assert e["trans_m"] < 0.05, e


def test_vlm_pose_answers_round_trip(scene):
    prof = load_profile("vlm3-pose")
    T = scene.relative_pose(0, 2)
    p1, p2 = pose_view(scene.views[0].rgb, scene.views[0].camera, prof), pose_view(scene.views[2].rgb,
                                                                                   scene.views[2].camera, prof)
    truth = SceneTruth(scene, {"a": 0, "b": 2})
    exact = ask_pose(SimulatedEngine(prof, noise=False, truth=truth), prof, p1, p2, id1="a", id2="b")
    ypr, d, dist = vlm_answer_from_T(T)
    np.testing.assert_allclose(exact.euler, ypr, atol=0.06)   # answers carry one decimal
    assert exact.distance == pytest.approx(dist, abs=0.006)
    pp = exact.pair_pose()
    e = pose_errors(pp, T)
    assert pp.source == "vlm" and pp.verdict == "good"
    assert e["rot_deg"] < 0.15 and translation_error_deg(pp.t, T[:3, 3], fold=False) < 1.0
    assert e["trans_m"] < 0.01
    noisy = ask_pose(SimulatedEngine(prof, seed=1, truth=truth), prof, p1, p2, id1="a", id2="b").pair_pose()
    assert pose_errors(noisy, T)["rot_deg"] < 12
    cc = compare_poses(pp, noisy)
    assert 0 <= cc["rotation_deg"] < 12 and cc["direction_deg"] is not None


def test_vlm_pose_unanswerable_gives_failure_record(scene):
    prof = load_profile("vlm3-pose")
    p1 = pose_view(scene.views[0].rgb, scene.views[0].camera, prof)
    vp = ask_pose(SimulatedEngine(prof, seed=0, truth=SceneTruth(scene, {})), prof, p1, p1, id1="a", id2="b")
    pp = vp.pair_pose()  # no truth: every answer is an engine error, never an invented pose
    assert pp.verdict == "failed" and "missing" in pp.reason
    assert set(vp.failures.values()) == {"engine_error"}
    assert vp.failures


# -- pose graph

def test_pose_graph_recovers_trajectory_and_prunes_a_bad_loop_edge():
    rng = np.random.default_rng(7)
    n = 8
    c2w = [np.eye(4)]
    for _ in range(n - 1):
        step = pose_matrix(Rotation.from_euler("y", 6, degrees=True).as_matrix(), [0.0, 0.0, 0.25])
        c2w.append(c2w[-1] @ step)
    edges = []
    for i in range(n):
        for j in (i + 1, i + 2):
            if j >= n:
                continue
            T = np.linalg.inv(c2w[j]) @ c2w[i]
            noisy = pose_matrix(Rotation.from_rotvec(rng.normal(0, 0.003, 3)).as_matrix() @ T[:3, :3],
                                T[:3, 3] + rng.normal(0, 0.01, 3))
            edges.append(PoseEdge(i, j, noisy, weight=100.0, uncertain=j - i > 1))
    bad = _random_T(rng, 40, 1.0)
    edges.append(PoseEdge(1, 5, bad, weight=100.0, uncertain=True))
    res = optimize_poses(list(range(n)), edges)
    assert res.reference == 0 and res.dropped == []
    err = [np.linalg.norm(res.cam_to_world[k][:3, 3] - c2w[k][:3, 3]) for k in range(n)]
    assert max(err) < 0.08, err
    assert (1, 5) in res.pruned_edges


def test_pose_graph_keeps_the_largest_component():
    T = pose_matrix(np.eye(3), [0, 0, 0.2])
    edges = [PoseEdge(0, 1, T), PoseEdge(2, 3, T), PoseEdge(3, 4, T)]
    assert connected_components(list(range(6)), edges)[0] == [2, 3, 4]
    res = optimize_poses(list(range(6)), edges)
    assert res.component == [2, 3, 4] and res.dropped == [0, 1, 5]
    np.testing.assert_allclose(res.cam_to_world[4][:3, 3], [0, 0, -0.4], atol=1e-6)


def test_pose_auc_matches_the_definition():
    assert pose_auc([0.0] * 4)["auc@5"] == pytest.approx(1.0)
    assert pose_auc([np.inf] * 3)["auc@10"] == 0.0
    # one error at 0 and one failure: recall 0.5 over the whole range
    assert pose_auc([0.0, np.inf], (10,))["auc@10"] == pytest.approx(0.5, abs=1e-9)
    # uniform errors on [0, 10]: AUC@10 about 0.5
    assert pose_auc(np.linspace(0, 10, 1001), (10,))["auc@10"] == pytest.approx(0.5, abs=0.01)
