"""The simulated engine's error presets: the statistics of the errors they generate."""

import dataclasses
import math

import numpy as np
import pytest

from densify.config.profiles import load_profile
from densify.engines import create_engine
from densify.engines.base import EngineBatch, ImageRef, PromptImage, Query
from densify.eval.metrics import delta1
from densify.io.cameras import prepare_image
from densify.queries.answers import collect_depth
from densify.queries.plan import grid_points, plan_queries
from densify.queries.prompts import depth_batch, image_ref, image_uid
from densify.sim.engine import SimulatedEngine
from densify.sim.errors import ErrorModel, correlated_field, depth_image_errors
from densify.sim.truth import Truth

# Only the named structured terms (everything else, rounding aside, exact).
QUIET = dict(depth_sigma=0.0, outlier_rate=0.0, unparseable_rate=0.0, corr_sigma=0.0, scale_sigma=0.0,
             object_sigma=0.0, field_sigma=0.0, field_long_sigma=0.0, bleed_prob=0.0, logprob_edge=0.0,
             corr_pair_sigma=0.0, corr_field_sigma=0.0, corr_field_long_sigma=0.0, occlusion_prob=0.0)


def only(**terms) -> ErrorModel:
    return ErrorModel.preset("structured", **{**QUIET, **terms})


# Where truth meets the engine (two helpers below and `_scene_batch`): the only code that changes when truth
# comes from a provider keyed by image instead of riding on the prompt image.
class _Truth(Truth):
    """Depth, object ids (original pixels) and pair match maps registered by image id."""

    def __init__(self):
        self.d, self.ids, self.m = {}, {}, {}

    def depth(self, ref):
        return self.d.get(ref.id)

    def object_ids(self, ref):
        return self.ids.get(ref.id)

    def matches(self, ref1, ref2):
        return self.m.get((ref1.id, ref2.id))


_TRUTH = _Truth()


def _engine(profile, **options) -> SimulatedEngine:
    return SimulatedEngine(profile, truth=_TRUTH, **options)


def _ref(uid, w, h):
    return ImageRef(uid, size=(w, h), scale=(1.0, 1.0))


def _point_batch(depth, xys, uid="a", object_ids=None):
    """Queries at exact preprocessed pixels (marked images: the pixel is in each image's provenance, no
    coordinates in the text) of one source image whose truth (depth, object ids) is given in its own frame."""
    h, w = depth.shape
    _TRUTH.d[uid], _TRUTH.ids[uid] = depth, object_ids
    pixels, ref = np.zeros((h, w, 3), np.uint8), _ref(uid, w, h)
    images, qs = {}, []
    for k, (x, y) in enumerate(xys):
        muid = f"{uid}:m{int(x)},{int(y)}"
        images[muid] = PromptImage(muid, pixels, dataclasses.replace(ref, marker=(int(x), int(y))))
        qs.append(Query(f"depth {k}", (muid,), "depth"))
    return EngineBatch(images, qs)


def _log_errors(engine, batch, depth, xys):
    vals = np.array([float(c.text.split("<answer>")[1].split("<")[0]) for c in engine.generate(batch)])
    gt = depth[np.asarray(xys)[:, 1].astype(int), np.asarray(xys)[:, 0].astype(int)]
    return np.log(vals / gt)


def _lag_corr(a: np.ndarray, lag: int, axis: int) -> float:
    a = a - a.mean()
    x = np.take(a, np.arange(a.shape[axis] - lag), axis=axis)
    y = np.take(a, np.arange(lag, a.shape[axis]), axis=axis)
    return float(np.sum(x * y) / np.sqrt(np.sum(x * x) * np.sum(y * y)))


