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
