"""Adaptive query placement: budget, one batch per round, where the queries go, pipeline end to end."""

import json
from collections import Counter, deque

import cv2
import numpy as np
import pytest
from conftest import sidecar_metrics

from densify.config.profiles import load_profile
from PIL import Image

from densify.fields import AdaptivePlanner
from densify.fields.adaptive import grid_within, round_sizes
from densify.io.cameras import Camera
from densify.io.images import ImageSource, discover
from densify.io.layout import RunLayout
from densify.sim.engine import SimulatedEngine
from densify.sim.truth import ArrayTruth
from densify.stages.depth import DepthStage
from densify.stages.summary import run_depth
from densify.stages.settings import DepthConfig
from densify.synthetic.scenes import SceneSpec, make_scene

H, W = 120, 160


def step_scene(seed=0):
    rng = np.random.default_rng(seed)
    gy, gx = np.mgrid[0:H, 0:W].astype(float)
    depth = 1.0 / (1.0 / 6.0 + 0.0004 * gx + 0.0002 * gy)
    box = (gx >= 53) & (gx < 111) & (gy >= 37) & (gy < 95)
    depth[box] = 2.0
    rgb = np.empty((H, W, 3), np.float32)
    rgb[:] = (70, 110, 200)
    rgb[box] = (200, 150, 60)
    rgb += rng.normal(0, 6, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8), depth.astype(np.float32), box


def boundary_band(mask, r):
    m = mask.astype(np.uint8)
    e = cv2.dilate(m, np.ones((3, 3), np.uint8)) != cv2.erode(m, np.ones((3, 3), np.uint8))
    return cv2.dilate(e.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))) > 0


def simulate(planner, depth, sigma=0.08, seed=0):
    """Drive a planner with noisy answers; returns pixels, values and the size of every round."""
    rng = np.random.default_rng(seed)
    pix = np.zeros((0, 2))
    vals = np.zeros(0)
    rounds = []
    pts = planner.first_points()
    while pts is not None:
        pts = np.asarray(pts)
        d = depth[pts[:, 1].astype(int), pts[:, 0].astype(int)] * np.exp(rng.normal(0, sigma, len(pts)))
        d[rng.random(len(pts)) < 0.02] = np.nan        # a few unparseable answers
        pix, vals = np.concatenate([pix, pts]), np.concatenate([vals, d])
        rounds.append(len(pts))
        pts = planner.next_points(pix, vals)
    return pix, vals, rounds


@pytest.mark.parametrize("budget,coarse,rounds", [(50, 0.5, 3), (300, 0.4, 2), (1000, 0.6, 4), (200, 1.0, 3),
                                                  (120, 0.3, 0)])
def test_never_exceeds_the_budget_and_stops(budget, coarse, rounds):
    rgb, depth, _ = step_scene()
    planner = AdaptivePlanner((H, W), budget, coarse=coarse, rounds=rounds, rgb=rgb)
    pix, _, sizes = simulate(planner, depth)
    assert len(pix) <= budget
    assert len(sizes) <= rounds + 1
    assert len(pix) >= 0.9 * budget              # and it does spend it
    assert len(np.unique(pix, axis=0)) == len(pix)  # never the same pixel twice
    assert planner.next_points(pix, np.ones(len(pix))) is None


def test_round_sizes_add_up():
    for b in (1, 17, 100, 1024, 4096):
        s = round_sizes(b, 0.5, 3)
        assert sum(s) <= b and len(s) <= 4
    assert len(grid_within(640, 480, 1024)) <= 1024


def test_concentrates_queries_near_discontinuities():
    rgb, depth, box = step_scene()
    planner = AdaptivePlanner((H, W), 600, coarse=0.4, rounds=3, rgb=rgb)
    pix, _, sizes = simulate(planner, depth)
    refine = pix[sizes[0]:].astype(int)
    near = boundary_band(box, 6)
    share = near[refine[:, 1], refine[:, 0]].mean()
    assert share > 2.5 * near.mean(), (share, near.mean())
    assert planner.last_uncertainty is not None and planner.last_uncertainty.shape == (H, W)


def _step_stage_run(tmp_path, plan: dict):
    """The step scene through the depth stage (nothing written): the result, every batch and the size of
    every round."""
    rgb, depth, _ = step_scene()
    Image.fromarray(rgb).save(tmp_path / "step.png")
    profile = load_profile("vlm3-depth")
    engine = SimulatedEngine(profile, seed=0, truth=ArrayTruth({"step": depth}))
    batches, calls = [], []
    gen = engine.generate
    engine.generate = lambda b: (batches.append(b), gen(b))[1]
    cfg = DepthConfig(engine={"name": "simulated"}, plan={"mode": "adaptive", **plan}, outputs={"ply": False},
                      forcing={"mode": "off"})  # rounds only (forced answers add audit batches: test_forcing.py)
    stage = DepthStage(cfg, engine, keep_maps=True, on_round=calls.append)
    (res,) = stage.run([ImageSource("step", tmp_path / "step.png")], intrinsics=Camera.default(W, H))
    return res, batches, calls


