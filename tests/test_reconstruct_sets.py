"""Reconstructing image sets that are not a neat sequence: pair selection, probes, loops, pair fingerprints,
video input, and the files viewers open (scene.glb, COLMAP binary)."""

import json

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from densify.config.loading import ConfigError, dict_overrides
from densify.config.profiles import load_profile
from densify.eval.pose_eval import trajectory_error
from densify.geometry.pose import pose_matrix
from densify.geometry.posegraph import PoseEdge, PoseGraphConfig, information_from_points, optimize_poses
from densify.io.images import discover
from densify.io.video import extract_frames
from densify.pairs.select import (PairsConfig, exhaustive_pairs, global_descriptors, read_pairs_file,
                                  retrieval_pairs, select_pairs)
from densify.sim.engine import SimulatedEngine
from densify.sim.truth import SceneTruth
from densify.stages.scene import reconstruct
from densify.stages.settings import ReconstructConfig, load_config

SMALL = ["--engine", "simulated", "--grid", "16", "12", "--set", "depth.plan.count=600",
         "--set", "fusion.voxel_length=0.05", "--set", "fusion.sdf_trunc=0.2"]


def _scene(**kw):
    from densify.synthetic.scenes import SceneSpec, make_scene

    return make_scene(SceneSpec(width=320, height=240, **kw))


@pytest.fixture(scope="module")
def turning():
    """Six views turning 30 degrees each: neighbours overlap by ~45%, views 2+ apart hardly or not at all."""
    return _scene(seed=4, n_views=6, step_deg=30.0)


@pytest.fixture(scope="module")
def walk():
    return _scene(seed=4, n_views=7, step_deg=12.0)


def _overlap(scene, i, j) -> float:
    return min(np.isfinite(scene.matches(i, j)[..., 0]).mean(), np.isfinite(scene.matches(j, i)[..., 0]).mean())


# -- selection

def test_pairs_settings_take_a_mode_name_and_check_the_file_mode():
    assert PairsConfig.model_validate("exhaustive").mode == "exhaustive"
    assert PairsConfig.model_validate("+skip2").mode == "consecutive+skip2"
    with pytest.raises(ValueError, match="pairs.file"):
        PairsConfig.model_validate({"mode": "file"})
    cfg = load_config(ReconstructConfig, None, dict_overrides({"pairs": "retrieval"}), default_name="reconstruct")
    assert cfg.pairs.mode == "retrieval" and cfg.pairs.per_image == 5
    assert exhaustive_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def test_retrieval_keeps_k_per_image_a_spanning_tree_and_the_loop_gap():
    sim = np.eye(6)
    for i in range(5):
        sim[i, i + 1] = sim[i + 1, i] = 0.9
    sim[0, 5] = sim[5, 0] = 0.8
    pairs = retrieval_pairs(sim, 1)
    assert (0, 1) in pairs and all(isinstance(a, int) for p in pairs for a in p)
    # the spanning tree links every image even with k = 1
    from densify.geometry.posegraph import PoseEdge, connected_components
    assert len(connected_components(list(range(6)), [PoseEdge(i, j, np.eye(4)) for i, j in pairs])) == 1
    # loop candidates: never closer than the gap in the sequence
    loops = retrieval_pairs(sim, 1, min_gap=3, spanning_tree=False)
    assert (0, 5) in loops and all(j - i >= 3 for i, j in loops)


def test_retrieval_finds_the_overlapping_pairs(walk):
    """The global descriptor ranks overlapping views first: each image's 2 best are true overlaps."""
    n = len(walk.views)
    d = global_descriptors([v.rgb for v in walk.views])
    assert d.shape[0] == n and np.allclose(np.linalg.norm(d, axis=1), 1, atol=1e-5)
    pairs = retrieval_pairs(d @ d.T, 2, spanning_tree=False)
    true = {(i, j) for i in range(n) for j in range(i + 1, n) if _overlap(walk, i, j) >= 0.3}
    hits = [p in true for p in pairs]
    assert np.mean(hits) >= 0.8, (pairs, sorted(true))
    assert len(set(pairs) & true) >= 0.6 * len(true)


