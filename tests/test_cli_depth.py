"""End to end through the command line: `densify depth`, `densify demo`, `densify prompts`, `densify eval`."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import IBIMS

from pipelines.cli import main

REPO_DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    from densify.synthetic.scenes import SceneSpec, make_scene

    d = tmp_path_factory.mktemp("scene")
    make_scene(SceneSpec(seed=1, n_views=2, width=320, height=240)).save(d)
    return d


def test_depth_writes_every_output(scene_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["depth", "--engine", "simulated", str(scene_dir), "--out", str(out), "--count", "768", "--set", "engine.options.seed=3"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 2 and summary["queries"] == 2 * 768
    d = out / "view_000"
    depth = np.load(d / "depth.npy")
    assert depth.dtype == np.float32 and depth.shape == (240, 320)
    png = cv2.imread(str(d / "depth.png"), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint16 and np.abs(png / 1000.0 - depth).max() < 0.001
    gt = np.load(scene_dir / "view_000.depth.npy")
    assert np.mean(np.maximum(depth / gt, gt / depth) < 1.25) > 0.9
    recs = [json.loads(line) for line in (d / "answers.jsonl").read_text().splitlines()]
    assert len(recs) == 768 and {"pixel", "prompt", "text", "value", "failure"} <= set(recs[0])
    import open3d as o3d
    pc = o3d.io.read_point_cloud(str(d / "cloud.ply"))
    assert len(pc.points) > 10000 and pc.has_colors()
    pts = np.asarray(pc.points)
    assert pts[:, 2].min() > 0  # camera frame, in front of the camera
    assert "2 ok" in capsys.readouterr().out


def test_depth_resumes_and_skips_finished(scene_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["depth", "--engine", "simulated", str(scene_dir), "--out", str(out), "--count", "192"]) == 0
    before = (out / "view_000" / "depth.npy").stat().st_mtime_ns
    assert main(["depth", "--engine", "simulated", str(scene_dir), "--out", str(out), "--count", "192"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["skipped"] == 2 and s["queries"] == 0
    assert (out / "view_000" / "depth.npy").stat().st_mtime_ns == before


def test_bad_images_are_recorded_and_the_run_goes_on(scene_dir, tmp_path, capsys):
    bad = tmp_path / "in"
    bad.mkdir()
    for f in scene_dir.glob("view_000*"):
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "broken.png").write_text("not an image")
    (bad / "badcam.png").write_bytes((scene_dir / "view_001.png").read_bytes())
    (bad / "badcam.json").write_text('{"fx": "nan", "fy": 1, "cx": 1, "cy": 1}')
    out = tmp_path / "out"
    rc = main(["depth", "--engine", "simulated", str(bad), "--out", str(out), "--count", "192"])
    assert rc == 1
    s = json.loads((out / "summary.json").read_text())
    assert s["ok"] == 1 and s["failed"] == 2
    kinds = {f["id"]: f["kind"] for f in s["failed_images"]}
    assert kinds == {"broken": "image", "badcam": "intrinsics"}
    err = capsys.readouterr().out
    assert "broken.png" in err or "broken" in err


def test_demo_without_noise_reaches_delta1_098(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--no-noise", "--views", "1"]) == 0
    text = capsys.readouterr().out
    assert "SIMULATED" in text
    s = json.loads((tmp_path / "depth" / "summary.json").read_text())
    assert s["metrics"]["dense"]["delta1"] >= 0.98
    # plan.count auto: exact answers need no more than the grid and the two refinement rounds
    assert s["queries"] == 1536 and s["plan"]["stops"] == {"shared": 1}


def test_prompts_command_prints_exact_json(capsys):
    img = IBIMS.parent / "rgb" / "corridor_01.png"
    if not img.is_file():
        pytest.skip("iBims sample not beside the checkout")
    assert main(["prompts", "--profile", "vlm3-depth", "--image", str(img),
                 "--intrinsics", "559.62,558.14,361.87,241.99", "--points", "519,129;45,56"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    s = 1000 / 559.62
    W, H = round(640 * s), round(round(480 * 559.62 / 558.14) * s)
    assert lines[0]["image_size"] == [W, H] and lines[0]["pixel"] == [519, 129]
    assert lines[0]["normalized"] == [round(519 * s / W * 2000), round(129 * (1000 / 558.14) / H * 2000)]
    assert lines[0]["text"].startswith(f"Given this image, how far is the point at coordinates "
                                       f"({lines[0]['normalized'][0]}, {lines[0]['normalized'][1]}) from")


def test_prompts_save_images_writes_what_the_engine_is_sent(tmp_path, capsys):
    """--save-images: per query the marked, resized image exactly as depth_batch builds it for the engine;
    a point too close to a border is reported unmarkable and gets no image."""
    from densify.config.profiles import load_profile
    from densify.io.cameras import Camera, prepare_image
    from densify.io.images import load_rgb
    from densify.queries.plan import plan_queries
    from densify.queries.prompts import depth_batch

    img = REPO_DATA / "ibims1_factory_01.png"
    intr = "559.62,558.14,361.87,241.99"  # fx != fy: undistorted, then one scale 750 / fx
    out = tmp_path / "seen"
    assert main(["prompts", "--profile", "depthlm", "--image", str(img), "--intrinsics", intr,
                 "--points", "519,129;2,2;45,56", "--save-images", str(out)]) == 0
    recs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r.get("failure") for r in recs] == [None, "unmarkable", None]
    assert "image_file" not in recs[1] and recs[1]["text"] is None
    p = load_profile("depthlm")
    rgb = load_rgb(img)
    prep = prepare_image(rgb, Camera(559.62, 558.14, 361.87, 241.99, 640, 480), **p.preprocess.image_options())
    plan = plan_queries(np.array([[519, 129], [45, 56]], float), prep.pixel_map, marker=p.marker)
    b = depth_batch(prep, plan, p, uid="x")
    assert sorted(f.name for f in out.iterdir()) == sorted(Path(r["image_file"]).name for r in (recs[0], recs[2]))
    for r, q, xy in zip((recs[0], recs[2]), b.queries, plan.marked.tolist()):
        assert r["marked"] == xy and r["image_size"] == list(prep.pixel_map.pre_size) and r["text"] == q.text
        saved = cv2.imread(r["image_file"], cv2.IMREAD_COLOR)[..., ::-1]
        assert np.array_equal(saved, b.images[q.image_uids[0]].pixels)
        x, y = xy
        assert tuple(saved[y, x - 1]) == (255, 0, 0) and tuple(saved[y, x]) == tuple(prep.pixels[y, x])
    # a coordinate profile: one shared image, the prepared one
    assert main(["prompts", "--profile", "vlm3-depth", "--image", str(img), "--intrinsics", intr,
                 "--points", "519,129;45,56", "--save-images", str(tmp_path / "vlm3")]) == 0
    recs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len({r["image_file"] for r in recs}) == 1 and len(list((tmp_path / "vlm3").iterdir())) == 1
    saved = cv2.imread(recs[0]["image_file"], cv2.IMREAD_COLOR)[..., ::-1]
    assert list(saved.shape[1::-1]) == recs[0]["image_size"]


def test_prompts_rejects_points_outside(capsys):
    img = IBIMS.parent / "rgb" / "corridor_01.png"
    if not img.is_file():
        pytest.skip("iBims sample not beside the checkout")
    assert main(["prompts", "--profile", "vlm3-depth", "--image", str(img), "--points", "700,10"]) == 2
    assert "outside the 640x480 image" in capsys.readouterr().err


def test_eval_ibims_simulated(tmp_path, capsys):
    if not IBIMS.is_file():
        pytest.skip("iBims sample not beside the checkout")
    assert main(["eval", "ibims", "--engine", "simulated", "--data", str(IBIMS), "--limit", "4", "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "eval.json").read_text())
    assert rep["points"] == 400 and 0.8 < rep["delta1"] < 0.97
    assert rep["answered"] + sum(rep["parse_failures"].values()) == 400
    # exact engine: every labelled point is found through the prompt coordinates
    assert main(["eval", "ibims", "--engine", "simulated", "--data", str(IBIMS), "--limit", "2", "--set", "engine.options.noise=false"]) == 0
    assert "delta_1 1.000" in capsys.readouterr().out


def test_config_errors_name_the_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("plan: {count: 10}\nengine: {nmae: simulated}\n")
    assert main(["depth", "--engine", "simulated", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "engine.nmae" in err and str(cfg) in err


def test_unparseable_answers_fail_the_image_with_a_clear_record(scene_dir, tmp_path):
    out = tmp_path / "out"
    rc = main(["depth", "--engine", "simulated", str(scene_dir / "view_000.png"), "--out", str(out), "--count", "48",
               "--set", "engine.options.error={unparseable_rate: 1.0}"])
    assert rc == 1
    s = json.loads((out / "summary.json").read_text())
    assert s["failed_images"][0]["kind"] == "answers" and "profile" in s["failed_images"][0]["error"]
    assert sum(s["answer_failures"].values()) == 48
    assert len((out / "view_000" / "answers.jsonl").read_text().splitlines()) == 48
    assert not (out / "view_000" / "result.json").exists()
