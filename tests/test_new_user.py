"""What a new user hit (issue 25): reruns that ate their own outputs, cheap checks after expensive work,
silent wrong inputs, two jobs on one folder, reports that said more than happened, exit codes, ids and
progress. Each test failed on the code before its fix."""

import json
import shutil
from pathlib import Path

import pytest

from densify.io.images import discover
from pipelines.cli import main

SIM = ["--engine", "simulated", "--count", "64", "--set", "plan.mode=grid"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from densify.synthetic.scenes import SceneSpec, make_scene

    d = tmp_path_factory.mktemp("scene")
    make_scene(SceneSpec(seed=2, n_views=2, width=160, height=120)).save(d)
    return d


def _run(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.err + cap.out


def _copy(scene, tmp_path) -> Path:
    s = tmp_path / "s"
    shutil.copytree(scene, s)
    return s


# -- 2. a rerun never takes its own outputs as inputs

def test_a_rerun_into_a_folder_inside_the_inputs_finds_the_same_images(scene, tmp_path, capsys):
    s = _copy(scene, tmp_path)
    for k in (1, 2):
        rc, text = _run(capsys, "depth", s, "--out", s / "out", *SIM)
        assert rc == 0, text
        summary = json.loads((s / "out" / "summary.json").read_text())
        assert summary["images"] == 2, (k, summary["images"], text)
    assert summary["skipped"] == 2
    assert sorted(p.name for p in (s / "out").iterdir() if p.is_dir()) == ["view_000", "view_001"]


def test_walks_skip_output_folders_of_other_runs_and_hidden_files(scene, tmp_path, capsys):
    s = _copy(scene, tmp_path)
    rc, _ = _run(capsys, "depth", s, "--out", tmp_path / "elsewhere", *SIM)
    assert rc == 0
    shutil.copytree(tmp_path / "elsewhere", s / "old_run")  # a run's outputs moved under the inputs
    (s / "._view_000.png").write_bytes(b"\0\5\26\7 macOS resource fork")
    (s / ".cache").mkdir()
    shutil.copy(s / "view_000.png", s / ".cache" / "thumb.png")
    srcs = discover([s])
    assert [x.id for x in srcs] == ["view_000", "view_001"]
    assert [x.path.name for x in discover([str(s / "*.png")])] == ["view_000.png", "view_001.png"]
    assert [x.id for x in discover([str(s / "**" / "*.png")])] == ["view_000", "view_001"]
    # images named one by one are always taken, and so is a folder named as the input
    assert len(discover([s / "old_run" / "view_000" / "depth.png"])) == 1


# -- 5. one job per output folder

@pytest.mark.parametrize("command", ["depth", "pose", "reconstruct", "label", "eval", "demo", "synth", "make-model"])
def test_a_second_job_on_a_held_output_folder_is_refused_with_exit_4(scene, tmp_path, capsys, command):
    from densify.io.layout import RunLayout

    out = tmp_path / "out"
    imgs = [scene / "view_000.png", scene / "view_001.png"]
    argv = {"depth": ["depth", scene, "--out", out, *SIM],
            "pose": ["pose", *imgs, "--out", out, "--engine", "simulated", "--grid", "6", "6"],
            "reconstruct": ["reconstruct", scene, "--out", out, "--engine", "simulated"],
            "label": ["label", scene, "--out", out, "--no-ray", *SIM],
            "eval": ["eval", "spatialrgpt", "--synthetic", scene, "--engine", "simulated", "--limit", "2", "--out", out],
            "demo": ["demo", "--out", out, "--views", "1"],
            "synth": ["synth", "--out", out, "--views", "1", "--overwrite"],
            "make-model": ["make-model", out, "--overwrite"]}[command]
    with RunLayout(out).lock():
        rc, text = _run(capsys, *argv)
        assert rc == 4, text
        assert "another densify job is writing to this folder" in text and str(out) in text, text
        assert f"pid {__import__('os').getpid()}" in text
        assert sorted(p.name for p in out.iterdir()) == [".densify.lock"]  # nothing written
    assert not out.exists()  # the lock's own folder is gone with it


def test_label_shards_share_a_folder_and_the_lock_goes_with_the_job(scene, tmp_path, capsys):
    from densify.io.layout import RunLayout

    out = tmp_path / "out"
    with RunLayout(out, shard=(1, 2)).lock():
        rc, text = _run(capsys, "label", scene, "--out", out, "--no-ray", "--shard", "0/2", *SIM)
        assert rc == 0, text
    rc, text = _run(capsys, "label", scene, "--out", out, "--no-ray", "--shard", "1/2", *SIM)
    assert rc == 0, text
    assert not list(out.glob(".densify*.lock"))
    rc, text = _run(capsys, "depth", scene, "--out", out / "d", *SIM)  # a finished job left no lock behind
    assert rc == 0, text


def test_a_lock_held_by_another_process_is_refused(scene, tmp_path):
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from densify.io.lock import OutputLock\n"
                               f"l = OutputLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "pipelines", "depth", str(scene), "--out", str(out), *SIM],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 4 and f"pid {holder.pid}" in r.stderr, r.stderr
        assert time.monotonic() - t < 60
    finally:
        holder.kill()
        holder.wait()
    r = subprocess.run([sys.executable, "-m", "pipelines", "depth", str(scene), "--out", str(out), *SIM],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr  # a killed holder leaves no stale lock


# -- 7. synth and make-model refuse folders that are not empty; a file where a folder is needed is named

@pytest.mark.parametrize("command", ["synth", "make-model"])
def test_synth_and_make_model_refuse_a_folder_that_is_not_empty(tmp_path, capsys, command):
    out = tmp_path / "x"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    argv = ["synth", "--out", out, "--views", "1", "--width", "32", "--height", "24"] if command == "synth" \
        else ["make-model", out]
    rc, text = _run(capsys, *argv)
    assert rc == 2 and "not empty" in text and "--overwrite" in text, text
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    rc, text = _run(capsys, *argv, "--overwrite")
    assert rc == 0, text
    assert (out / "mine.txt").read_text() == "keep"


def test_synth_overwrite_leaves_no_views_of_the_earlier_scene(tmp_path, capsys):
    out = tmp_path / "s"
    assert _run(capsys, "synth", "--out", out, "--views", "3", "--width", "32", "--height", "24")[0] == 0
    assert _run(capsys, "synth", "--out", out, "--views", "2", "--width", "32", "--height", "24", "--overwrite")[0] == 0
    assert sorted(p.name for p in out.glob("view_*.png")) == ["view_000.png", "view_001.png"]
    assert not list(out.glob("view_002*"))


# -- 3. densifier options are typed and checked when the settings load

@pytest.mark.parametrize("command", ["depth", "label"])
@pytest.mark.parametrize("setting, words", [
    ("densify.options.radiuss=2.0", ["--set densify.options.radiuss=2.0", "did you mean 'radius'"]),
    ("densify.options.radius=abc", ["densify.options.radius", "valid number"]),
    ("densify.options.radius=-1", ["densify.options.radius", "greater than 0"]),
])
def test_densifier_options_are_checked_before_any_engine_work(scene, tmp_path, capsys, monkeypatch, command,
                                                              setting, words):
    import densify.stages.engine as stage_engine

    monkeypatch.setattr(stage_engine, "create_engine", lambda *a, **k: pytest.fail("an engine was built"))
    out = tmp_path / "out"
    extra = ["--no-ray"] if command == "label" else []
    rc, text = _run(capsys, command, scene, "--out", out, *SIM, *extra, "--set", "densify.method=edge", "--set", setting)
    assert rc == 2, text
    assert len(text.strip().splitlines()) == 1 and "Traceback" not in text, text
    for w in words:
        assert w in text, (w, text)
    assert not out.exists()


def test_densifier_options_apply_per_method_and_keep_the_fingerprint():
    from densify.stages.settings import DepthConfig

    assert DepthConfig(densify={"method": "linear", "options": {"inverse": False}}).densify.options == {"inverse": False}
    with pytest.raises(ValueError, match="not an option of the linear densifier"):
        DepthConfig(densify={"method": "linear", "options": {"radius": 2}})
    cfg = DepthConfig(densify={"options": {"radius": "3", "gate": [1.2, 1.5]}})
    assert cfg.densify.options == {"radius": 3.0, "gate": (1.2, 1.5)}  # typed, and only what was set
    assert DepthConfig().densify.options == {}


def test_each_densifiers_options_model_matches_its_function():
    import inspect

    from densify.fields import DEPTH_DENSIFIERS, FLOW_DENSIFIERS, densify_depth
    from densify.fields.interpolate import densify_flow

    inner = {("depth", "linear"): densify_depth, ("flow", "linear"): densify_flow}
    common = {"outliers", "logprobs", "shape"}
    for kind, reg in (("depth", DEPTH_DENSIFIERS), ("flow", FLOW_DENSIFIERS)):
        for name, m in reg.items():
            fn = inner.get((kind, name), m.fn)
            params = {k: p for k, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY}
            assert set(m.options.model_fields) == set(params) - common, (kind, name)
            for k, f in m.options.model_fields.items():
                assert f.get_default() == params[k].default, (kind, name, k)


# -- 3. every stage's checkpoint and the cheap input checks come before any engine work

@pytest.fixture
def no_engines(monkeypatch):
    import huggingface_hub

    import densify.stages.engine as stage_engine

    monkeypatch.setattr(stage_engine, "create_engine", lambda *a, **k: pytest.fail("an engine was built"))
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)


def _fake_checkpoint(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


@pytest.mark.parametrize("command", ["pose", "reconstruct"])
@pytest.mark.parametrize("options, missing, option", [
    ([], "facebook/VLM3-corr", "--corr-model"),
    (["--corr-model", "./no/such/corr"], "./no/such/corr", "--corr-model"),
    (["--corr-model", "CKPT", "--pose-source", "both"], "facebook/VLM3-pose", "--pose-model"),
    (["--pose-source", "vlm", "--pose-model", "./nope"], "./nope", "--pose-model"),
])
def test_every_stage_checkpoint_is_checked_first_naming_its_option(scene, tmp_path, capsys, no_engines, command,
                                                                   options, missing, option):
    ckpt = _fake_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    inputs = [scene / "view_000.png", scene / "view_001.png"]
    options = [str(ckpt) if o == "CKPT" else o for o in options]
    rc, text = _run(capsys, command, *inputs, "--out", out, "--engine", "hf", "--model", ckpt, *options)
    assert rc == 3, text
    assert missing in text and f"{option} PATH" in text, text
    assert len(text.strip().splitlines()) == 1
    assert not out.exists()  # no depth work before the check


def test_pose_with_a_missing_second_image_stops_before_any_engine(scene, tmp_path, capsys, no_engines):
    out = tmp_path / "out"
    rc, text = _run(capsys, "pose", scene / "view_000.png", tmp_path / "nope.png", "--out", out, "--engine", "simulated")
    assert rc == 2 and "image2" in text and "nope.png" in text and "no such file" in text, text
    assert not out.exists()


def test_parquet_without_an_image_column_stops_before_any_engine(scene, tmp_path, capsys, no_engines):
    import pyarrow as pa
    import pyarrow.parquet as pq

    m = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": [str(scene / "view_000.png")]}), m)
    out = tmp_path / "out"
    rc, text = _run(capsys, "label", m, "--out", out, "--no-ray", *SIM)
    assert rc == 2 and "'image' column" in text and "path" in text, text
    assert not out.exists()  # no store, no summary
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    rc, text = _run(capsys, "label", tmp_path / "bad.parquet", "--out", out, "--no-ray", *SIM)
    assert rc == 2 and "not a readable Parquet file" in text, text


@pytest.mark.parametrize("value, words", [("-554,554,320,240", "fx, fy must be positive"),
                                          ("554,554,-320,240", "cx, cy must be pixel positions"),
                                          ("554,nan,320,240", "finite")])
@pytest.mark.parametrize("command", ["depth", "pose", "reconstruct"])
def test_negative_intrinsics_stop_before_any_engine(scene, tmp_path, capsys, no_engines, command, value, words):
    out = tmp_path / "out"
    inputs = [scene / "view_000.png", scene / "view_001.png"]
    rc, text = _run(capsys, command, *inputs, "--out", out, "--engine", "simulated", f"--intrinsics={value}")
    assert rc == 2 and words in text and "--intrinsics" in text, text
    assert not out.exists()


# -- 4. inputs that cannot be right are said, refused or named

@pytest.mark.parametrize("value, words", [("320,240,554,554", ["principal point (554, 554) is outside", "fx / fy is 1.33"]),
                                          ("554,554,5000,60", ["principal point (5000, 60) is outside"])])
def test_implausible_intrinsics_are_warned_about(scene, tmp_path, capsys, caplog, monkeypatch, value, words):
    import logging

    from densify.io import cameras

    monkeypatch.setattr(cameras, "_warned", set())  # warned once per camera and process
    caplog.set_level(logging.WARNING, logger="densify.io.cameras")  # benchmarks quieten it in-process
    rc, text = _run(capsys, "depth", scene, "--out", tmp_path / "o", *SIM, "--intrinsics", value)
    assert rc == 0, text
    warned = [r.getMessage() for r in caplog.records if "look wrong" in r.getMessage()]
    assert len(warned) == 1, warned  # once for the job, not per image
    for w in words:
        assert w in warned[0], (w, warned)
    caplog.clear()
    _run(capsys, "depth", scene, "--out", tmp_path / "o2", *SIM)  # the scene's own intrinsics: no warning
    assert not [r for r in caplog.records if "look wrong" in r.getMessage()]


def test_a_count_beyond_the_image_is_said(scene, tmp_path, capsys, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="densify.depth")
    rc, text = _run(capsys, "depth", scene, "--out", tmp_path / "o", "--engine", "simulated", "--count", "5000000",
                    "--set", "plan.mode=grid")
    assert rc == 0, text
    warned = [r.getMessage() for r in caplog.records if "plan.count 5,000,000" in r.getMessage()]
    assert len(warned) == 1 and "160x120 image has only 19,200" in warned[0], warned


@pytest.mark.parametrize("argv, words", [
    (["--count", "64", "--stride", "8"], ["--count 64 and --stride 8", "give one"]),
    (["--count", "64", "--set", "plan.count=128"], ["--count 64 and --set plan.count=128 both set plan.count"]),
    (["--stride", "8", "--set", "plan.count=128"], ["--stride 8 and --set plan.count=128", "give one"]),
    (["--set", "plan.stride=8", "--set", "plan.count=128"], ["--set plan.stride=8 and --set plan.count=128"]),
])
def test_conflicting_plan_options_are_refused(scene, tmp_path, capsys, argv, words):
    rc, text = _run(capsys, "depth", scene, "--out", tmp_path / "o", "--engine", "simulated", *argv)
    assert rc == 2, text
    for w in words:
        assert w in text, (w, text)
    assert not (tmp_path / "o").exists()
    rc, text = _run(capsys, "depth", scene, "--out", tmp_path / "o", *SIM, "--set", "plan.count=64")
    assert rc == 0, text  # the same value twice is no conflict


@pytest.mark.parametrize("argv, words", [
    (["spatialrgpt", "--synthetic", "SCENE", "--data", "x.json"], ["--synthetic", "--data", "give one"]),
    (["ibims", "--synthetic", "SCENE"], ["--synthetic", "only for `densify eval spatialrgpt`"]),
    (["spatialrgpt", "--synthetic", "SCENE", "--up", "camera"], ["--up camera", "only with --geometry"]),
])
def test_conflicting_eval_options_are_refused(scene, tmp_path, capsys, argv, words):
    argv = [str(scene) if a == "SCENE" else a for a in argv]
    rc, text = _run(capsys, "eval", *argv, "--engine", "simulated")
    assert rc == 2, text
    for w in words:
        assert w in text, (w, text)


def test_ask_refuses_a_depth_map_of_another_size_and_an_extra_region(scene, tmp_path, capsys, no_engines):
    import numpy as np

    img = scene / "view_000.png"  # 160x120
    small = tmp_path / "small.npy"
    np.save(small, np.ones((60, 80), np.float32))
    base = ["ask", img, "--engine", "simulated", "--question", "left_choice", "--regions", "0,0,50,50;60,20,150,100"]
    rc, text = _run(capsys, *base, "--geometry", "--depth", small)
    assert rc == 2 and "a 80x60 map for a 160x120 image" in text, text
    rc, text = _run(capsys, *base, "--depth", scene / "view_000.depth.npy")
    assert rc == 2 and "only with --geometry" in text, text
    rc, text = _run(capsys, "ask", img, "--engine", "simulated", "--question", "left_choice",
                    "--regions", "0,0,50,50;60,20,150,100;10,60,40,110")
    assert rc == 2 and "gives 3 boxes" in text and "at most 2" in text, text


# -- 6. reports say what happened, no more

def test_bracketed_text_survives_the_console(scene, tmp_path, capsys):
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"image": str(scene / "view_000.png"), "intrinsics": [500, 500, 80]}) + "\n")
    rc, text = _run(capsys, "depth", m, "--out", tmp_path / "o", *SIM)
    assert rc == 1, text
    assert "intrinsics need [fx, fy, cx, cy] plus the image size" in text, text