def test_pairs_file_in_hloc_format(tmp_path):
    (tmp_path / "a").mkdir()
    paths = [tmp_path / "a" / "x.png", tmp_path / "a" / "y.png", tmp_path / "b.png"]
    ids = ["x", "y", "b"]
    f = tmp_path / "pairs.txt"
    f.write_text("# hloc pairs\nx.png y.png\na/y.png b.png\n\nb x\nx.png x.png\nnot_there.png b.png\n")
    pairs, rep = read_pairs_file(f, paths, ids)
    assert pairs == [(0, 1), (0, 2), (1, 2)] and rep["unknown_names"] == ["not_there.png"]
    f.write_text("x.png y.png b.png\n")
    with pytest.raises(ConfigError, match="line 1: expected 'name1 name2'"):
        read_pairs_file(f, paths, ids)
    f.write_text("p.png q.png\n")
    with pytest.raises(ConfigError, match="none of its 1 pair"):
        read_pairs_file(f, paths, ids)
    (tmp_path / "p2.txt").write_text("y b\n")
    sel = select_pairs(PairsConfig(mode="file", file=str(tmp_path / "p2.txt")), paths, ids)
    assert sel.pairs == [(1, 2)] and sel.kind(1, 2) == "candidate"


# -- probes

def test_a_pair_that_does_not_overlap_costs_only_its_probe(tmp_path, turning):
    """Every pair of a turning camera: neighbours are asked in full; the rest stop after the probe (48 points
    + their round trips), are recorded as no_overlap and are not failures of the run."""
    from pipelines.cli import main

    turning.save(tmp_path / "scene")
    out = tmp_path / "out"
    rc = main(["-q", "reconstruct", str(tmp_path / "scene"), "--out", str(out), "--pairs", "exhaustive", *SMALL])
    s = json.loads((out / "summary.json").read_text())
    assert rc == 0 and s["posed"] == 6 and s["pairs"] == 15
    rec = {tuple(r["index"]): r for r in map(json.loads, (out / "pairs.jsonl").read_text().splitlines())}
    for (i, j), r in rec.items():
        ov = _overlap(turning, i, j)
        if ov >= 0.3:
            assert r["status"] == "ok" and r["matches"]["probe"]["verified"], (i, j, ov, r)
            assert r["matches"]["asked"] == 16 * 12  # the probe's points are part of the grid: none asked twice
        if ov < 0.01:
            assert r["status"] == "failed" and r["error_kind"] == "no_overlap", (i, j, ov, r)
            assert r["matches"]["asked"] == 48 and r["matches"]["asked_backward"] <= 48
    no = [r for r in rec.values() if r.get("error_kind") == "no_overlap"]
    assert s["pairs_no_overlap"] == len(no) >= 6
    assert s["pair_queries_no_overlap"] <= 96 * len(no)
    assert s["pair_queries"] < 0.5 * 15 * 2 * 16 * 12  # vs asking every pair's whole grid


# -- unordered sets, and what viewers open

@pytest.fixture(scope="module")
def unordered(tmp_path_factory, walk):
    """The walk saved under shuffled names: the file order says nothing about the path."""
    from pipelines.cli import main

    root = tmp_path_factory.mktemp("unordered")
    order = [4, 0, 6, 2, 5, 1, 3]  # view k is saved as the order[k]-th name
    names = [f"photo_{c}" for c in "qwertyu"]
    names = [names[order[k]] for k in range(len(walk.views))]
    walk.save(root / "scene", names=names)
    out = root / "out"
    rc = main(["-q", "reconstruct", str(root / "scene"), "--out", str(out), "--pairs", "retrieval",
               "--pairs-per-image", "3", *SMALL])
    return rc, out, names


def test_an_unordered_set_is_fully_posed(unordered, walk):
    rc, out, names = unordered
    s = json.loads((out / "summary.json").read_text())
    assert rc == 0 and s["posed"] == 7 and not s["dropped"], s["dropped"]
    assert s["pair_selection"]["mode"] == "retrieval" and "VLAD" in s["pair_selection"]["descriptor"]
    frames = {f["id"]: np.asarray(f["cam_to_world"]) for f in json.loads((out / "poses.json").read_text())["frames"]}
    gt = {names[k]: v.cam_to_world for k, v in enumerate(walk.views)}
    err = trajectory_error(frames, gt, s["reference"])
    assert err["n"] == 7 and err["ate_rmse_m"] < 0.08 and err["rot_mean_deg"] < 2.0, err


