"""The engine is never left waiting for the driver's CPU work: rounds are planned and finished images densified
and written in threads while the engine works (DepthConfig.cpu_threads), and run summaries say how busy a paced
engine was."""

import threading
import time

import pytest

from densify.sim.engine import SimulatedEngine
from densify.stages.depth import DepthStage
from densify.stages.summary import run_depth
from densify.stages.settings import DepthConfig


class _Busy(SimulatedEngine):
    """Answers like the simulator, but each batch keeps the engine busy for `hold` seconds (a GPU's time)."""

    def __init__(self, *a, hold: float = 0.15, **k):
        super().__init__(*a, **k)
        self.hold, self.in_engine = hold, threading.Event()

    def generate(self, batch):
        self.in_engine.set()
        try:
            out = super().generate(batch)
            time.sleep(self.hold)
            return out
        finally:
            self.in_engine.clear()


def _sources(tmp_path, n=4):
    from densify.io.images import discover
    from densify.synthetic.scenes import SceneSpec, make_scene

    make_scene(SceneSpec(seed=6, n_views=n, width=200, height=150)).save(tmp_path / "scene")
    return discover([str(tmp_path / "scene")])


def _run(tmp_path, threads: int):
    eng = _Busy("vlm3-depth", seed=0)
    cfg = DepthConfig(engine={"name": "simulated"}, cpu_threads=threads, images_in_flight=2,
                      plan={"auto": {"floor": 192, "round": 96, "cap": 480}}, forcing={"mode": "off"})
    stage = DepthStage(cfg, eng)
    seen, finishes = [], []
    finish = stage.finish

    def slow_finish(task, completions, **kw):  # the driver's CPU per map, watched from where it runs
        t0 = time.perf_counter()
        overlapped = False
        while time.perf_counter() - t0 < 0.2:
            overlapped |= eng.in_engine.is_set()
            time.sleep(0.005)
        seen.append(overlapped)
        finishes.append(threading.current_thread().name)
        return finish(task, completions, **kw)

    stage.finish = slow_finish
    results = list(stage.run(_sources(tmp_path)))
    return results, seen, finishes


def test_images_are_finished_while_the_engine_answers_other_images(tmp_path):
    results, seen, where = _run(tmp_path / "a", threads=2)
    assert len(results) == 4 and all(r.ok for r in results)
    assert any(seen), "no image was densified while the engine held a batch"
    assert all(name.startswith("densify-cpu") for name in where)
    serial, seen0, where0 = _run(tmp_path / "b", threads=0)
    assert not any(seen0) and all(not n.startswith("densify-cpu") for n in where0)  # the engine waited
    for a, b in zip(sorted(results, key=lambda r: r.id), sorted(serial, key=lambda r: r.id)):
        assert a.queries == b.queries and a.plan == b.plan  # the same work, in another order


def test_summaries_report_a_paced_engine_busy_share(tmp_path):
    eng = SimulatedEngine("vlm3-depth", seed=0, answers_per_s=20000.0)
    cfg = DepthConfig(engine={"name": "simulated"}, plan={"auto": {"floor": 192, "round": 96, "cap": 480}})
    summary, res = run_depth(_sources(tmp_path, n=2), cfg, eng, None)
    b = summary["engine_busy"]
    asked = summary["queries"] + summary["forcing"]["audited"]  # the audits are engine work too
    assert b["engines"] == 1 and b["busy_s"] == pytest.approx(asked / 20000.0, abs=1e-3)
    assert 0 < b["share"] <= 1.0 and len(res) == 2
    t = summary["timeline"]  # when the first and the last map came out
    assert t["maps"] == 2 and 0 < t["first_map_s"] <= t["last_map_s"] <= summary["wall_s"] + 5e-4  # ms rounding


def test_timeline_gives_the_first_and_the_last_map():
    from densify.stages.summary import timeline

    assert timeline([]) is None
    assert timeline([4.0]) == {"maps": 1, "first_map_s": 4.0, "last_map_s": 4.0}
    assert timeline([12.0, 10.0, 14.0, 16.0]) == {"maps": 4, "first_map_s": 10.0, "last_map_s": 16.0}


def test_a_summary_counts_every_image_that_has_a_result_json(tmp_path):
    """Images densified in threads are certified (result.json) by the stage's own thread as it hands them on:
    a stream closed early leaves no result.json that its results did not report."""
    from densify.io.layout import RunLayout

    eng = _Busy("vlm3-depth", seed=0, hold=0.05)
    cfg = DepthConfig(engine={"name": "simulated"}, cpu_threads=2, images_in_flight=3, outputs={"ply": False},
                      plan={"auto": {"floor": 192, "round": 96, "cap": 480}}, forcing={"mode": "off"})
    stage = DepthStage(cfg, eng, layout=RunLayout(tmp_path / "out"))
    stream = stage.run(_sources(tmp_path, n=5))
    first = next(stream)
    stream.close()  # as an interrupted run does
    done = list((tmp_path / "out").glob("*/result.json"))
    assert first.ok and [p.parent.name for p in done] == [first.id]