def test_one_batch_per_round_through_the_engine(tmp_path):
    res, batches, calls = _step_stage_run(tmp_path, {"budget": 400, "coarse": 0.5, "rounds": 3})
    assert res.status == "ok"
    assert len(batches) == len(calls) <= 4
    assert [len(b.queries) for b in batches] == calls
    assert sum(calls) == len(res.answers.pixels) == res.queries <= 400
    for b in batches:                               # every round shows the same single image: cacheable
        assert list(b.images) == [res.uid]
    assert len({tuple(q) for q in res.answers.prompt_xy}) == len(res.answers.prompt_xy)


def test_the_stage_asks_the_planners_rounds(tmp_path):
    """One planner per image plans every round, the first included: the stage asks the coarse grid, then
    `rounds` refinements of the planner's sizes (not the coarse grid's size again)."""
    res, _, calls = _step_stage_run(tmp_path, {"budget": 1200, "coarse": 0.5, "rounds": 4})
    sizes = round_sizes(1200, 0.5, 4, 256)
    assert len(calls) == len(sizes) == 5, (calls, sizes)
    assert calls[0] <= sizes[0] and all(0 < c <= s for c, s in zip(calls[1:-1], sizes[1:-1])), (calls, sizes)
    assert sum(calls) == res.queries <= 1200  # the last round spends what the others left


def test_flow_planner_on_scene_matches():
    from densify.fields import densify_flow_edge
    from densify.synthetic.scenes import SceneSpec, make_scene

    scene = make_scene(SceneSpec(seed=4, n_views=2, width=320, height=240, step_m=0.4, step_deg=4.0))
    m = scene.matches(0, 1)
    rgb = scene.views[0].rgb
    h, w = m.shape[:2]
    rng = np.random.default_rng(0)
    planner = AdaptivePlanner((h, w), 500, coarse=0.5, rounds=2, rgb=rgb, kind="flow")
    pix, tgt, sizes = np.zeros((0, 2)), np.zeros((0, 2)), []
    pts = planner.first_points()
    while pts is not None:
        t = m[pts[:, 1], pts[:, 0]].astype(float) + rng.normal(0, 1.0, (len(pts), 2))
        pix, tgt = np.concatenate([pix, pts]), np.concatenate([tgt, t])
        sizes.append(len(pts))
        pts = planner.next_points(pix, tgt, fb_error=np.zeros(len(pix)))
    assert len(pix) <= 500 and len(sizes) <= 3
    # refinement goes where the flow varies (motion boundaries): local spread of the true displacement
    ok = np.isfinite(m).all(-1)
    disp = np.where(ok[..., None], m - np.stack(np.mgrid[0:h, 0:w][::-1], -1), 0.0).astype(np.float32)
    k = np.ones((9, 9), np.uint8)
    spread = sum(cv2.dilate(disp[..., c], k) - cv2.erode(disp[..., c], k) for c in range(2))
    spread[cv2.erode(ok.astype(np.uint8), k) == 0] = np.nan      # judge only where the flow is known
    coarse, ref = pix[:sizes[0]].astype(int), pix[sizes[0]:].astype(int)
    s_ref, s_coarse = spread[ref[:, 1], ref[:, 0]], spread[coarse[:, 1], coarse[:, 0]]
    assert np.nanmean(s_ref) > 1.5 * np.nanmean(s_coarse), (np.nanmean(s_ref), np.nanmean(s_coarse))
    f = densify_flow_edge(pix, tgt, rgb)
    assert f.values.shape == (h, w, 2)