def test_glb_opens_in_trimesh_with_the_mesh_and_every_camera(unordered):
    import open3d as o3d
    import trimesh

    _, out, names = unordered
    scene = trimesh.load(out / "scene.glb")
    assert isinstance(scene, trimesh.Scene)
    mesh = scene.geometry["mesh"]
    ply = o3d.io.read_triangle_mesh(str(out / "mesh.ply"))
    assert len(mesh.vertices) == len(ply.vertices) and len(mesh.faces) == len(ply.triangles)
    assert mesh.visual.kind == "vertex"
    cams = {k[len("camera_"):] for k in scene.geometry if k.startswith("camera_")}
    assert cams == set(names)
    # y up: the OpenCV world (y down) is turned, so vertices are the PLY's with y and z negated
    np.testing.assert_allclose(np.asarray(mesh.vertices)[:5], np.asarray(ply.vertices)[:5] * [1, -1, -1], atol=1e-5)
    # a frustum starts at its camera's centre
    poses = {f["id"]: np.asarray(f["cam_to_world"]) for f in json.loads((out / "poses.json").read_text())["frames"]}
    seg = scene.geometry[f"camera_{names[0]}"].vertices
    c = poses[names[0]][:3, 3] * [1, -1, -1]
    assert np.min(np.linalg.norm(seg - c, axis=1)) < 1e-6


def test_colmap_binary_and_text_models_agree(unordered):
    import pycolmap

    _, out, _ = unordered
    text = pycolmap.Reconstruction(str(out / "colmap"))
    binary = pycolmap.Reconstruction(str(out / "colmap" / "bin"))
    assert (out / "colmap" / "bin" / "images.bin").is_file() and (out / "colmap" / "bin" / "points3D.bin").is_file()
    assert binary.num_images() == text.num_images() == 7 and binary.num_points3D() == text.num_points3D() > 50
    for img in text.images.values():
        other = binary.find_image_with_name(img.name)
        np.testing.assert_allclose(other.cam_from_world().matrix(), img.cam_from_world().matrix(), atol=1e-9)
    assert abs(binary.compute_mean_reprojection_error() - text.compute_mean_reprojection_error()) < 1e-6


# -- pair results and their settings

def test_pairs_are_redone_only_when_their_settings_change(tmp_path, walk):
    images = walk.save(tmp_path / "scene")[:3]
    over = {"engine": {"name": "simulated"}, "corr": {"grid": [12, 9]}, "depth": {"plan": {"count": 400}},
            "export": {"colmap": False, "nerfstudio": False, "glb": False}}

    def run(extra=None):
        cfg = load_config(ReconstructConfig, None, dict_overrides({**over, **(extra or {})}),
                          default_name="reconstruct")
        engines = {st: SimulatedEngine(load_profile(p), truth=SceneTruth(walk))
                   for st, p in (("depth", "vlm3-depth"), ("corr", "vlm3-corr"), ("pose", "vlm3-pose"))}
        s = reconstruct(discover([str(p) for p in images]), cfg, tmp_path / "out", engines=engines).summary
        return s, engines["corr"].stats["queries"], engines["depth"].stats["queries"]

    s, corr_q, depth_q = run()
    assert s["posed"] == 3 and corr_q > 0 and depth_q > 0
    _, corr_q, depth_q = run()
    assert corr_q == 0 and depth_q == 0  # identical settings: every pair and image skipped
    s, corr_q, depth_q = run({"corr": {"grid": [10, 8]}})
    assert corr_q > 0 and depth_q == 0 and s["posed"] == 3  # another grid: the pairs again, not the depth
    rec = json.loads((tmp_path / "out" / "pairs" / "view_000__view_001" / "result.json").read_text())
    assert set(rec["files"]) >= {"matches.npz", "pose.json", "answers.jsonl"}
    _, corr_q, _ = run({"corr": {"grid": [10, 8], "fb_thresh_px": 6.0}})
    assert corr_q > 0  # any corr setting that shapes answers
    # a damaged file is noticed: that pair is asked again
    (tmp_path / "out" / "pairs" / "view_001__view_002" / "matches.npz").write_bytes(b"damaged")
    _, corr_q, _ = run({"corr": {"grid": [10, 8], "fb_thresh_px": 6.0}})
    assert 0 < corr_q <= 2 * 10 * 8


# -- loops

def _ring(n=36, radius=1.4):
    c2w = []
    for k in range(n):
        a = 2 * np.pi * k / n
        T = np.eye(4)
        T[:3, :3] = Rotation.from_euler("y", -a).as_matrix()
        T[:3, 3] = [radius * np.sin(a), 0.0, -radius * np.cos(a)]
        c2w.append(T)
    return c2w


