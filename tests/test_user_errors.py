"""Every bad invocation a user can make ends in one message naming the fix and a documented exit code, never
a traceback, and before any work; the default engine is the real model, and a run without one stops at once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import IBIMS

from pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    from densify.synthetic.scenes import SceneSpec, make_scene

    d = tmp_path_factory.mktemp("scene")
    make_scene(SceneSpec(seed=1, n_views=2, width=160, height=120)).save(d)
    return d


def _run(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.err + cap.out


@pytest.mark.parametrize("args, code, words", [
    (["--engine", "simulated", "--set", "engine.options.nosie=false"], 2, ["--set engine.options.nosie=false",
                                                                           "did you mean 'noise'"]),
    (["--engine", "simulated", "--set", "engine.options.seed=abc"], 2, ["engine.options.seed", "integer"]),
    (["--engine", "simulated", "--set", "densify.method=cubic"], 2, ["densify.method", "cubic", "linear, edge"]),
    (["--engine", "simulated", "--count", "0"], 2, ["--count 0", "plan.count"]),
    (["--engine", "simulated", "--count", "-5"], 2, ["--count -5", "plan.count"]),
    (["--engine", "simulated", "--stride", "0"], 2, ["--stride 0", "plan.stride"]),
    (["--engine", "simulated", "--set", "plan.budget=0"], 2, ["--set plan.budget=0"]),
    (["--engine", "simulated", "--set", "no.such.key=1"], 2, ["--set no.such.key=1", "unknown key 'no'"]),
    (["--engine", "simulated", "--set", "plan.count"], 2, ["expected key=value"]),
    (["--engine", "nosuch"], 2, ["unknown engine 'nosuch'"]),
    (["--engine", "simulated", "--profile", "vlm3-corr"], 2, ["corr profile", "depth profile"]),
    (["--engine", "simulated", "--model", "/ckpt/x"], 2, ["--model", "simulated engine", "takes no model"]),
    (["--engine", "vllm"], 3, ["vllm", "pip install 'densify[vllm]'"]),
    (["--engine", "openai", "--set", "engine.options.base_url=http://127.0.0.1:9/v1"], 3,
     ["cannot reach", "127.0.0.1:9"]),
    (["--engine", "hf", "--model", "./nosuch_model"], 3, ["--model ./nosuch_model: no such folder", "--engine",
                                                          "densify demo"]),
])
def test_bad_invocations_give_one_message_and_no_work(scene_dir, tmp_path, capsys, monkeypatch, args, code, words):
    if args[:2] == ["--engine", "vllm"] and __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: pytest.fail("went to the hub"))
    out = tmp_path / "out"
    rc, text = _run(capsys, "depth", str(scene_dir), "--out", str(out), *args)
    assert rc == code, text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    for w in words:
        assert w in text, (w, text)
    assert not out.exists()  # stopped before any work


def test_errors_in_a_config_file_name_the_file_and_key(scene_dir, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("plan: {count: 10}\nengine: {name: simulated, nmae: x}\n")
    rc, text = _run(capsys, "depth", str(scene_dir), "--out", str(tmp_path / "o"), "--config", str(cfg))
    assert rc == 2 and str(cfg) in text and "engine.nmae: unknown key 'nmae' (did you mean 'name'?)" in text
    rc, text = _run(capsys, "depth", str(scene_dir), "--out", str(tmp_path / "o"), "--config", str(tmp_path / "no"))
    assert rc == 2 and "no such file" in text


@pytest.mark.parametrize("text, words", [
    ("plan:\n  count: !!python/object/apply:os.system [echo hi]\n", ["line 2, column 10", "remove the tag"]),
    ("plan: !custom {count: 3}\n", ["'!custom'", "line 1, column 7", "remove the tag"]),
    ("plan:\n  count: [1, 2\n", ["expected ',' or ']'", "line 3"]),
])
def test_a_yaml_error_in_a_config_file_is_one_line(scene_dir, tmp_path, capsys, text, words):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    rc, out = _run(capsys, "depth", str(scene_dir), "--out", str(tmp_path / "o"), "--config", str(cfg))
    lines = out.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"densify depth: error: {cfg}: not valid YAML"), out
    assert all(w in lines[0] for w in words), out
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file_is_refused_before_the_work(scene_dir, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    for cmd in (["depth", str(scene_dir)], ["label", str(scene_dir)], ["reconstruct", str(scene_dir)]):
        rc, text = _run(capsys, *cmd, "--out", str(f), "--engine", "simulated")
        assert rc == 2 and "is a file, not a folder" in text and "Traceback" not in text


def test_label_with_no_ray_cluster_says_so(scene_dir, tmp_path, capsys):
    pytest.importorskip("ray")
    import psutil

    if Path("/tmp/ray/ray_current_cluster").exists() or any(
            p.info["name"] == "gcs_server" for p in psutil.process_iter(["name"])):
        pytest.skip("a Ray cluster runs on this machine (another job's): 'auto' would find it")
    rc, text = _run(capsys, "label", str(scene_dir), "--out", str(tmp_path / "o"), "--engine", "simulated",
                    "--ray-address", "auto")
    assert rc == 3 and "Ray could not start or connect" in text and "ray start --head" in text
    assert "Traceback" not in text


def test_label_pool_larger_than_the_local_ray_stops_at_once_with_exit_3(scene_dir, tmp_path, capsys):
    pytest.importorskip("ray")
    import re

    n = 2 * (os.cpu_count() or 1) + 1  # more actors than the local Ray has CPUs
    t0 = time.monotonic()
    rc, text = _run(capsys, "label", str(scene_dir), "--out", str(tmp_path / "o"), "--engine", "simulated",
                    "--count", "64", "--set", f"ray.num_actors={n}")
    assert rc == 3 and time.monotonic() - t0 < 120, text
    m = re.search(rf"{n} Ray actors need {n} CPUs in all but the cluster has (\d+)", text)
    assert m and int(m.group(1)) < n and "num_actors" in text and "Traceback" not in text, text


def test_debug_shows_the_traceback(scene_dir, tmp_path, capsys):
    rc, text = _run(capsys, "--debug", "depth", str(scene_dir), "--out", str(tmp_path / "o"), "--count", "0")
    assert rc == 2 and "Traceback" in text


def test_default_engine_is_the_real_model_and_a_missing_one_stops_at_once(tmp_path):
    """`densify depth` on real photos with default settings and no model: one message, no folders, < 10 s."""
    rgb = IBIMS.parent / "rgb"
    if not rgb.is_dir():
        pytest.skip("iBims sample not beside the checkout")
    out = tmp_path / "out"
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9")  # a hub that refuses at once, as offline
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "pipelines", "depth", str(rgb), "--out", str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert p.returncode == 3, p.stderr
    assert took < 10, took
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "--model" in lines[0] and "--engine" in lines[0] and "densify demo" in lines[0]
    assert "facebook/VLM3-depth" in lines[0] and not out.exists()


def test_hub_models_are_checked_in_the_cache_and_offline(monkeypatch):
    from densify.engines import EngineStartError
    from densify.stages.engine import check_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EngineStartError, match="HF_HUB_OFFLINE"):
        check_model("facebook/VLM3-depth")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, f: "/cache/config.json")
    check_model("facebook/VLM3-depth")  # cached: fine, and no network


def test_simulated_engine_without_truth_fails_each_image_with_a_record(tmp_path, capsys):
    """Real photos and the simulated engine: no invented depth; every image fails, saying why."""
    rgb = IBIMS.parent / "rgb"
    if not rgb.is_dir():
        pytest.skip("iBims sample not beside the checkout")
    out = tmp_path / "out"
    rc, text = _run(capsys, "depth", str(rgb / "corridor_01.png"), str(rgb / "factory_01.png"), "--out", str(out),
                    "--engine", "simulated", "--count", "64")
    assert rc == 1
    s = json.loads((out / "summary.json").read_text())
    assert s["ok"] == 0 and s["failed"] == 2 and s["simulated"] is True
    assert all("no ground truth" in f["error"] and f["kind"] == "engine" for f in s["failed_images"])
    assert not list(out.glob("*/depth.npy")) and "SIMULATED" in text


# answers paced like a GPU engine's (about 1 s per 3,072-query image), so a job is still running when its
# first image is done, however fast the machine (answers_per_s is not part of the answers' identity)
PACED = ("--set", "engine.options.answers_per_s=3000")


def _start_until_a_result(out: Path, *argv, timeout: float = 120, pattern: str = "*/result.json") -> subprocess.Popen:
    """`densify ARGV` in a subprocess, returned once its first image is done (a result.json exists)."""
    # as from a terminal: a shell without job control starts background jobs (`pytest ... &`) with SIGINT
    # ignored, and children inherit that
    p = subprocess.Popen([sys.executable, "-m", "pipelines", *argv], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + timeout
    while not list(out.glob(pattern)):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1]
        time.sleep(0.05)
    return p


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_writes_the_summary_of_what_finished(tmp_path, sig, code):
    from densify.synthetic.scenes import SceneSpec, make_scene

    make_scene(SceneSpec(seed=3, n_views=8, width=320, height=240)).save(tmp_path / "scene")
    out = tmp_path / "out"
    p = _start_until_a_result(out, "depth", str(tmp_path / "scene"), "--out", str(out), "--engine", "simulated",
                              "--count", "3072", "--set", "plan.mode=grid", *PACED)
    p.send_signal(sig)
    _, err = p.communicate(timeout=30)
    assert p.returncode == code, err
    assert "Traceback" not in err and "rerun" not in err.lower() or "run the same command again" in err
    s = json.loads((out / "summary.json").read_text())
    assert s["interrupted"] is True and s["complete"] is False and s["ok"] >= 1
    assert len(list(out.glob("*/result.json"))) == s["ok"]
    # resuming finishes the rest and redoes nothing
    p = subprocess.run([sys.executable, "-m", "pipelines", "depth", str(tmp_path / "scene"), "--out", str(out),
                        "--engine", "simulated", "--count", "3072", "--set", "plan.mode=grid", *PACED], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    s2 = json.loads((out / "summary.json").read_text())
    assert p.returncode == 0 and s2["skipped"] == s["ok"] and s2["ok"] + s2["skipped"] == 8


def test_ctrl_c_on_a_label_job_with_local_ray_stops_fast_and_starts_no_second_ray(tmp_path):
    pytest.importorskip("ray")
    from densify.synthetic.scenes import SceneSpec, make_scene

    make_scene(SceneSpec(seed=5, n_views=12, width=320, height=240)).save(tmp_path / "scene")
    out = tmp_path / "out"
    p = _start_until_a_result(out, "label", str(tmp_path / "scene"), "--out", str(out), "--engine", "simulated",
                              "--count", "3072", "--set", "ray.num_actors=1", *PACED)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert time.monotonic() - t0 < 30
    assert err.count("Started a local Ray instance") <= 1 and "Traceback" not in err
    s = json.loads((out / "summary.json").read_text())
    assert s["interrupted"] is True and s["ok"] >= 1 and not s["complete"]


def test_sigterm_on_a_label_job_with_local_ray_exits_143_with_densify_s_message_and_resumes(tmp_path):
    # ray.init installs its own SIGTERM handler (sys.exit(15)) and a crash dump: densify's must win
    pytest.importorskip("ray")
    from densify.synthetic.scenes import SceneSpec, make_scene

    make_scene(SceneSpec(seed=7, n_views=8, width=320, height=240)).save(tmp_path / "scene")
    out = tmp_path / "out"
    argv = ["label", str(tmp_path / "scene"), "--out", str(out), "--engine", "simulated", "--count", "3072",
            "--set", "ray.num_actors=1", *PACED]
    p = _start_until_a_result(out, *argv)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "densify label: terminated" in err and "SIGTERM received" not in err and "Traceback" not in err, err
    s = json.loads((out / "summary.json").read_text())
    assert s["interrupted"] is True and s["ok"] >= 1 and not s["complete"]
    p = subprocess.run([sys.executable, "-m", "pipelines", *argv], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    s2 = json.loads((out / "summary.json").read_text())
    assert p.returncode == 0 and s2["complete"] and s2["skipped"] == s["ok"] and s2["ok"] + s2["skipped"] == 8, p.stderr


def test_ctrl_c_on_reconstruct_writes_what_finished(tmp_path):
    from densify.synthetic.scenes import SceneSpec, make_scene

    make_scene(SceneSpec(seed=6, n_views=8, width=320, height=240)).save(tmp_path / "scene")
    out = tmp_path / "out"
    p = _start_until_a_result(out, "reconstruct", str(tmp_path / "scene"), "--out", str(out), "--engine",
                              "simulated", "--set", "depth.plan.mode=grid", *PACED, pattern="depth/*/result.json")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err, err
    s = json.loads((out / "summary.json").read_text())
    assert s["interrupted"] is True and s["complete"] is False and s["images"] == 8


def test_opencv_without_contrib_stops_at_once_with_the_fix(scene_dir, tmp_path, capsys, monkeypatch):
    # hosts with their own OpenCV (opencv-python shadowing the contrib wheel; seen on a GPU host) lack
    # cv2.ximgproc, which the default densifier and adaptive plan need
    import cv2

    monkeypatch.delattr(cv2, "ximgproc")
    out = tmp_path / "out"
    rc, text = _run(capsys, "depth", str(scene_dir), "--out", str(out), "--engine", "simulated")
    assert rc == 3, text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    assert "cv2.ximgproc" in text and "pip install opencv-contrib-python-headless" in text
    assert not (out / "summary.json").exists()
    # the linear densifier on a grid needs no contrib module
    rc, text = _run(capsys, "depth", str(scene_dir), "--out", str(out), "--engine", "simulated",
                    "--set", "densify.method=linear", "--set", "plan.mode=grid")
    assert rc == 0, text


def test_missing_open3d_stops_at_once_when_clouds_are_asked_for(scene_dir, tmp_path, capsys, monkeypatch):
    # GPU hosts often lack Open3D; cloud.ply is a default output of `densify depth`, and finding out after
    # the engine answered the first image would lose that work
    monkeypatch.setitem(sys.modules, "open3d", None)  # `import open3d` now raises ImportError
    out = tmp_path / "out"
    rc, text = _run(capsys, "depth", str(scene_dir), "--out", str(out), "--engine", "simulated")
    assert rc == 3, text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    assert "Open3D" in text and "pip install open3d" in text and "outputs.ply=false" in text
    assert not (out / "summary.json").exists()
    rc, text = _run(capsys, "depth", str(scene_dir), "--out", str(out), "--engine", "simulated",
                    "--set", "outputs.ply=false")
    assert rc == 0, text
    assert not list(out.glob("**/cloud.ply")) and list(out.glob("**/depth.npy"))
    rc, text = _run(capsys, "reconstruct", str(scene_dir), "--out", str(tmp_path / "rec"), "--engine", "simulated")
    assert rc == 3 and "Traceback" not in text and "pip install open3d" in text, text
    assert not (tmp_path / "rec" / "depth").exists()  # stopped before any depth map was asked for
