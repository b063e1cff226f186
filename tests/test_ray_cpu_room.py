"""Ray CPU tasks (`ray.cpu_workers`) need CPUs that the engine actors leave free: a pool that holds them all
makes the stage stop with the fix instead of waiting forever, and `spare_cpus` leaves room. Its own Ray of 4
CPUs, so no other test's actors hold any."""

import functools
import re
import threading
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from densify.config.loading import ConfigError  # noqa: E402
from densify.engines.ray_pool import RayPoolEngine  # noqa: E402
from densify.sim.truth import ConstantTruth  # noqa: E402
from densify.stages import depth as depth_mod  # noqa: E402
from densify.stages import workers as workers_mod  # noqa: E402
from densify.stages.settings import DepthConfig  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _one_image(folder: Path):
    import cv2

    from densify.io.images import discover

    folder.mkdir()
    cv2.imwrite(str(folder / "v0.png"), np.full((120, 160, 3), 128, np.uint8))
    np.save(folder / "v0.depth.npy", np.full((120, 160), 2.0, np.float32))
    return discover([folder])


def test_cpu_workers_need_a_cpu_the_actors_leave_free(tmp_path, monkeypatch):
    """A CPU-only pool takes every CPU by default, so CPU tasks could never run: the stage says so within
    seconds instead of waiting forever; `spare_cpus` leaves them room (build_engine spares ray.cpu_workers)."""
    monkeypatch.setattr(workers_mod, "wait_for_a_free_cpu",
                        functools.partial(workers_mod.wait_for_a_free_cpu, timeout_s=3.0))
    src = _one_image(tmp_path / "in")
    cfg = DepthConfig(engine={"name": "ray", "options": {"engine": "simulated"}}, plan={"mode": "grid", "count": 64},
                      densify={"method": "linear"}, outputs={"preview": False, "ply": False})
    with RayPoolEngine("vlm3-depth", engine="simulated", engine_options={"truth": ConstantTruth(2.0)}) as p:
        assert p.num_actors == 4
        out: dict = {}

        def run():
            try:
                list(depth_mod.DepthStage(cfg, p, cpu_workers=1).run(src))
            except Exception as exc:
                out["error"] = exc

        th = threading.Thread(target=run, daemon=True)
        th.start()
        th.join(60)
        assert not th.is_alive(), "the stage waited for a CPU that never comes"
        assert isinstance(out.get("error"), ConfigError)
        assert re.search(r"ray.cpu_workers=1 .* none of the Ray cluster.s 4 CPUs was free", str(out["error"]))
    with RayPoolEngine("vlm3-depth", engine="simulated", spare_cpus=1) as p:
        assert p.num_actors == 3
        [res] = list(depth_mod.DepthStage(cfg, p, cpu_workers=1).run(src))
        assert res.status == "ok" and res.queries > 0