def _loop_edges(seed: int, n: int = 36):
    """A 36-view ring: noisy odometry (i, i+1) and skips (i, i+2), the loop closures, one wrong edge."""
    import copy

    rng = np.random.default_rng(seed)
    c2w = _ring(n)
    info = information_from_points(rng.uniform([-1, -1, 2], [1, 1, 4], (200, 3)))

    def rel(i, j):
        T = np.linalg.inv(c2w[j]) @ c2w[i]
        return pose_matrix(Rotation.from_rotvec(rng.normal(0, 0.003, 3)).as_matrix() @ T[:3, :3],
                           T[:3, 3] + rng.normal(0, 0.01, 3))

    odo = [PoseEdge(i, i + 1, rel(i, i + 1), info, 200.0) for i in range(n - 1)]
    odo += [PoseEdge(i, i + 2, rel(i, i + 2), info, 200.0, uncertain=True) for i in range(n - 2)]
    loops = [PoseEdge(a, b, rel(a, b), info, 200.0, uncertain=True) for a, b in ((n - 1, 0), (n - 2, 0), (n - 1, 1))]
    wrong = PoseEdge(5, 20, pose_matrix(Rotation.from_rotvec([0.5, 0.2, 0]).as_matrix(), [1, 0, 0.5]), info, 200.0,
                     uncertain=True)

    def worst(res):
        A = np.linalg.inv(c2w[0])
        return max(np.linalg.norm(res.cam_to_world[k][:3, 3] - (A @ c2w[k])[:3, 3]) for k in range(n))

    best = [copy.copy(e) for e in odo + loops]  # the true edges alone, all trusted: plain least squares
    for e in best:
        e.uncertain = False
    return odo, loops, wrong, best, worst


def _seam(res, n: int = 36) -> float:
    """How far the last camera is from where it should be relative to the first (the loop's gap, metres)."""
    c2w = _ring(n)
    est = np.linalg.inv(res.cam_to_world[n - 1]) @ res.cam_to_world[0]
    return float(np.linalg.norm(est[:3, 3] - (np.linalg.inv(c2w[n - 1]) @ c2w[0])[:3, 3]))


@pytest.mark.parametrize("seed", [0, 1])
def test_a_loop_of_36_views_closes_and_a_wrong_edge_is_pruned(seed):
    odo, loops, wrong, best, worst = _loop_edges(seed)
    n = 36
    chain = optimize_poses(list(range(n)), odo)
    every = PoseGraphConfig(short_edges_per_image=0)  # the line process alone (the wrong edge is also long)
    closed = optimize_poses(list(range(n)), odo + loops + [wrong], every)
    optimum = worst(optimize_poses(list(range(n)), best, PoseGraphConfig(coarse_scales=[])))
    assert closed.pruned_edges == [(5, 20)] and len(closed.cam_to_world) == n
    assert worst(closed) < 1.05 * optimum + 0.005, (worst(closed), optimum)
    # the chain's drift opens a gap of 2.5-11 cm at the seam; closed, it is the noise of one edge
    assert _seam(closed) < 0.02 and _seam(closed) < 0.6 * _seam(chain), (_seam(closed), _seam(chain))
    # by default the wrong edge (1.1 m, its images have 4 shorter pairs) never enters; the loop still closes
    short = optimize_poses(list(range(n)), odo + loops + [wrong])
    assert (5, 20) in short.long_edges and not short.pruned_edges and len(short.cam_to_world) == n
    assert _seam(short) < 0.02 and worst(short) < 1.05 * optimum + 0.005, (_seam(short), worst(short), optimum)


def test_a_wrong_edge_cannot_seed_an_unordered_graph():
    """Every edge uncertain (an unordered set has no odometry): the plain maximum-weight spanning tree runs
    through the wrong edge and the optimiser stays in that basin (metres off); the spanning tree most edges
    agree with seeds it instead, and it ends at the least-squares optimum of the true edges."""
    odo, loops, wrong, best, worst = _loop_edges(0)
    edges = odo + loops + [wrong]
    for e in edges:
        e.uncertain = True
    plain = optimize_poses(list(range(36)), edges, PoseGraphConfig(tree_trials=1, short_edges_per_image=0))
    robust = optimize_poses(list(range(36)), edges, PoseGraphConfig(short_edges_per_image=0))
    optimum = worst(optimize_poses(list(range(36)), best, PoseGraphConfig(coarse_scales=[])))
    assert worst(plain) > 1.0 and len(plain.pruned_edges) > 5
    assert (5, 20) in robust.pruned_edges and worst(robust) < 1.05 * optimum + 0.005, (worst(robust), optimum)


