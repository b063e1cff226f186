"""`densify reconstruct` and `densify pose` end to end with the simulated engine on rendered scenes."""

import json
import shutil

import numpy as np
import pytest

from densify.config.loading import dict_overrides
from densify.config.profiles import load_profile
from densify.eval.pose_eval import chamfer, trajectory_error, visible_surface_samples
from densify.geometry.export import OPENCV_TO_OPENGL
from densify.io.images import discover
from densify.sim.engine import SimulatedEngine
from densify.sim.truth import SceneTruth
from densify.stages.scene import reconstruct, relative_pose
from densify.stages.settings import ReconstructConfig, load_config

FAST = {"engine": {"name": "simulated"}, "fusion": {"voxel_length": 0.04, "sdf_trunc": 0.16},
        "depth": {"plan": {"count": 1200}}}


def load_reconstruct_config(path, over):
    return load_config(ReconstructConfig, path, dict_overrides(over), default_name="reconstruct")


def _engines(scene, seed=0):
    return {stage: SimulatedEngine(load_profile(p), seed=seed, truth=SceneTruth(scene))
            for stage, p in (("depth", "vlm3-depth"), ("corr", "vlm3-corr"), ("pose", "vlm3-pose"))}


@pytest.fixture(scope="module")
def scene():
    from densify.synthetic.scenes import SceneSpec, make_scene

    return make_scene(SceneSpec(seed=4, n_views=5, width=320, height=240))


