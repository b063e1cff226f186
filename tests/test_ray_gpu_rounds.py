"""K engines on each of G GPUs: every GPU gets a placement-group bundle, each GPU holds K actors, and the
actors start in K rounds of G (one per GPU in each round), not all one after another. Ray is given two
logical GPUs here; the engine records when it was built."""

import sys
import time

import pytest

ray = pytest.importorskip("ray")

from densify.engines.base import Engine  # noqa: E402
from densify.engines.ray_pool import RayPoolEngine  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class SlowStart(Engine):
    """Takes `start_s` to build and remembers when that was (the stand-in for a vLLM engine start)."""

    name = "slowstart"

    def __init__(self, profile, *, start_s: float = 0.6, **_):
        self.t0 = time.time()
        time.sleep(start_s)
        self.t1 = time.time()

    def generate(self, batch):
        return []


@pytest.fixture(scope="module", autouse=True)
def ray_with_two_gpus():
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_engines_per_gpu_on_two_gpus_start_in_rounds_one_per_gpu():
    pool = RayPoolEngine("vlm3-depth", engine=SlowStart, engine_options={"start_s": 0.6}, num_gpus_per_actor=1,
                         engines_per_gpu=2)
    try:
        assert pool.num_actors == 4
        infos = ray.get([a.info.remote() for a in pool.actors])
        times = ray.get([a.__ray_call__.remote(lambda self: (self.engine.t0, self.engine.t1)) for a in pool.actors])
        gpus = [tuple(i["gpu_ids"]) for i in infos]
        assert all(len(g) == 1 for g in gpus)
        # two engines on each GPU, and actor i shares its GPU with actor i + 2
        assert sorted(gpus) == sorted([gpus[0], gpus[0], gpus[1], gpus[1]]) and gpus[0] != gpus[1]
        assert gpus[2] == gpus[0] and gpus[3] == gpus[1]
        # round 1 (actors 0 and 1, different GPUs) starts together; round 2 only after round 1 is up
        (a0, b0), (a1, b1), (a2, _), (a3, _) = times
        assert abs(a0 - a1) < 0.5
        assert min(a2, a3) >= max(b0, b1) - 0.05
    finally:
        pool.close()
    assert pool._pg is None


def test_one_gpu_with_two_engines_needs_no_placement_group():
    pool = RayPoolEngine("vlm3-depth", engine=SlowStart, engine_options={"start_s": 0.1}, num_gpus_per_actor=1,
                         engines_per_gpu=2, num_actors=2)
    try:
        assert pool._pg is None and pool.num_actors == 2
        gpus = [tuple(i["gpu_ids"]) for i in ray.get([a.info.remote() for a in pool.actors])]
        assert gpus[0] == gpus[1]  # fractional: both on one GPU
    finally:
        pool.close()


def test_an_engine_dying_in_a_gpu_bundle_is_restarted_there_and_no_batch_fails(tmp_path):
    """The placement-group path keeps the pool's fault handling: an actor whose process dies is restarted by
    Ray in its GPU's bundle, its batch is resubmitted, and every batch is answered."""
    from test_ray_pool import SeededTruth, make_batch

    from densify.sim.engine import SimulatedEngine

    class DiesOnce(SimulatedEngine):
        def __init__(self, profile, *, flag: str, **kw):
            super().__init__(profile, **kw)
            self.flag = flag

        def generate(self, batch):
            import os
            from pathlib import Path

            if not os.path.exists(self.flag):
                Path(self.flag).touch()
                os._exit(1)
            return super().generate(batch)

    flag = tmp_path / "died"
    pool = RayPoolEngine("vlm3-depth", engine=DiesOnce, engine_options={"flag": str(flag), "truth": SeededTruth()},
                         num_gpus_per_actor=1, engines_per_gpu=2)
    try:
        before = [tuple(i["gpu_ids"]) for i in ray.get([a.info.remote() for a in pool.actors])]
        got = {b.tag: c for b, c in pool.stream([make_batch(i, n=20) for i in range(8)])}
        after = [tuple(i["gpu_ids"]) for i in ray.get([a.info.remote() for a in pool.actors])]
    finally:
        pool.close()
    assert flag.exists() and pool.stats["actor_failures"] >= 1
    assert sorted(got) == list(range(8)) and all(c.error is None for cs in got.values() for c in cs)
    assert after == before  # the restarted actor is on its GPU again
