"""What a user sees: previews with a metre scale and the docs' colours, progress inside an image, the
demo leaving nothing behind, the facade's typed results and README's Python example."""

import re
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def test_preview_has_a_colour_bar_and_near_is_blue():
    from densify.io.preview import depth_preview

    h, w = 120, 160
    depth = np.tile(np.linspace(1.0, 6.0, w, dtype=np.float32), (h, 1))
    rgb = np.zeros((h, w, 3), np.uint8)
    out = depth_preview(rgb, depth)
    assert out.shape == (h, 2 * w + 70, 3)
    near, far = out[h // 2, w + 5], out[h // 2, 2 * w - 5]
    assert near[2] > near[0] and far[0] > far[2]  # turbo as in docs/: near blue, far red
    bar = out[:, 2 * w:]
    assert (bar[:, 4:20] != 255).any() and (bar[:, 27:] < 128).any()  # the ramp and its metre labels
    depth[:10] = np.nan
    assert (depth_preview(rgb, depth)[:10, w:2 * w] == 0).all()  # no depth: black


def test_progress_inside_an_image_comes_per_round(tmp_path):
    from densify.io.images import discover
    from densify.sim.engine import SimulatedEngine
    from densify.stages.depth import DepthStage
    from densify.stages.settings import DepthConfig
    from densify.synthetic.scenes import SceneSpec, make_scene

    paths = make_scene(SceneSpec(seed=2, n_views=1, width=160, height=120)).save(tmp_path / "s")
    rounds = []
    cfg = DepthConfig(engine={"name": "simulated"}, plan={"mode": "adaptive", "count": 600, "rounds": 3})
    stage = DepthStage(cfg, SimulatedEngine(cfg.profile), on_round=rounds.append)
    (res,) = stage.run(discover([str(paths[0])]))
    assert len(rounds) >= 3 and sum(rounds) == res.queries


def test_demo_cleans_its_temporary_folder(capsys):
    from pipelines.cli import main

    before = set(Path(tempfile.gettempdir()).glob("densify-demo-*"))
    assert main(["demo", "--views", "1", "--set", "plan.count=256"]) == 0
    assert set(Path(tempfile.gettempdir()).glob("densify-demo-*")) == before
    assert "temporary folder, now removed" in capsys.readouterr().out


def test_facade_returns_typed_results(tmp_path):
    from densify import Densifier, DepthMap, RelativePose, SceneResult
    from densify.synthetic.scenes import SceneSpec, make_scene

    scene = make_scene(SceneSpec(seed=4, n_views=3, width=160, height=120))
    paths = scene.save(tmp_path / "scene")
    with Densifier(engine="simulated", plan={"count": 600}, reconstruct={"corr": {"grid": [12, 9]}}, seed=1) as d:
        maps = d.depth([str(p) for p in paths] + [str(tmp_path / "missing.png")])
        assert all(isinstance(m, DepthMap) for m in maps) and [m.ok for m in maps] == [True] * 3 + [False]
        assert maps[0].depth.shape == (120, 160) and maps[0].depth.dtype == np.float32
        assert maps[0].camera.width == 160 and len(maps[0].answers.pixels) > 0
        assert maps[3].error_kind == "missing" and "no such file" in maps[3].error
        gt = scene.views[0].depth
        assert np.mean(np.maximum(maps[0].depth / gt, gt / maps[0].depth) < 1.25) > 0.9
        pose = d.pose(paths[0], paths[1])
        assert isinstance(pose, RelativePose) and pose.ok and pose.R.shape == (3, 3)
        T = scene.relative_pose(0, 1)
        assert np.linalg.norm(pose.t_metric - T[:3, 3]) < 0.1
        rec = d.reconstruct([str(p) for p in paths], out=tmp_path / "rec")
        assert isinstance(rec, SceneResult) and rec.ok and set(rec.cam_to_world) == {"view_000", "view_001",
                                                                                   "view_002"}
    with pytest.raises(Exception, match="nosie"):
        Densifier(engine="simulated", nosie=True)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has a Python example"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
