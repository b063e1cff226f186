"""Outputs written once and named once: safe unique ids, result.json certifying its files and the settings,
reruns that redo what changed and never empty an earlier summary."""

import json
import shutil

import numpy as np
import pytest

from densify.io.layout import IdAssigner, RunLayout, safe_id
from pipelines.cli import main


@pytest.mark.parametrize("raw", ["../x", "/etc/passwd", "a/b/../../c", ".hidden", "summary", "store", "Depth",
                                 "answers-0", "x" * 300, "", "..", "naïve photo (1)", "a\x00b"])
def test_every_id_is_one_safe_folder_inside_out(tmp_path, raw):
    sid = safe_id(raw)
    assert sid and len(sid) <= 96 and "/" not in sid and "\\" not in sid and not sid.startswith(".")
    assert sid.split(".")[0].lower() not in {"summary", "store", "depth", "manifest", "config", "failures"}
    d = RunLayout(tmp_path).image(sid).dir
    assert d.resolve().parent == tmp_path.resolve()


def test_colliding_ids_get_stable_distinct_names():
    a, b = IdAssigner(), IdAssigner()
    paths = ["d/img.jpg", "d/img.png", "d/img_1.png", "e/img.png", "d/img.png"]
    ids = [a.assign("img" if "img." in p else "img_1", p) for p in paths]
    assert len(set(ids)) == 5 and ids[0] == "img" and ids[2] == "img_1"
    assert ids == [b.assign("img" if "img." in p else "img_1", p) for p in paths]  # the same on a rerun
    assert {c["image"] for c in a.collisions} == {"d/img.png", "e/img.png"}


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    from densify.synthetic.scenes import SceneSpec, make_scene

    d = tmp_path_factory.mktemp("scene")
    make_scene(SceneSpec(seed=1, n_views=2, width=160, height=120)).save(d)
    return d


def _depth(out, *args):
    return main(["-q", "depth", *args, "--out", str(out), "--engine", "simulated", "--set", "plan.mode=grid",
                 "--set", "outputs.ply=false"])


def test_a_rerun_with_other_settings_redoes_the_images_and_keeps_a_true_summary(scene_dir, tmp_path):
    out = tmp_path / "out"
    assert _depth(out, str(scene_dir), "--count", "96") == 0
    first = json.loads((out / "view_000" / "result.json").read_text())
    assert _depth(out, str(scene_dir), "--count", "96") == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["skipped"] == 2 and s["ok"] == 0  # same settings: done
    assert _depth(out, str(scene_dir), "--count", "192") == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["ok"] == 2 and s["skipped"] == 0 and s["queries"] == 2 * 192  # settings changed: redone
    again = json.loads((out / "view_000" / "result.json").read_text())
    assert again["fingerprint"] != first["fingerprint"] and again["queries"] == 192
    assert set(again["files"]) >= {"depth.npy", "depth.png", "confidence.npy", "answers.jsonl", "camera.json"}
    # a transport option does not change the fingerprint: nothing is redone
    assert _depth(out, str(scene_dir), "--count", "192", "--set", "images_in_flight=5") == 0
    assert json.loads((out / "summary.json").read_text())["skipped"] == 2


def test_result_json_vouches_only_for_whole_files(scene_dir, tmp_path):
    out = tmp_path / "out"
    assert _depth(out, str(scene_dir), "--count", "96") == 0
    f = out / "view_000" / "depth.npy"
    f.write_bytes(f.read_bytes()[:-8])  # an interrupted overwrite left a different file
    assert _depth(out, str(scene_dir), "--count", "96") == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["ok"] == 1 and s["skipped"] == 1
    assert np.load(f).shape == (120, 160)


def test_same_image_same_folder_whatever_the_input_kind(scene_dir, tmp_path):
    manifest = tmp_path / "m.jsonl"
    shutil.copytree(scene_dir, tmp_path / "data" / "rgb")
    manifest.write_text("\n".join(json.dumps({"image": f"data/rgb/view_00{k}.png"}) for k in range(2)) + "\n")
    for kind, arg in (("folder", str(tmp_path / "data" / "rgb")), ("jsonl", str(manifest)),
                      ("glob", str(tmp_path / "data" / "rgb" / "*.png"))):
        assert _depth(tmp_path / kind, arg, "--count", "48") == 0
        assert sorted(p.name for p in (tmp_path / kind).iterdir() if p.is_dir()) == ["view_000", "view_001"], kind


def test_config_is_written_beside_the_outputs_not_to_the_terminal(scene_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["depth", str(scene_dir), "--out", str(out), "--engine", "simulated", "--count", "48"]) == 0
    text = capsys.readouterr()
    assert "engine:\n  name: simulated" in (out / "config.yaml").read_text()
    assert "plan" not in text.out and "config" not in text.err


def test_large_images_are_decoded_reduced_with_their_cameras(tmp_path):
    import cv2

    from densify.synthetic.scenes import SceneSpec, make_scene

    make_scene(SceneSpec(seed=2, n_views=1, width=160, height=120)).save(tmp_path / "s")
    big = tmp_path / "big"
    big.mkdir()
    rgb = cv2.imread(str(tmp_path / "s" / "view_000.png"))
    cv2.imwrite(str(big / "view_000.png"), cv2.resize(rgb, (2400, 1800), interpolation=cv2.INTER_NEAREST))
    depth = np.load(tmp_path / "s" / "view_000.depth.npy")
    np.save(big / "view_000.depth.npy", cv2.resize(depth, (2400, 1800), interpolation=cv2.INTER_NEAREST))
    side = json.loads((tmp_path / "s" / "view_000.json").read_text())
    side.update({k: side[k] * 15 for k in ("fx", "fy", "cx", "cy")}, width=2400, height=1800)
    (big / "view_000.json").write_text(json.dumps(side))
    out = tmp_path / "out"
    assert main(["-q", "depth", str(big), "--out", str(out), "--engine", "simulated", "--count", "300",
                 "--set", "max_side=600", "--set", "outputs.ply=false"]) == 0
    d = out / "view_000"
    assert np.load(d / "depth.npy").shape == (450, 600)
    cam = json.loads((d / "camera.json").read_text())
    assert cam["decoded_scale"] == 0.25 and cam["intrinsics"]["width"] == 600
    assert cam["intrinsics"]["fx"] == pytest.approx(side["fx"] / 4)
    gt = cv2.resize(depth, (600, 450), interpolation=cv2.INTER_NEAREST)
    pred = np.load(d / "depth.npy")
    assert np.mean(np.maximum(pred / gt, gt / pred) < 1.25) > 0.9