def test_pipeline_adaptive_mode_end_to_end(tmp_path):
    from densify.io.images import discover
    from densify.io.layout import RunLayout
    from densify.stages.summary import run_depth
    from densify.stages.settings import DepthConfig
    from densify.synthetic.scenes import SceneSpec, make_scene

    make_scene(SceneSpec(seed=2, n_views=1, width=320, height=240)).save(tmp_path / "scene")
    sources = discover([str(tmp_path / "scene")])
    engine = SimulatedEngine("vlm3-depth", seed=0)
    calls = []
    gen = engine.generate
    engine.generate = lambda b: (calls.append(len(b.queries)), gen(b))[1]
    cfg = DepthConfig(engine={"name": "simulated"}, plan={"mode": "adaptive", "budget": 300, "rounds": 2},
                      densify={"method": "edge"}, forcing={"mode": "off"})  # forcing's audits are calls too
    out = tmp_path / "out"
    summary, _ = run_depth(sources, cfg, engine, RunLayout(out), evaluate=sidecar_metrics)
    assert summary["ok"] == 1 and summary["failed"] == 0
    assert summary["queries"] == sum(calls) <= 300 and len(calls) <= 3
    assert summary["metrics"]["dense"]["delta1"] > 0.9
    img_dir = out / sources[0].id
    assert (img_dir / "depth.npy").is_file() and (img_dir / "confidence.npy").is_file()
    answers = [json.loads(line) for line in (img_dir / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == summary["queries"]
    # explicit points are asked exactly (no refinement)
    calls.clear()
    pts = np.array([[10, 10], [100, 50], [200, 120], [300, 230]])
    s3, _ = run_depth(sources, cfg, engine, RunLayout(tmp_path / "out3"), points=pts)
    assert calls == [4] and s3["queries"] == 4
    # the grid path is unchanged: one call per image with the grid's size
    calls.clear()
    cfg2 = DepthConfig(engine={"name": "simulated"}, plan={"count": 300, "mode": "grid"}, overwrite=True)
    run_depth(sources, cfg2, engine, RunLayout(tmp_path / "out2"))
    assert len(calls) == 1


def _adaptive_scene_run(tmp_path, engine, *, seed: int, images_in_flight: int):
    """A 3-view synthetic scene through the depth stage with an adaptive plan (400 queries, 3 rounds)."""
    paths = make_scene(SceneSpec(seed=seed, n_views=3, width=160, height=120)).save(tmp_path / "scene")
    cfg = DepthConfig(engine={"name": "simulated"}, plan={"mode": "adaptive", "count": 400, "rounds": 3},
                      images_in_flight=images_in_flight, outputs={"ply": False, "preview": False},
                      forcing={"mode": "off"},  # an audit batch of an image would ride along with its round
                      cpu_threads=0)  # rounds planned in the engine's loop (tests/test_overlap.py: in threads)
    return run_depth(discover([str(p) for p in paths]), cfg, engine, RunLayout(tmp_path / "out"))


def test_pipeline_keeps_images_in_flight_per_round(tmp_path):
    """Adaptive images advance on their own through the engine's stream: several images are in flight,
    each with one batch at a time, and an image's next round is asked as soon as its answers are back
    (no lockstep: a synchronous engine is never left waiting on the stage)."""

    class Recording(SimulatedEngine):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.order, self.nones = [], 0

        def stream(self, batches):
            for b in batches:
                if b is None:
                    self.nones += 1
                    assert self.nones < 100, "the stage waits on a synchronous engine"
                    continue
                self.order.append(next(iter(b.images)))
                yield b, self.generate(b)

    eng = Recording("vlm3-depth", seed=0)
    s, results = _adaptive_scene_run(tmp_path, eng, seed=4, images_in_flight=2)
    assert s["ok"] == 3 and eng.nones == 0
    order = eng.order
    assert len(set(order[:2])) == 2  # two images in flight from the start
    rounds = {u: order.count(u) for u in set(order)}
    assert len(rounds) == 3 and all(n >= 2 for n in rounds.values())  # coarse round, then refinement rounds
    assert all(r.queries <= 400 for r in results)


def test_adaptive_images_do_not_wait_for_each_others_rounds(tmp_path):
    """With an engine holding several batches (like the vLLM engine or the Ray pool), an image's next round
    joins the other images' earlier rounds in flight: rounds are not run in lockstep across images, and no
    image ever has two batches in flight."""

    class Holding(SimulatedEngine):
        """Holds up to 3 batches and answers the oldest when full or when the stage has nothing new."""

        capacity = 3

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.windows, self.round_of = [], Counter()

        def stream(self, batches):
            window: deque = deque()
            for b in batches:
                if b is not None:
                    uid = next(iter(b.images))
                    assert uid not in [u for u, _, _ in window], "two batches of one image in flight"
                    self.round_of[uid] += 1
                    window.append((uid, self.round_of[uid], b))
                    self.windows.append(sorted(r for _, r, _ in window))
                    if len(window) < 3:
                        continue
                if window:
                    _, _, x = window.popleft()
                    yield x, self.generate(x)
            while window:
                _, _, x = window.popleft()
                yield x, self.generate(x)

    eng = Holding("vlm3-depth", seed=0)
    s, _ = _adaptive_scene_run(tmp_path, eng, seed=5, images_in_flight=3)
    assert s["ok"] == 3 and all(n >= 2 for n in eng.round_of.values())
    assert any(len(set(w)) > 1 for w in eng.windows), eng.windows  # rounds of different depth in flight together


# ---------------------------------------------------------------------------------------------- plan.count: auto
def _auto_run(error: str, seed: int = 100, cap: int = 2304):
    """The benchmark's 640x480 room under the simulated engine's error preset, planned by the stopping rule
    (which knows nothing of the preset: only the engine's answers differ)."""
    from benchmarks.densify_bench import SceneCase

    case = SceneCase(seed, error=error)
    run = case.ask_adaptive(None, auto={"floor": 768, "cap": cap, "round": 384})
    return sum(run.calls), run.calls, run.plan


def test_auto_stops_early_on_shared_errors_and_goes_on_under_independent_noise():
    """`plan.count: auto` stops when the new answers disagree with the map beyond their own spread (errors
    they share: scale, object bias, token-scale fields, bleeding at edges) and goes on while independent
    noise is what they disagree by (benchmarks/results/densify_2026-12-03_auto.json: 10 scenes each)."""
    n, calls, rep = _auto_run("structured")
    assert rep["stop"] == "shared" and n == 1536 and calls == [768, 384, 384]  # grid + the two rounds pooled
    assert rep["ratio"] < 1.0 and rep["own_spread"] < rep["disagreement"]
    n, calls, rep = _auto_run("iid")
    assert rep["stop"] == "cap" and n == 2304 and rep["ratio"] >= 1.0  # on to the cap


def test_stop_rule_rounds_and_report():
    from densify.fields.adaptive import StopRule

    rule = StopRule(floor=100, cap=430, round=100)
    assert rule.sizes() == [100, 100, 100, 100, 30]
    for bad in (dict(floor=500, cap=400), dict(round=0), dict(ratio=0), dict(pool=0)):
        with pytest.raises(ValueError):
            StopRule(**bad)
    rgb, depth, _ = step_scene()
    planner = AdaptivePlanner((H, W), 1, rgb=rgb, stop=StopRule(floor=120, cap=360, round=60, min_rounds=3))
    pix, _, sizes = simulate(planner, depth, sigma=0.1)
    rep = planner.report()
    assert sizes[0] <= 120 and len(pix) <= 360 and len(sizes) >= 4  # min_rounds refinement rounds at least
    assert rep["mode"] == "auto" and rep["stop"] in ("shared", "precise", "cap") and rep["rounds"] == len(sizes)
    assert [h["queries"] for h in planner.history] == list(np.cumsum(sizes)[1:len(planner.history) + 1])
    assert {"own_spread", "disagreement", "ratio"} <= set(rep)
    with pytest.raises(ValueError):
        AdaptivePlanner((H, W), 1, kind="flow", stop=rule)


def test_auto_is_the_default_of_adaptive_plans():
    from densify.stages.settings import DepthConfig, PlanConfig

    cfg = DepthConfig()
    assert cfg.plan.count == "auto" and cfg.plan.is_auto and cfg.plan.mode == "adaptive"
    assert not PlanConfig(budget=300).is_auto  # a fixed budget keeps the fixed-budget plan
    grid = PlanConfig(mode="grid")  # a grid has no rounds to stop: auto is plan.auto.grid queries
    assert not grid.is_auto and grid.grid_kwargs() == {"count": 3072}
    with pytest.raises(ValueError, match="floor"):
        PlanConfig(auto={"floor": 5000})


def test_precise_answers_stop_at_the_floor_and_noisy_ones_go_on():
    """Answers that agree to within `tolerance` stop after the minimum rounds ("precise"): the error they keep
    is shared. The same scene with noisy answers goes on while the map's disagreement is their own spread."""
    from densify.fields.adaptive import StopRule

    rgb, depth, _ = step_scene()
    rule = StopRule(floor=120, cap=600, round=60, ratio=0.01)  # ratio ~off: the tolerance decides here
    precise = AdaptivePlanner((H, W), 1, rgb=rgb, stop=rule)
    pix, _, _ = simulate(precise, depth, sigma=0.03)
    assert precise.report()["stop"] == "precise" and len(pix) <= 120 + 2 * 60
    noisy = AdaptivePlanner((H, W), 1, rgb=rgb, stop=rule)
    pix2, _, _ = simulate(noisy, depth, sigma=0.2)
    assert noisy.report()["own_spread"] >= rule.tolerance and len(pix2) > len(pix)


def test_answers_that_agree_exactly_stop_precise():
    """One answer everywhere (a fixed-answer model): own spread and disagreement are rounding, so nothing is
    unexplained; the rule stops after the minimum rounds as `precise`, not `shared`."""
    from densify.fields.adaptive import StopRule

    rgb, _, _ = step_scene()
    planner = AdaptivePlanner((H, W), 1, rgb=rgb, stop=StopRule(floor=120, cap=600, round=60))
    pix, _, _ = simulate(planner, np.full((H, W), 2.5, np.float32), sigma=0.0)
    rep = planner.report()
    assert rep["stop"] == "precise" and len(pix) <= 120 + 2 * 60 and rep["own_spread"] < 1e-6
