"""One source of defaults: every job's settings model defaults to what its YAML in configs/pipelines/ says,
the YAML names every key (it is the documentation), and Python callers (`Densifier`, `LabelJob` from the
model's defaults) give the same results as the commands, file for file."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from densify.config.loading import config_dir
from densify.stages.settings import DepthConfig, LabelConfig, ReconstructConfig, load_config

JOBS = [(DepthConfig, "depth"), (LabelConfig, "label"), (ReconstructConfig, "reconstruct")]
# Keys a YAML leaves out on purpose: the depth stage inside reconstruct takes its engine, model and
# overwrite from reconstruct's own keys (ReconstructConfig.depth_config).
NOT_IN_YAML = {"reconstruct": {("depth", "engine"), ("depth", "model"), ("depth", "overwrite")},
               "label": {("ray", "engine"), ("ray", "engine_options")}}  # the engine: section's, never set here


def _yaml(name: str) -> dict:
    return yaml.safe_load((config_dir() / "pipelines" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("model, name", JOBS)
def test_code_defaults_are_the_yaml(model, name):
    from_yaml = load_config(model, None, (), default_name=name).model_dump(mode="json")
    assert from_yaml == model().model_dump(mode="json"), name


def _missing(model, data: dict, path: tuple = ()) -> list[tuple]:
    """Fields of `model` that the YAML mapping `data` does not name (nested models too)."""
    from pydantic import BaseModel

    out = []
    for key, info in model.model_fields.items():
        where = path + (key,)
        if key not in data:
            out.append(where)
            continue
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel) and isinstance(data[key], dict):
            out += _missing(sub, data[key], where)
    return out


@pytest.mark.parametrize("model, name", JOBS)
def test_the_yaml_names_every_key(model, name):
    missing = set(_missing(model, _yaml(name))) - NOT_IN_YAML.get(name, set())
    assert not missing, f"configs/pipelines/{name}.yaml lacks {sorted('.'.join(m) for m in missing)}"


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from densify.synthetic.scenes import SceneSpec, make_scene

    root = tmp_path_factory.mktemp("scene")
    make_scene(SceneSpec(seed=6, n_views=3, width=160, height=120)).save(root)
    return root


def _same_image_outputs(a: Path, b: Path, ids) -> None:
    """Per image: the same files, the same settings fingerprint, the same depth."""
    for i in ids:
        fa = sorted(p.name for p in (a / i).iterdir())
        assert fa == sorted(p.name for p in (b / i).iterdir()), i
        ra, rb = (json.loads((d / i / "result.json").read_text()) for d in (a, b))
        assert ra["fingerprint"] == rb["fingerprint"], i
        assert np.array_equal(np.load(a / i / "depth.npy"), np.load(b / i / "depth.npy")), i


def _ids(scene: Path) -> list[str]:
    return sorted(p.stem for p in scene.glob("view_*.png"))


def test_facade_depth_is_the_depth_command(scene, tmp_path):
    from densify import Densifier
    from pipelines.cli import main

    assert main(["depth", str(scene), "--out", str(tmp_path / "cli"), "--engine", "simulated"]) == 0
    with Densifier(engine="simulated") as d:
        maps = d.depth(str(scene), out=tmp_path / "py")
    assert all(m.ok for m in maps)
    _same_image_outputs(tmp_path / "cli", tmp_path / "py", _ids(scene))


def test_label_job_from_python_defaults_is_the_label_command(scene, tmp_path):
    from densify.stages.label import LabelJob
    from pipelines.cli import main

    assert main(["label", str(scene), "--out", str(tmp_path / "cli"), "--engine", "simulated", "--no-ray"]) == 0
    cfg = LabelConfig(engine={"name": "simulated"}, ray={"enabled": False})
    LabelJob(cfg, tmp_path / "py").run(str(scene))
    _same_image_outputs(tmp_path / "cli", tmp_path / "py", _ids(scene))


def test_facade_reconstruct_is_the_reconstruct_command(scene, tmp_path):
    from densify import Densifier
    from pipelines.cli import main

    assert main(["reconstruct", str(scene), "--out", str(tmp_path / "cli"), "--engine", "simulated"]) == 0
    with Densifier(engine="simulated") as d:
        rec = d.reconstruct(str(scene), out=tmp_path / "py")
    assert rec.ok
    a, b = tmp_path / "cli", tmp_path / "py"
    _same_image_outputs(a / "depth", b / "depth", _ids(scene))
    pa, pb = (json.loads((d / "poses.json").read_text()) for d in (a, b))
    assert pa == pb
