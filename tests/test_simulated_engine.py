import numpy as np
import pytest

from densify.config.profiles import load_profile
from densify.engines import create_engine
from densify.engines.base import EngineBatch, Sampling
from densify.eval.metrics import delta1
from densify.io.cameras import Camera, prepare_image
from densify.queries.answers import collect_depth
from densify.queries.plan import grid_points, plan_queries
from densify.queries.prompts import depth_batch, image_ref
from densify.sim.engine import ErrorModel, SimulatedEngine
from densify.sim.truth import ArrayTruth


def _scene(textured_image):
    h, w = textured_image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    depth = (2.0 + xx / w * 3.0 + (yy > h // 2) * 1.5).astype(np.float32)
    cam = Camera(500, 500, w / 2, h / 2, w, h)
    return depth, cam


def _depth_case(textured_image, count, sampling=None):
    """VLM3-depth queries on a count grid of the scene: (true depth, profile, plan, batch with truth)."""
    depth, cam = _scene(textured_image)
    p = load_profile("vlm3-depth")
    prep = prepare_image(textured_image, cam, focal=1000, coord_range=2000)
    plan = plan_queries(grid_points(640, 480, count=count), prep.pixel_map)
    batch = depth_batch(prep, plan, p, uid="i", ref=image_ref("i", prep), sampling=sampling)
    return depth, p, plan, batch


@pytest.mark.parametrize("profile", ["vlm3-depth", "depthlm"])
def test_exact_answers_read_coordinates_from_the_prompt(textured_image, profile):
    depth, cam = _scene(textured_image)
    p = load_profile(profile)
    prep = prepare_image(textured_image, cam, coord_range=p.coord_range, **p.preprocess.image_options())
    plan = plan_queries(grid_points(640, 480, count=(8, 6)), prep.pixel_map, marker=p.marker)
    eng = create_engine("simulated", profile=p, noise=False, truth=ArrayTruth({"i": depth}))
    batch = depth_batch(prep, plan, p, uid="i", ref=image_ref("i", prep))
    # a marked image's only trace of its pixel is the image itself and its provenance (no hint)
    assert all(not hasattr(q, "hint") for q in batch.queries)
    ans = collect_depth(p, plan.pixels, plan.prompt_xy, eng.generate(batch))
    gt = depth[plan.pixels[:, 1], plan.pixels[:, 0]]
    assert np.allclose(ans.values, gt, atol=0.006)


def test_wrong_prompt_gives_wrong_answers(textured_image):
    depth, p, plan, batch = _depth_case(textured_image, (8, 6))
    for q in batch.queries:  # swap x and y in the text: a prompt bug
        q.text = q.text.replace("coordinates (", "coordinates (X").replace(", ", ") (", 1)
    ans = collect_depth(p, plan.pixels, plan.prompt_xy, SimulatedEngine(p, truth=ArrayTruth({'i': depth}), noise=False).generate(batch))
    gt = depth[plan.pixels[:, 1], plan.pixels[:, 0]]
    assert not np.allclose(ans.values, gt, atol=0.01, equal_nan=False)


def test_default_noise_gives_point_delta1_near_090(textured_image):
    depth, p, plan, batch = _depth_case(textured_image, (80, 60))
    eng = SimulatedEngine(p, truth=ArrayTruth({'i': depth}), seed=3)
    ans = collect_depth(p, plan.pixels, plan.prompt_xy, eng.generate(batch))
    d1 = delta1(ans.values, depth[plan.pixels[:, 1], plan.pixels[:, 0]])
    assert 0.87 < d1 < 0.93
    fails = ans.failure_counts()
    assert 0.003 < sum(fails.values()) / len(plan) < 0.02


def test_answers_do_not_depend_on_batching(textured_image):
    depth, p, plan, batch = _depth_case(textured_image, (8, 6))
    eng = SimulatedEngine(p, truth=ArrayTruth({'i': depth}), seed=1)
    full = [c.text for c in eng.generate(batch)]
    rev = EngineBatch(batch.images, batch.queries[::-1], batch.sampling)
    assert [c.text for c in eng.generate(rev)][::-1] == full
    assert [c.text for c in SimulatedEngine(p, truth=ArrayTruth({'i': depth}), seed=2).generate(batch)] != full


def test_logprobs_track_error(textured_image):
    depth, p, plan, batch = _depth_case(textured_image, (40, 30), Sampling(logprobs=True))
    comps = SimulatedEngine(p, truth=ArrayTruth({'i': depth}), error=ErrorModel(unparseable_rate=0)).generate(batch)
    ans = collect_depth(p, plan.pixels, plan.prompt_xy, comps)
    err = np.abs(np.log(ans.values / depth[plan.pixels[:, 1], plan.pixels[:, 0]]))
    assert np.corrcoef(err, -ans.logprobs)[0, 1] > 0.8


def test_answers_per_s_paces_batches_without_changing_answers(textured_image):
    import time

    depth, p, plan, batch = _depth_case(textured_image, (25, 20))  # 500 queries
    assert len(batch.queries) == 500
    truth = ArrayTruth({"i": depth})
    free = SimulatedEngine(p, truth=truth, seed=1)
    paced = create_engine("simulated", profile=p, truth=truth, seed=1, answers_per_s=5000)
    expected = [c.text for c in free.generate(batch)]
    t0 = time.perf_counter()
    got = [paced.generate(batch), paced.generate(batch)]
    wall = time.perf_counter() - t0
    assert wall >= 0.2 - 1e-3  # 1000 answers at 5,000/s: a lower bound on the time they take
    assert wall < 1.0  # the schedule runs from the first batch's arrival, not from the engine's creation
    assert all([c.text for c in out] == expected for out in got)
    assert 0 < paced.stats["paced_s"] <= wall
    # idle time earns no credit: a batch after a pause still takes its own 0.1 s
    time.sleep(0.15)
    t0 = time.perf_counter()
    paced.generate(batch)
    assert time.perf_counter() - t0 >= 0.1 - 1e-3
    with pytest.raises(ValueError, match="answers_per_s"):
        SimulatedEngine(p, truth=truth, answers_per_s=0)


def test_depthlm_unmarkable_points_get_a_failure_record_and_are_never_asked(tmp_path):
    """Through the depth stage: points too close to a border for the marker are not sent to the engine;
    answers.jsonl and the failure counts say `unmarkable`, the other points are answered."""
    import json

    from densify import Densifier
    from densify.synthetic.scenes import SceneSpec, make_scene

    paths = make_scene(SceneSpec(seed=2, n_views=1, width=320, height=240)).save(tmp_path / "scene")
    cam = json.loads(paths[0].with_suffix(".json").read_text())
    s = 750.0 / cam["fx"]  # depthlm's scale: the 5-px margin in original pixels is 5 / s
    inner = [(160, 120), (100, 80), (200, 150)]
    edge = [(0, 120), (160, 0), (319, 120), (160, 239)]
    with Densifier(engine="simulated", profile="depthlm", plan={"mode": "grid"}, noise=False) as d:
        [m] = d.depth(paths, points=np.array(inner + edge, float), out=tmp_path / "out")
    recs = [json.loads(line) for line in (tmp_path / "out" / m.id / "answers.jsonl").read_text().splitlines()]
    by_pixel = {tuple(r["pixel"]): r for r in recs}
    assert len(recs) == 7 and s > 1
    assert all(by_pixel[tuple(map(float, p))]["failure"] == "unmarkable" for p in edge)
    assert all(by_pixel[tuple(map(float, p))]["failure"] is None for p in inner)
    assert all(by_pixel[tuple(map(float, p))]["text"] == "" for p in edge)
    assert m.ok