def _walk_with_shared_errors(seed: int, n: int = 12):
    """Every pair of a 12-view walk (0.15 m steps), all uncertain, as an exhaustive set gives them. Each pose
    is off by an error its first image's depth map shares with all its pairs and that grows with the
    baseline (what PnP on a monocular depth map does: 2.3 degrees and 12 cm per metre here, as measured on
    the structured benchmark set), plus independent noise; wider pairs have fewer points."""
    rng = np.random.default_rng(seed)
    c2w = [np.eye(4)]
    for _ in range(n - 1):
        c2w.append(c2w[-1] @ pose_matrix(Rotation.from_euler("y", 3.0, degrees=True).as_matrix(), [0.15, 0, 0.03]))
    u, v = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in rng.normal(size=(2, n, 3)))
    edges = []
    for i in range(n):
        for j in range(i + 1, n):
            T = np.linalg.inv(c2w[j]) @ c2w[i]
            b = np.linalg.norm(T[:3, 3])
            k = int(300 * (1 - b / 1.8))
            R = Rotation.from_rotvec(0.04 * b * u[i] + rng.normal(0, 0.003, 3)).as_matrix() @ T[:3, :3]
            t = T[:3, 3] + 0.12 * b * v[i] + rng.normal(0, 0.01, 3)
            info = information_from_points(rng.uniform([-1.5, -1, 2], [1.5, 1, 4], (k, 3)))
            edges.append(PoseEdge(i, j, pose_matrix(R, t), info, float(k), uncertain=True))

    def step_error(res):  # RMS error of each step's relative translation (what pose AUC over near views sees)
        e = [np.linalg.norm((np.linalg.inv(res.cam_to_world[k + 1]) @ res.cam_to_world[k])[:3, 3]
                            - (np.linalg.inv(c2w[k + 1]) @ c2w[k])[:3, 3]) for k in range(n - 1)]
        return float(np.sqrt(np.mean(np.square(e))))

    return edges, step_error


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_pairs_with_shared_errors_do_not_outvote_the_short_ones(seed):
    """The line process keeps enough of the wide pairs (their errors agree with each other) to bend the walk:
    2-4x the step error of the short pairs alone (seeds 0-9). Each image keeping its 4 shortest pairs
    halves it or better, and ends near the optimum of the sequence's own pairs (1.0-1.8x of it, seeds 0-9)."""
    edges, step_error = _walk_with_shared_errors(seed)
    nodes = list(range(12))
    every = optimize_poses(nodes, edges, PoseGraphConfig(short_edges_per_image=0))
    short = optimize_poses(nodes, edges)
    optimum = step_error(optimize_poses(nodes, [e for e in edges if e.j - e.i <= 2],
                                        PoseGraphConfig(short_edges_per_image=0)))
    assert len(short.cam_to_world) == 12 and short.dropped == []
    assert all(j - i > 2 for i, j in short.long_edges) and len(short.long_edges) == len(edges) - 27
    assert step_error(short) < 0.6 * step_error(every), (step_error(short), step_error(every))
    assert step_error(short) < 2.0 * optimum, (step_error(short), optimum)


def test_a_long_pair_that_alone_joins_two_parts_stays_and_odometry_is_never_left_out():
    T = pose_matrix(np.eye(3), [0.0, 0.0, 0.1])
    far = pose_matrix(np.eye(3), [0.0, 0.0, 2.0])
    near = [PoseEdge(a, b, T, weight=100.0, uncertain=True) for a, b in ((0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5))]
    bridge = PoseEdge(2, 3, far, weight=10.0, uncertain=True)
    odometry = PoseEdge(0, 5, far @ T, weight=10.0)  # certain, and the longest pair of its images
    res = optimize_poses(list(range(6)), near + [bridge, PoseEdge(0, 4, far, weight=10.0, uncertain=True)],
                         PoseGraphConfig(short_edges_per_image=2))
    assert res.long_edges == [(0, 4)] and len(res.cam_to_world) == 6  # the bridge joins the parts: kept
    res = optimize_poses(list(range(6)), near + [bridge, odometry], PoseGraphConfig(short_edges_per_image=2))
    assert res.long_edges == [(2, 3)] and len(res.cam_to_world) == 6  # the odometry stays and joins them