@pytest.fixture(scope="module")
def run(scene, tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    images = scene.save(root / "scene")
    cfg = load_reconstruct_config(None, {**FAST, "pairs": "consecutive+skip2"})
    res = reconstruct(discover([str(p) for p in images]), cfg, root / "out", engines=_engines(scene))
    return root / "out", res


def test_every_image_posed_and_trajectory_recovered(scene, run):
    out, res = run
    s = res.summary
    assert s["posed"] == 5 and not s["dropped"] and not s["failed_pairs"]
    g = res.graph
    err = trajectory_error(g.cam_to_world, {k: v.cam_to_world for k, v in enumerate(scene.views)}, g.reference)
    assert err["ate_rmse_m"] < 0.06 and err["rot_mean_deg"] < 1.5, err


def test_poses_json(run):
    out, s = run
    p = json.loads((out / "poses.json").read_text())
    assert p["reference"] == "view_000" and len(p["frames"]) == 5
    f0 = p["frames"][0]
    np.testing.assert_allclose(f0["cam_to_world"], np.eye(4), atol=1e-9)
    assert {"fx", "fy", "cx", "cy", "width", "height"} <= set(f0["intrinsics"])
    assert (out / "pairs.jsonl").is_file() and (out / "summary.json").is_file()
    assert (out / "depth" / "view_003" / "depth.npy").is_file()
    rec = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(rec) == 4 + 3 and all(r["verdict"] in ("good", "weak") for r in rec)


def test_fused_mesh_is_close_to_the_scene(scene, run):
    import open3d as o3d

    out, s = run
    mesh = o3d.io.read_triangle_mesh(str(out / "mesh.ply"))
    cloud = o3d.io.read_point_cloud(str(out / "cloud.ply"))
    assert len(mesh.triangles) > 1000 and len(cloud.points) > 1000
    gt = visible_surface_samples(scene.mesh, [(v.depth, v.camera, v.cam_to_world) for v in scene.views],
                                 n=60_000, max_depth=8.0)
    A = scene.views[0].cam_to_world  # world = first camera: back into the scene's frame
    pts = np.asarray(mesh.vertices) @ A[:3, :3].T + A[:3, 3]
    c = chamfer(pts, gt, gt_mesh=scene.mesh)
    # simulated depth answers carry 12.5 % log-normal noise (plus outliers): a decimetre-level surface
    assert c["accuracy"] < 0.25 and c["completeness"] < 0.2, c


def test_tsdf_fusion_of_exact_depth_is_exact(scene):
    """Exact depth and poses through the same fusion code: errors are the voxel's, not a convention's."""
    from densify.geometry.fusion import FusionConfig, FusionFrame, tsdf_fuse

    frames = [FusionFrame(v.camera, v.cam_to_world, lambda v=v: v.depth, lambda v=v: v.rgb) for v in scene.views]
    mesh, cloud, n = tsdf_fuse(frames, FusionConfig(voxel_length=0.03, sdf_trunc=0.09))
    assert n == 5
    gt = visible_surface_samples(scene.mesh, [(v.depth, v.camera, v.cam_to_world) for v in scene.views],
                                 n=100_000, max_depth=8.0)
    c = chamfer(np.asarray(mesh.vertices), gt, gt_mesh=scene.mesh)
    assert c["accuracy"] < 0.01 and c["completeness"] < 0.06, c
    # millimetre uint16 depth with depth_scale 1000 gives the same surface
    frames = [FusionFrame(v.camera, v.cam_to_world, lambda v=v: np.round(v.depth * 1000).astype(np.uint16),
                          lambda v=v: v.rgb) for v in scene.views]
    mesh_mm, _, _ = tsdf_fuse(frames, FusionConfig(voxel_length=0.03, sdf_trunc=0.09, depth_scale=1000))
    assert chamfer(np.asarray(mesh_mm.vertices), gt, gt_mesh=scene.mesh)["accuracy"] < 0.01


def test_colmap_model_reads_back_with_multiview_tracks(scene, run):
    import pycolmap

    out, s = run
    rec = pycolmap.Reconstruction(str(out / "colmap"))
    assert rec.num_images() == 5 and rec.num_points3D() > 100
    lengths = [p.track.length() for p in rec.points3D.values()]
    assert max(lengths) >= 3 and sum(n >= 3 for n in lengths) > 20
    assert rec.compute_mean_reprojection_error() < 3.0
    poses = json.loads((out / "poses.json").read_text())["frames"]
    img = rec.find_image_with_name("view_002.png")
    w2c = np.linalg.inv(np.asarray(poses[2]["cam_to_world"]))
    np.testing.assert_allclose(img.cam_from_world().matrix(), w2c[:3], atol=1e-6)
    cam = rec.cameras[img.camera_id]
    assert cam.model.name == "PINHOLE"
    i = poses[2]["intrinsics"]  # COLMAP puts pixel centres at +0.5
    np.testing.assert_allclose(cam.params, [i["fx"], i["fy"], i["cx"] + 0.5, i["cy"] + 0.5])
    # a 3D point projects onto its 2D observation with those intrinsics
    p2d = next(p for p in img.points2D if p.has_point3D())
    X = rec.points3D[p2d.point3D_id].xyz
    xy = cam.img_from_cam(img.cam_from_world() * X)
    assert np.linalg.norm(np.asarray(xy).ravel()[:2] - p2d.xy) < 3.0
    assert s.summary["export"]["colmap"]["tracks_ge3"] > 20


def test_nerfstudio_transforms(run):
    out, _ = run
    t = json.loads((out / "transforms.json").read_text())
    for k in ("fl_x", "fl_y", "cx", "cy", "w", "h"):
        assert k in t
    assert len(t["frames"]) == 5
    poses0 = json.loads((out / "poses.json").read_text())["frames"][0]["intrinsics"]
    assert t["cx"] == poses0["cx"] + 0.5 and t["fl_x"] == poses0["fx"]
    poses = json.loads((out / "poses.json").read_text())["frames"]
    M = np.asarray(t["frames"][1]["transform_matrix"])
    np.testing.assert_allclose(M, np.asarray(poses[1]["cam_to_world"]) @ OPENCV_TO_OPENGL)
    # OpenGL camera: looking down its -z axis = the OpenCV camera's +z
    np.testing.assert_allclose(-M[:3, 2], np.asarray(poses[1]["cam_to_world"])[:3, 2])
    assert (out / t["frames"][1]["file_path"]).is_file()


def test_rerun_resumes_from_outputs(run, scene):
    out, s = run
    cfg = load_reconstruct_config(None, {**FAST, "pairs": "consecutive+skip2", "export": {"colmap": False,
                                                                                          "nerfstudio": False}})
    engines = _engines(scene)
    again = reconstruct(discover([str(out.parent / "scene")]), cfg, out, engines=engines).summary
    assert again["depth"]["skipped"] == 5 and again["posed"] == 5
    assert sum(e.stats["queries"] for e in engines.values()) == 0


def test_bad_inputs_give_failure_records_and_the_rest_reconstructs(tmp_path, scene):
    """A missing image and an unrelated image: failed pairs with reasons, the connected part is posed."""
    from densify.synthetic.scenes import SceneSpec, make_scene
    from pipelines.cli import main

    src = tmp_path / "scene"
    images = scene.save(src)
    other = make_scene(SceneSpec(seed=11, n_views=1, width=320, height=240))
    other.save(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "view_000.png", src / "zz_unrelated.png")  # no depth/pose: no truth
    seq = [str(images[0]), str(images[1]), str(src / "missing.png"), str(images[2]), str(images[3]),
           str(src / "zz_unrelated.png")]
    out = tmp_path / "out"
    rc = main(["-q", "reconstruct", *seq, "--out", str(out), "--pairs", "+skip2", "--grid", "16", "12",
               "--engine", "simulated", "--set", "fusion.voxel_length=0.05", "--set", "fusion.sdf_trunc=0.2",
               "--set", "depth.plan.count=600"])
    assert rc == 1  # a scene, but two images dropped: the exit status says so
    s = json.loads((out / "summary.json").read_text())
    assert s["posed"] == 4
    dropped = {d["id"]: d["reason"] for d in s["dropped"]}
    assert set(dropped) == {"missing", "zz_unrelated"}
    assert "no such file" in dropped["missing"]
    # the simulator has no truth for the unrelated image: it fails that image, it never invents depth
    assert "no ground truth" in dropped["zz_unrelated"]
    failed = {tuple(f["pair"]): f for f in s["failed_pairs"]}
    assert failed[("view_001", "missing")]["error_kind"] == "image"
    unrelated = failed[("view_003", "zz_unrelated")]
    assert unrelated["error_kind"] == "image" and "no ground truth" in unrelated["error"]
    # the bridge over the missing image keeps the sequence in one piece
    assert ("view_001", "view_002") not in failed
    poses = json.loads((out / "poses.json").read_text())
    assert [f["id"] for f in poses["frames"]] == ["view_000", "view_001", "view_002", "view_003"]
    assert (out / "mesh.ply").is_file() and (out / "colmap" / "points3D.txt").is_file()


def test_pose_command_with_vlm_cross_check(tmp_path, scene):
    images = scene.save(tmp_path / "scene")
    cfg = load_reconstruct_config(None, {**FAST, "pose": {"source": "both"}})
    pair = lambda c, out, k=2: relative_pose(discover([str(images[0]), str(images[k])]), c, out,  # noqa: E731
                                             engines=_engines(scene))[0]
    res = pair(cfg, tmp_path / "out")
    assert res.status == "ok"
    T = scene.relative_pose(0, 2)
    assert np.linalg.norm(np.asarray(res.pose.t_metric) - T[:3, 3]) < 0.08
    assert res.cross_check["rotation_deg"] < 10
    d = tmp_path / "out" / "pairs" / "view_000__view_002"
    assert (d / "flow.npy").is_file() and (d / "vlm_pose.json").is_file()
    assert np.load(d / "flow.npy").shape == (240, 320, 2)
    vlm_only = pair(cfg.model_copy(update={"pose": cfg.pose.model_copy(update={"source": "vlm"})}),
                    tmp_path / "out_vlm")
    assert vlm_only.pose.source == "vlm" and vlm_only.status == "ok"
    no_depth = pair(cfg.model_copy(update={"pose": cfg.pose.model_copy(update={"source": "matches",
                                                                              "use_depth": False})}),
                    tmp_path / "out_nd", 1)
    assert no_depth.status == "ok" and no_depth.pose.t_metric is None
    assert not (tmp_path / "out_nd" / "depth").exists()


def test_pose_command_line(tmp_path, scene):
    from pipelines.cli import main

    images = scene.save(tmp_path / "scene")
    rc = main(["-q", "pose", str(images[0]), str(images[1]), "--out", str(tmp_path / "out"), "--engine", "simulated",
               "--set", "depth.plan.count=600"])
    rep = json.loads((tmp_path / "out" / "pose.json").read_text())
    assert rc == 0 and rep["status"] == "ok" and rep["simulated"] is True


def test_one_connected_image_degrades_to_a_summary(tmp_path, scene):
    """No usable pair: no scene is fused or exported (no empty mesh), the summary says why, exit 1."""
    from pipelines.cli import main

    images = scene.save(tmp_path / "scene")
    for k in (1, 2):  # images the simulator knows nothing about: they fail, so nothing connects to view_000
        (tmp_path / f"o{k}").mkdir()
        shutil.copy(images[k], tmp_path / f"o{k}" / f"bare{k}.png")
    seq = [str(images[0]), str(tmp_path / "o1" / "bare1.png"), str(tmp_path / "o2" / "bare2.png")]
    out = tmp_path / "out"
    rc = main(["-q", "reconstruct", *seq, "--out", str(out), "--engine", "simulated", "--grid", "12", "9",
               "--set", "depth.plan.count=300"])
    s = json.loads((out / "summary.json").read_text())
    assert rc == 1 and s["posed"] <= 1 and not s["complete"]
    assert "no scene" in s["fusion"]["skipped"] and len(s["dropped"]) >= 2
    assert not (out / "mesh.ply").exists() and not (out / "cloud.ply").exists() and not (out / "colmap").exists()
    json.loads((out / "poses.json").read_text())  # what exists is a valid file