def test_a_crash_is_not_an_interruption(scene, tmp_path, capsys, monkeypatch):
    from densify.stages import depth as depth_stage

    def boom(self, task, completions):
        raise RuntimeError("a bug [in brackets]")

    monkeypatch.setattr(depth_stage.DepthStage, "finish", boom)
    rc, text = _run(capsys, "depth", scene, "--out", tmp_path / "o", *SIM)
    assert rc == 70, text
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["interrupted"] is False and s["complete"] is False and "a bug [in brackets]" in s["error"]
    rc, text = _run(capsys, "label", scene, "--out", tmp_path / "l", "--no-ray", *SIM)
    assert rc == 70, text
    s = json.loads((tmp_path / "l" / "summary.json").read_text())
    assert s["interrupted"] is False and s["complete"] is False and "a bug" in s["error"]


def test_label_names_no_model_for_a_simulated_run_and_every_command_writes_its_config(scene, tmp_path, capsys):
    import yaml

    rc, text = _run(capsys, "label", scene, "--out", tmp_path / "l", "--no-ray", *SIM)
    assert rc == 0, text
    s = json.loads((tmp_path / "l" / "summary.json").read_text())
    assert s["simulated"] is True and s["model"] is None
    assert yaml.safe_load((tmp_path / "l" / "config.yaml").read_text())["plan"]["count"] == 64
    imgs = [scene / "view_000.png", scene / "view_001.png"]
    rc, text = _run(capsys, "pose", *imgs, "--out", tmp_path / "p", "--engine", "simulated", "--grid", "6", "6")
    assert rc == 0, text
    assert yaml.safe_load((tmp_path / "p" / "config.yaml").read_text())["corr"]["grid"] == [6, 6]
    rc, text = _run(capsys, "label", scene, "--out", tmp_path / "l", "--no-ray", "--shard", "1/2", *SIM)
    assert (tmp_path / "l" / "config-1.yaml").is_file()