def _global_auc10(res, scene) -> float:
    """Pose AUC@10 over every pair of views from the global poses (an unposed view's pairs are misses)."""
    from types import SimpleNamespace

    from densify.eval.pose_eval import pose_auc, pose_errors

    est = {int(i.split("_")[1]): T for i, T in res.cam_to_world.items()}  # ids: view_000, ...
    errs = []
    for a in range(len(scene.views)):
        for b in range(a + 1, len(scene.views)):
            if a not in est or b not in est:
                errs.append(float("inf"))
                continue
            E = np.linalg.inv(est[b]) @ est[a]
            t = E[:3, 3]
            p = SimpleNamespace(R=E[:3, :3], t=t / max(np.linalg.norm(t), 1e-12), t_metric=t, ok=True)
            errs.append(pose_errors(p, np.linalg.inv(scene.views[b].cam_to_world) @ scene.views[a].cam_to_world)["max_deg"])
    return pose_auc(errs)["auc@10"]


@pytest.mark.slow
def test_an_exhaustive_set_under_shared_errors_is_as_good_as_the_sequence(tmp_path):
    """12 views of a walk (320x240), every pair, the simulated engine's structured errors (shared by an
    image's answers). With every verified pair in the pose graph the wide pairs bend it (AUC@10 0.70, the
    sequence's own pairs 0.75); each image keeping its 4 shortest pairs: 0.81."""
    from densify.sim.engine import ErrorModel

    scene = _scene(seed=1, n_views=12, step_m=0.15)
    images = discover([str(p) for p in scene.save(tmp_path / "scene")])

    def run(pairs, out, **posegraph):
        over = {"engine": {"name": "simulated"}, "pairs": pairs, "corr": {"grid": [16, 12]},
                "depth": {"plan": {"count": 600}}, "fusion": {"voxel_length": 0.05, "sdf_trunc": 0.2},
                "posegraph": posegraph, "export": {"colmap": False, "glb": False, "nerfstudio": False}}
        cfg = load_config(ReconstructConfig, None, dict_overrides(over), default_name="reconstruct")
        truth = SceneTruth(scene)
        engines = {st: SimulatedEngine(load_profile(p), error=ErrorModel.from_option("structured"), truth=truth)
                   for st, p in (("depth", "vlm3-depth"), ("corr", "vlm3-corr"), ("pose", "vlm3-pose"))}
        res = reconstruct(images, cfg, tmp_path / out, engines=engines)
        assert res.summary["posed"] == 12
        return res

    every = run("exhaustive", "exhaustive", short_edges_per_image=0)
    short = run("exhaustive", "exhaustive")  # the same depth maps and pairs (skipped): only the graph differs
    sequence = run("consecutive+skip2", "sequence")
    assert not every.summary["long_pairs_left_out"] and len(short.summary["long_pairs_left_out"]) > 20
    auc = {k: _global_auc10(r, scene) for k, r in (("every", every), ("short", short), ("sequence", sequence))}
    assert auc["short"] > auc["every"] + 0.05 and auc["short"] > auc["sequence"] - 0.05, auc


def test_of_two_pairs_that_disagree_the_one_the_rest_agrees_with_places_the_image():
    """Image 3's two pairs place it metres apart. (1, 3) agrees with the rest, through (0, 3); (2, 3) is
    pruned and image 3 lands where (1, 3) puts it."""
    T = pose_matrix(np.eye(3), [0.0, 0.0, 0.3])
    far = pose_matrix(Rotation.from_rotvec([0.0, 1.2, 0.0]).as_matrix(), [2.0, 0.0, 0.0])
    edges = [PoseEdge(0, 1, T, weight=100.0), PoseEdge(1, 2, T, weight=100.0),
             PoseEdge(0, 2, T @ T, weight=100.0, uncertain=True), PoseEdge(0, 3, T @ T, weight=100.0, uncertain=True),
             PoseEdge(2, 3, far, weight=150.0, uncertain=True), PoseEdge(1, 3, T, weight=100.0, uncertain=True)]
    res = optimize_poses(list(range(4)), edges)
    assert res.pruned_edges == [(2, 3)] and res.dropped == []
    np.testing.assert_allclose(res.cam_to_world[3][:3, 3], [0, 0, -0.6], atol=1e-6)