def test_correlated_field_has_unit_std_and_the_asked_length():
    L = 32.0
    c1, c2, c4, s = [], [], [], []
    for k in range(4):
        f = correlated_field((512, 768), L, np.random.default_rng(k))
        s.append(f.std())
        c1.append(_lag_corr(f, int(L), 1))
        c2.append(_lag_corr(f, int(L) // 2, 0))
        c4.append(_lag_corr(f, 2 * int(L), 1))
    assert 0.85 < np.mean(s) < 1.15
    assert abs(np.mean(c1) - math.exp(-1)) < 0.08          # 1/e at the correlation length
    assert abs(np.mean(c2) - math.exp(-0.25)) < 0.08       # exp(-(r/L)^2) at L/2
    assert abs(np.mean(c4)) < 0.08                         # exp(-4) = 0.02


def test_answer_errors_are_correlated_over_the_token_footprint():
    depth = np.full((480, 640), 5.0, np.float32)
    step = 8
    xs, ys = np.meshgrid(np.arange(4, 640, step), np.arange(4, 480, step))
    xys = np.stack([xs.ravel(), ys.ravel()], 1)
    c32, c128, c8 = [], [], []
    for seed in range(3):
        eng = _engine("vlm3-depth", seed=seed, error=only(field_sigma=0.1))
        e = _log_errors(eng, _point_batch(depth, xys, uid=f"img{seed}"), depth, xys).reshape(xs.shape)
        assert 0.07 < e.std() < 0.13
        c8.append(_lag_corr(e, 1, 1))
        c32.append(_lag_corr(e, 32 // step, 1))
        c128.append(_lag_corr(e, 128 // step, 1))
    assert np.mean(c8) > 0.85                              # exp(-1/16) = 0.94
    assert abs(np.mean(c32) - math.exp(-1)) < 0.12
    assert abs(np.mean(c128)) < 0.12


def test_iid_errors_are_not_correlated():
    depth = np.full((240, 320), 5.0, np.float32)
    xs, ys = np.meshgrid(np.arange(2, 320, 4), np.arange(2, 240, 4))
    xys = np.stack([xs.ravel(), ys.ravel()], 1)
    eng = _engine("vlm3-depth", seed=0, error=ErrorModel.preset("iid", outlier_rate=0, unparseable_rate=0))
    e = _log_errors(eng, _point_batch(depth, xys), depth, xys).reshape(xs.shape)
    assert abs(_lag_corr(e, 1, 1)) < 0.08
    assert 0.11 < e.std() < 0.14


def test_per_image_scale_spread():
    depth = np.full((48, 64), 3.0, np.float32)
    xys = [(8, 8), (40, 20), (60, 40)]
    meds = []
    for k in range(300):
        eng = _engine("vlm3-depth", seed=7, error=only(scale_sigma=0.07))
        e = _log_errors(eng, _point_batch(depth, xys, uid=f"u{k}"), depth, xys)
        assert np.ptp(e) < 0.01                             # one factor for the whole image (two decimals)
        meds.append(np.median(e))
    assert 0.06 < np.std(meds) < 0.08
    assert abs(np.mean(meds)) < 0.015


def test_per_object_bias_is_shared_within_an_object():
    depth = np.full((96, 128), 4.0, np.float32)
    ids = np.zeros((96, 128), np.int32)
    ids[:, 64:] = 1
    xys = [(x, y) for x in (5, 30, 60, 70, 100, 120) for y in (10, 50, 90)]
    left = np.array([x < 64 for x, _ in xys])
    diffs = []
    for k in range(200):
        eng = _engine("vlm3-depth", seed=1, error=only(object_sigma=0.05))
        e = _log_errors(eng, _point_batch(depth, xys, uid=f"o{k}", object_ids=ids), depth, xys)
        assert np.ptp(e[left]) < 0.01 and np.ptp(e[~left]) < 0.01
        diffs.append(e[left][0] - e[~left][0])
    assert 0.05 * math.sqrt(2) * 0.85 < np.std(diffs) < 0.05 * math.sqrt(2) * 1.15


def test_without_object_ids_depth_segments_get_their_own_bias():
    depth = np.full((96, 128), 2.0, np.float32)
    depth[30:70, 40:90] = 1.0                              # a box in front of a wall
    xys = [(10, 10), (120, 90), (60, 50), (50, 40)]
    same_wall, box_vs_wall = [], []
    for k in range(100):
        eng = _engine("vlm3-depth", seed=2, error=only(object_sigma=0.05))
        e = _log_errors(eng, _point_batch(depth, xys, uid=f"s{k}"), depth, xys)
        same_wall.append(abs(e[0] - e[1]))
        box_vs_wall.append(abs(e[0] - e[2]))
        assert abs(e[2] - e[3]) < 0.01
    assert max(same_wall) < 0.01
    assert np.mean(box_vs_wall) > 0.03


def test_edge_bleeding_rate_falls_with_distance():
    h, w = 400, 200
    depth = np.full((h, w), 2.0, np.float32)
    depth[:, 100:] = 4.0                                   # discontinuity between x = 99 and 100
    eng = _engine("vlm3-depth", seed=5, error=only(bleed_prob=0.5, bleed_px=32.0))
    rates = {}
    for dist in (0, 8, 16, 24, 40):
        xys = [(99 - dist, y) for y in range(h)] + [(100 + dist, y) for y in range(h)]
        e = _log_errors(eng, _point_batch(depth, xys), depth, xys)
        bled = np.abs(np.abs(e) - math.log(2)) < 0.01
        assert np.all(bled | (np.abs(e) < 0.01))           # either exact or the other side's depth
        rates[dist] = bled.mean()
    for dist, r in rates.items():
        expected = 0.5 * max(0.0, 1 - dist / 32)
        assert abs(r - expected) < 0.06, (dist, r, expected)


def _scene_batch(prep, plan, profile, uid, depth, object_ids):
    """A depth batch for a rendered view: truth at the original resolution, brought to the prompt frame."""
    _TRUTH.d[uid], _TRUTH.ids[uid] = depth, object_ids
    return depth_batch(prep, plan, profile, uid=uid, ref=image_ref(uid, prep))


def test_structured_preset_point_delta1_near_090_on_synthetic_scenes():
    """The calibration the preset documents: point delta_1 about 0.90 (VLM3-depth's published average)."""
    from densify.synthetic.scenes import SceneSpec, make_scene

    p = load_profile("vlm3-depth")
    pre = p.preprocess
    pred, gt, d1_iid = [], [], []
    for seed in range(100, 112):
        v = make_scene(SceneSpec(seed=seed)).views[0]
        prep = prepare_image(v.rgb, v.camera, focal=pre.focal, max_side=pre.max_side,
                             square_pixels=pre.square_pixels, coord_range=p.coord_range, resample=pre.resample)
        plan = plan_queries(grid_points(640, 480, count=(32, 24)), prep.pixel_map)
        batch = _scene_batch(prep, plan, p, image_uid(prep, f"s{seed}"), v.depth, v.object_ids)
        g = v.depth[plan.pixels[:, 1], plan.pixels[:, 0]]
        ans = collect_depth(p, plan.pixels, plan.prompt_xy,
                            _engine(p, seed=seed, error="structured").generate(batch))
        pred.append(ans.values)
        gt.append(g)
        iid = collect_depth(p, plan.pixels, plan.prompt_xy, _engine(p, seed=seed).generate(batch))
        d1_iid.append(delta1(iid.values, g))
    d1 = delta1(np.concatenate(pred), np.concatenate(gt))
    assert 0.87 < d1 < 0.93
    assert 0.87 < np.mean(d1_iid) < 0.93
    # the errors are shared: per-image delta_1 spreads far more than under iid
    per_image = [delta1(a, b) for a, b in zip(pred, gt)]
    assert np.std(per_image) > 2 * np.std(d1_iid)


def test_structured_answers_do_not_depend_on_batching_or_cache():
    depth = np.full((120, 160), 3.0, np.float32)
    depth[40:80, 50:110] = 1.5
    xys = [(x, y) for x in range(0, 160, 9) for y in range(0, 120, 11)]
    batch = _point_batch(depth, xys)
    eng = _engine("vlm3-depth", seed=3, error="structured")
    full = [c.text for c in eng.generate(batch)]
    rev = EngineBatch(batch.images, batch.queries[::-1])
    assert [c.text for c in eng.generate(rev)][::-1] == full
    half = EngineBatch(batch.images, batch.queries[len(xys) // 2:])
    fresh = _engine("vlm3-depth", seed=3, error="structured")
    assert [c.text for c in fresh.generate(half)] == full[len(xys) // 2:]
    assert [c.text for c in _engine("vlm3-depth", seed=4, error="structured").generate(batch)] != full


def test_error_option_forms():
    assert SimulatedEngine("vlm3-depth").error == ErrorModel()
    assert SimulatedEngine("vlm3-depth", error="iid").error == ErrorModel()
    s = SimulatedEngine("vlm3-depth", error="structured").error
    assert s.name == "structured" and s.structured_depth and s.structured_corr
    d = SimulatedEngine("vlm3-depth", error={"preset": "structured", "scale_sigma": 0.0}).error
    assert d.scale_sigma == 0.0 and d.field_sigma == s.field_sigma
    assert SimulatedEngine("vlm3-depth", error={"depth_sigma": 0.2}).error.depth_sigma == 0.2  # iid base
    assert create_engine("simulated", profile="vlm3-depth", error="structured").error == s
    assert SimulatedEngine("vlm3-depth", error="structured", noise=False).error == ErrorModel.exact()
    with pytest.raises(ValueError):
        ErrorModel.preset("bogus")


def test_noise_false_is_exact_with_structured_option():
    depth = np.full((60, 80), 2.345, np.float32)
    xys = [(5, 5), (40, 30)]
    eng = _engine("vlm3-depth", error="structured", noise=False)
    assert [c.text for c in eng.generate(_point_batch(depth, xys))] == ["<think> </think><answer>2.35</answer>"] * 2


def test_depth_state_is_seeded_per_image():
    m = only(scale_sigma=0.1, field_sigma=0.1)
    a = depth_image_errors(m, 0, "x", (64, 64))
    b = depth_image_errors(m, 0, "x", (64, 64))
    c = depth_image_errors(m, 0, "y", (64, 64))
    assert np.array_equal(a.log_offset, b.log_offset)
    assert not np.allclose(a.log_offset, c.log_offset)


# ---------------------------------------------------------------------------------------------- correspondences

def _corr_batch(matches, xys, uid1="p", uid2="q"):
    """Correspondence queries on a pair whose match map (image 1's frame -> image 2's pixels) is given."""
    h, w = matches.shape[:2]
    _TRUTH.m[(uid1, uid2)] = matches
    imgs = {uid1: PromptImage(uid1, np.zeros((h, w, 3), np.uint8), _ref(uid1, w, h)),
            uid2: PromptImage(uid2, np.zeros((h, w, 3), np.uint8), _ref(uid2, w, h))}
    qs = [Query(f"Given these two images, what pixel in the second image corresponds to pixel "
                f"({int(round(x / w * 1000))}, {int(round(y / h * 1000))}) in the first image?", (uid1, uid2), "corr")
          for x, y in xys]
    return EngineBatch(imgs, qs)


def _corr_errors(eng, matches, xys, **kw):
    """End-point errors in normalised units, against the match of the pixel the engine actually reads."""
    h, w = matches.shape[:2]
    out = []
    for c, (x, y) in zip(eng.generate(_corr_batch(matches, xys, **kw)), xys):
        u, v = (int(s) for s in c.text.strip("()").split(", "))
        px, py = int(round(x / w * 1000)) / 1000 * w, int(round(y / h * 1000)) / 1000 * h
        t = matches[min(int(py), h - 1), min(int(px), w - 1)]
        out.append((u - t[0] / w * 1000, v - t[1] / h * 1000))
    return np.array(out)


def _shift_matches(h, w, dx=10.0):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([xx + dx, yy], -1)


def test_corr_pair_bias_and_smooth_field():
    h, w = 300, 400
    m = _shift_matches(h, w)
    xs, ys = np.meshgrid(np.arange(4, w - 20, 8), np.arange(4, h, 8))
    xys = list(zip(xs.ravel(), ys.ravel()))
    eng = _engine("vlm3-corr", seed=0, error=only(corr_field_sigma=10.0))
    e = _corr_errors(eng, m, xys)[:, 0].reshape(xs.shape)
    assert _lag_corr(e, 1, 1) > 0.75                      # 8 px apart, 32 px correlation length
    assert abs(_lag_corr(e, 12, 1)) < 0.25                 # 96 px apart
    biases = []
    for k in range(60):
        eng = _engine("vlm3-corr", seed=0, error=only(corr_pair_sigma=6.0))
        e = _corr_errors(eng, m, xys[:5], uid1=f"a{k}")
        assert np.ptp(e[:, 0]) <= 2 and np.ptp(e[:, 1]) <= 2  # one offset per pair (integer answers)
        biases.append(e[0])
    assert 4.5 < np.std(biases) < 7.5


def test_corr_errors_concentrate_at_occlusions():
    h, w = 200, 400
    m = _shift_matches(h, w, dx=0.0)
    m[:, 200:] = np.nan                                    # the right half is not visible in image 2
    eng = _engine("vlm3-corr", seed=1, error=only(occlusion_prob=0.5, occlusion_sigma=40.0))
    near = [(196, y) for y in range(0, h, 1)]
    far = [(100, y) for y in range(0, h, 1)]
    en = np.hypot(*_corr_errors(eng, m, near).T)
    ef = np.hypot(*_corr_errors(eng, m, far).T)
    assert np.all(ef <= 1.5)
    assert 0.25 < np.mean(en > 5) < 0.55                  # 0.5 * (1 - 3/32) = 0.45, minus small draws


def test_object_ids_reach_the_prompt_frame():
    from densify.synthetic.scenes import SceneSpec, make_scene

    scene = make_scene(SceneSpec(seed=3, width=160, height=120))
    v = scene.views[0]
    prep = prepare_image(v.rgb, v.camera, focal=1000, coord_range=2000)
    plan = plan_queries(grid_points(160, 120, count=(4, 3)), prep.pixel_map)
    batch = _scene_batch(prep, plan, load_profile("vlm3-depth"), "ids", v.depth, v.object_ids)
    t = _engine("vlm3-depth")._image_truth(batch.images["ids"])
    assert t.object_ids.shape == t.depth.shape
    assert set(np.unique(t.object_ids)) == set(np.unique(v.object_ids))