def test_reconstruct_lists_only_files_it_wrote(scene, tmp_path, capsys):
    import yaml

    out = tmp_path / "r"
    # one view cannot connect: no mesh, cloud or exports are written, and the report must not list them
    rc, text = _run(capsys, "reconstruct", scene / "view_000.png", tmp_path / "missing.png", "--out", out,
                    "--engine", "simulated", "--set", "depth.plan.count=64", "--set", "depth.plan.mode=grid")
    assert rc == 1, text
    last = text.strip().splitlines()[-1]
    assert last.startswith("outputs in") and "mesh.ply" not in last and "colmap" not in last, last
    for name in ("poses.json", "summary.json", "config.yaml"):
        assert name in last and (out / name).exists(), (name, last)
    assert yaml.safe_load((out / "config.yaml").read_text())["depth"]["plan"]["count"] == 64


def test_ask_exits_1_when_the_model_gave_no_usable_answer(tmp_path, capsys, caplog):
    from PIL import Image

    img = tmp_path / "photo.png"  # no ground truth beside it: the simulated engine answers nothing
    Image.new("RGB", (64, 48), (90, 120, 150)).save(img)
    rc, text = _run(capsys, "ask", img, "--engine", "simulated", "--regions", "1,1,20,20;30,10,60,40",
                    "--question", "left_choice")
    assert rc == 1, text
    assert "1 of 1 question(s) got no usable answer" in caplog.text