# -- video

def _write_video(path, frames, fps=10.0):
    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert vw.isOpened()
    for f in frames:
        vw.write(np.ascontiguousarray(f[:, :, ::-1]))
    vw.release()


def test_video_frames_with_timestamps_reconstruct(tmp_path, walk):
    """Rendered frames as an mp4 at 10 fps; --fps 5 keeps every other one, with its time; the poses follow."""
    video = tmp_path / "walk.mp4"
    _write_video(video, [v.rgb for v in walk.views])
    sources, rec = extract_frames(video, tmp_path / "out" / "frames", fps=5.0)
    assert [s.extra["frame"] for s in sources] == [0, 2, 4, 6]
    np.testing.assert_allclose([s.extra["timestamp_s"] for s in sources], [0.0, 0.2, 0.4, 0.6], atol=1e-3)
    again, _ = extract_frames(video, tmp_path / "out" / "frames", fps=5.0)  # the same sampling: reused
    assert [s.path for s in again] == [s.path for s in sources]
    ids = {s.id: k for s, k in zip(sources, (0, 2, 4, 6))}
    truth = SceneTruth(walk, ids=ids)
    engines = {st: SimulatedEngine(load_profile(p), truth=truth)
               for st, p in (("depth", "vlm3-depth"), ("corr", "vlm3-corr"), ("pose", "vlm3-pose"))}
    for s in sources:  # the frames hold the scene's intrinsics (a real video would take --intrinsics)
        s.intrinsics = [walk.views[0].camera.fx, walk.views[0].camera.fy, walk.views[0].camera.cx,
                        walk.views[0].camera.cy]
    cfg = load_config(ReconstructConfig, None, dict_overrides({"engine": {"name": "simulated"},
                                                               "corr": {"grid": [12, 9]},
                                                               "depth": {"plan": {"count": 400}}}),
                      default_name="reconstruct")
    res = reconstruct(sources, cfg, tmp_path / "out", engines=engines, video=rec)
    assert res.summary["posed"] == 4 and res.summary["video"]["native_fps"] == pytest.approx(10.0)
    frames = json.loads((tmp_path / "out" / "poses.json").read_text())["frames"]
    assert [f["timestamp_s"] for f in frames] == pytest.approx([0.0, 0.2, 0.4, 0.6], abs=1e-3)
    gt = {s.id: walk.views[k].cam_to_world for s, k in zip(sources, (0, 2, 4, 6))}
    err = trajectory_error(res.cam_to_world, gt, res.reference)
    assert err["ate_rmse_m"] < 0.1, err


def test_video_options_are_checked(tmp_path, capsys, walk):
    from pipelines.cli import main

    images = walk.save(tmp_path / "scene")[:2]
    rc = main(["-q", "reconstruct", *map(str, images), "--out", str(tmp_path / "o"), "--fps", "2",
               "--engine", "simulated"])
    assert rc == 2 and "--fps/--every sample a video" in capsys.readouterr().err
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    rc = main(["-q", "reconstruct", str(bad), "--out", str(tmp_path / "o2"), "--engine", "simulated"])
    assert rc == 2 and "cannot decode this video" in capsys.readouterr().err


def test_the_scene_and_pair_stages_have_no_long_functions():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "densify" / "stages"
    for name in ("pairs.py", "scene.py"):
        for node in ast.walk(ast.parse((root / name).read_text())):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno < 60, (name, node.name)


def test_one_wrong_pair_does_not_pull_the_view_scales():
    """Five views with true log scales; every pair's ratio exact but one off by 0.7 (a wrong pair): the
    robust estimate keeps every view within 0.02, plain least squares moves them by up to ~0.2."""
    from densify.geometry.scale import relative_log_scales

    true = np.array([0.05, -0.08, 0.1, 0.0, -0.07])
    true -= true.mean()
    rows = [(i, j, true[j] - true[i]) for i in range(5) for j in range(i + 1, 5)]
    rows[3] = (rows[3][0], rows[3][1], rows[3][2] + 0.7)
    robust = relative_log_scales(5, rows, robust=0.05)
    plain = relative_log_scales(5, rows)
    assert np.max(np.abs(robust - true)) < 0.02, robust - true
    assert np.max(np.abs(plain - true)) > 0.1