# -- 7. exit codes and options

@pytest.mark.parametrize("flag", ["--debug", "-v", "-q"])
def test_global_flags_work_after_the_subcommand(scene, tmp_path, capsys, flag):
    rc, text = _run(capsys, "depth", scene, "--out", tmp_path / "o", "--engine", "nosuch", flag)
    assert rc == 2, text
    assert ("Traceback" in text) == (flag == "--debug"), text
    from pipelines.cli import build_parser

    args = build_parser()[0].parse_args([flag, "depth", str(scene), "--out", "o"])  # before it still counts
    assert getattr(args, {"--debug": "debug", "-v": "verbose", "-q": "quiet"}[flag]) is True


def test_hf_on_cuda_without_cuda_is_exit_3_with_the_fix(scene, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    ckpt = _fake_checkpoint(tmp_path / "ckpt")
    rc, text = _run(capsys, "depth", scene, "--out", tmp_path / "o", "--engine", "hf", "--model", ckpt,
                    "--set", "engine.options.device=cuda")
    assert rc == 3, text
    assert "engine.options.device=cuda" in text and "device=cpu" in text, text
    rc, text = _run(capsys, "depth", scene, "--out", tmp_path / "o", "--engine", "hf", "--model", ckpt,
                    "--set", "engine.options.device=gpu0")
    assert rc == 3 and "engine.options.device=gpu0: not a torch device" in text, text


@pytest.mark.parametrize("argv, words", [
    (["label", "SCENE", "--out", "OUT", "--no-ray", "--store", "FILE"], ["--store", "is a file, not a folder"]),
    (["make-model", "FILE"], ["make-model OUT", "is a file, not a folder"]),
    (["depth", "SCENE", "--out", "FILE/sub"], ["--out", "lies under", "which is a file"]),
    (["reconstruct", "SCENE", "--out", "FILE/sub"], ["--out", "lies under", "which is a file"]),
    (["synth", "--out", "FILE/sub"], ["--out", "lies under", "which is a file"]),
])
def test_a_file_where_a_folder_is_needed_is_named(scene, tmp_path, capsys, argv, words):
    f = tmp_path / "file"
    f.write_text("x")
    subst = {"SCENE": str(scene), "OUT": str(tmp_path / "out"), "FILE": str(f), "FILE/sub": str(f / "sub")}
    rc, text = _run(capsys, *[subst.get(a, a) for a in argv], *(SIM if argv[0] in ("depth", "label") else
                                                                ["--engine", "simulated"] if argv[0] == "reconstruct"
                                                                else []))
    assert rc == 2, text
    assert "free space" not in text and "Errno" not in text, text
    for w in words:
        assert w in text, (w, text)


@pytest.mark.parametrize("name, as_list", [("m.json", True), ("m.json", False), ("M.JSONL", False)])
def test_json_and_upper_case_manifests_are_read_as_manifests(scene, tmp_path, capsys, name, as_list):
    recs = [{"image": str(scene / f"view_00{k}.png"), "id": f"frame{k}"} for k in (0, 1)]
    m = tmp_path / name
    m.write_text(json.dumps(recs) if as_list else "".join(json.dumps(r) + "\n" for r in recs))
    assert [s.id for s in discover([m])] == ["frame0", "frame1"]
    rc, text = _run(capsys, "label", m, "--out", tmp_path / "o", "--no-ray", *SIM)
    assert rc == 0, text
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["images_in_shard"] == 2


def test_an_unreachable_ray_cluster_is_exit_3_within_seconds(scene, tmp_path, capsys):
    import time

    pytest.importorskip("ray")
    t = time.monotonic()
    rc, text = _run(capsys, "label", scene, "--out", tmp_path / "o", *SIM, "--ray-address", "127.0.0.1:1")
    assert rc == 3 and "127.0.0.1:1" in text and "ray start --head" in text, text
    assert time.monotonic() - t < 30


# -- 8. ids keep their letters

@pytest.mark.parametrize("raw, want", [
    ("café", "café"), ("cafe\u0301", "café"), ("日本", "日本"), ("Ελλάδα_01", "Ελλάδα_01"), ("naïve photo (1)", "naïve_photo_1"),
    ("a/b", "a_b"), ("a\\b", "a_b"), ("a\u202eb", "a_b"), ("a\x00b", "a_b"), ("a\u3000b", "a_b"), ("a\udcffb", "a_b"),
    ("Summary", "img_Summary"), ("ΣΤΟΡΕ", "ΣΤΟΡΕ"), ("plain-ascii_1.x", "plain-ascii_1.x"),
])
def test_ids_keep_unicode_letters_and_digits(raw, want):
    from densify.io.layout import safe_id

    assert safe_id(raw) == want


def test_long_unicode_ids_fit_a_pair_folder_name(tmp_path):
    from densify.io.layout import RunLayout, safe_id

    a, b = safe_id("日本" * 100), safe_id("東京" * 100)
    assert len(a.encode()) <= 120 and a.startswith("日本日本") and a != b
    d = RunLayout(tmp_path).pair(a, b).dir
    d.mkdir(parents=True)  # within the 255-byte name limit
    assert d.is_dir()


def test_unicode_file_names_give_their_own_folders(tmp_path, capsys, scene):
    s = tmp_path / "s"
    s.mkdir()
    for name in ("café", "日本"):
        for ext in (".png", ".json", ".depth.npy"):
            shutil.copy(scene / f"view_000{ext}", s / f"{name}{ext}")
    rc, text = _run(capsys, "depth", s, "--out", tmp_path / "o", *SIM)
    assert rc == 0, text
    assert sorted(p.name for p in (tmp_path / "o").iterdir() if p.is_dir()) == sorted(["café", "日本"])


# -- 9. progress for pose and eval, like depth's

def _progress_lines(caplog, label):
    return [r.getMessage() for r in caplog.records if r.name == "densify" and r.getMessage().startswith(label + " ")]


def test_pose_reports_progress_per_stage(scene, tmp_path, capsys, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="densify")
    rc, text = _run(capsys, "pose", scene / "view_000.png", scene / "view_001.png", "--out", tmp_path / "p",
                    "--engine", "simulated", "--grid", "6", "6", "--set", "depth.plan.count=64")
    assert rc == 0, text
    depth = _progress_lines(caplog, "depth of image 1")
    pairs = _progress_lines(caplog, "pairs")
    assert depth and depth[-1].startswith("depth of image 1 1/1") and "q/s" in depth[-1], depth
    assert pairs and pairs[-1].startswith("pairs 1/1") and "q/s" in pairs[-1], pairs


def test_eval_reports_progress(scene, tmp_path, capsys, caplog):
    import logging

    import numpy as np

    caplog.set_level(logging.INFO, logger="densify")
    d = np.load(scene / "view_000.depth.npy")
    px = [[10, 10], [80, 60], [150, 100]]
    rec = {"image": str(scene / "view_000.png"), "intrinsics": json.loads((scene / "view_000.json").read_text())
           and [json.loads((scene / "view_000.json").read_text())[k] for k in ("fx", "fy", "cx", "cy")],
           "pixel_coords": px, "depth": [float(d[y, x]) for x, y in px]}
    m = tmp_path / "labels.jsonl"
    m.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "image": str(scene / "view_001.png")}) + "\n")
    rc, text = _run(capsys, "eval", "ibims", "--data", m, "--engine", "simulated")
    assert rc == 0, text
    lines = _progress_lines(caplog, "images")
    assert lines and lines[-1].startswith("images 2/2"), lines
    caplog.clear()
    rc, text = _run(capsys, "eval", "spatialrgpt", "--synthetic", scene, "--engine", "simulated", "--limit", "4")
    assert rc == 0, text
    lines = _progress_lines(caplog, "images")
    assert lines and lines[-1].startswith("images 2/2") and "q/s" in lines[-1], lines
