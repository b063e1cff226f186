"""Profiles are byte-exact to the published formats (model-formats.md)."""

import numpy as np
import pytest
from conftest import MODEL_FORMATS

from densify.config.loading import ConfigError
from densify.config.profiles import available_profiles, load_profile
from densify.engines.base import PromptImage, content_ids
from densify.io.cameras import Camera, prepare_image
from densify.queries.plan import plan_queries
from densify.queries.prompts import corr_batch, depth_batch, pose_batch, render_text

VLM3_DEPTH = ("Given this image, how far is the point at coordinates (12, 34) from the camera? The coordinates are in "
              "normalised [0, 2000] format relative to image width and height. Output the thinking process in "
              "<think> </think> and final answer (the meter number only, without the unit) in <answer> </answer> tags.")
CORR = ("Given these two images, what pixel in the second image corresponds to pixel (440, 60) in the first image? "
        "Report the answer as (x, y).")
THINK = ' Please think step by step and follow the format: "<think> [think process] </think>\n\n[answer]".'


def test_all_profiles_load():
    names = available_profiles()
    assert {"vlm3-depth", "depthlm", "vlm3-corr", "vlm3-pose"} <= set(names)
    for n in names:
        assert load_profile(n).name == n


def test_vlm3_depth_exact():
    assert render_text(load_profile("vlm3-depth"), x=12, y=34) == VLM3_DEPTH


def test_corr_exact_and_thinking_suffix():
    assert render_text(load_profile("vlm3-corr"), x1=440, y1=60) == CORR
    assert render_text(load_profile("vlm3-corr-think"), x1=440, y1=60) == CORR + THINK


def test_pose_questions_keep_double_spaces():
    p = load_profile("vlm3-pose")
    assert "yaw -> pitch -> roll.  Conventions" in p.questions["euler_natural"].template
    assert "(X right, Y down, Z forward)?  Give" in p.questions["translation_direction"].template


@pytest.mark.skipif(not MODEL_FORMATS.is_file(), reason="shared/reference not beside the checkout")
def test_every_template_appears_verbatim_in_model_formats():
    md = MODEL_FORMATS.read_text()
    for name in available_profiles():
        p = load_profile(name)
        if p.task == "object":
            continue  # SpatialRGPT's question templates, not in model-formats.md: tests/test_object_profile.py
        for q in p.questions.values():
            assert f"`{q.template}`" in md, (name, q.template[:40])
            assert q.regex.replace("{axis}", "yaw") in md or q.parser == "euler"
        if p.system_prompt:
            assert f"`{p.system_prompt}`" in md
        if p.suffix:
            assert f"`{p.suffix}`".replace("\n", "\\n") in md


def test_profile_validation_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: m\ntask: depth\npreprocess: {focal: 1000, max_side: 3}\n"
                   "coord_range: 2000\nquestions: {}\ndefault_question: depth\nbogus: 1\n")
    with pytest.raises(ConfigError) as e:
        load_profile(bad)
    msg = str(e.value)
    assert "bogus" in msg and "preprocess" in msg and str(bad) in msg


def test_depth_batch_shares_one_image(textured_image):
    p = load_profile("vlm3-depth")
    prep = prepare_image(textured_image, Camera(500, 500, 320, 240, 640, 480), focal=1000, coord_range=2000)
    plan = plan_queries(np.array([[10, 20], [300, 200]]), prep.pixel_map)
    b = depth_batch(prep, plan, p, uid="img")
    assert list(b.images) == ["img"] and len(b.queries) == 2
    u, v = plan.prompt_xy[1]
    assert b.queries[1].text == render_text(p, x=int(u), y=int(v))
    assert b.sampling.max_tokens == 256 and b.sampling.prefill is None


RED = (255, 0, 0)


def release_prepare(rgb, fx, fy, cx, cy, focal=750.0):
    """DepthLM's published preprocessing, restated from model-formats.md (not densify's code): undistort
    when |fx - fy| > 1e-3 (OpenCV alpha=1), scale f / fx on both axes, size by truncation, PIL's default
    filter. -> (image, (fx', fy', cx', cy'))."""
    import cv2
    from PIL import Image

    if abs(fx - fy) > 1e-3:
        K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], float)
        size = (rgb.shape[1], rgb.shape[0])
        nk, _ = cv2.getOptimalNewCameraMatrix(K, np.zeros((4, 1)), size, 1, size)
        rgb = cv2.undistort(rgb, K, np.zeros((4, 1)), None, nk)
        fx2, fy2, cx2, cy2 = nk[0, 0], nk[1, 1], nk[0, 2], nk[1, 2]
    else:
        fx2, fy2, cx2, cy2 = fx, fy, cx, cy
    s = focal / fx2
    img = Image.fromarray(rgb)
    img = img.resize((int(img.width * s), int(img.height * s)))
    return np.asarray(img), (fx2 * s, fy2 * s, cx2 * s, cy2 * s)


def release_mark(img, x, y):
    """The published marker: 5 px left of (x, y) on its row, then (x - d - 1, y +- d) for d = 1, 2; None
    when 5 <= x < W - 5 and 5 <= y < H - 5 does not hold."""
    h, w = img.shape[:2]
    if not (5 <= x < w - 5 and 5 <= y < h - 5):
        return None
    out = img.copy()
    for dx in range(1, 6):
        out[y, x - dx] = RED
    for d in (1, 2):
        out[y + d, x - d - 1] = RED
        out[y - d, x - d - 1] = RED
    return out


def _depthlm_batch(rgb, cam, points, dedupe=True):
    p = load_profile("depthlm")
    prep = prepare_image(rgb, cam, coord_range=p.coord_range, **p.preprocess.image_options())
    plan = plan_queries(np.asarray(points, float), prep.pixel_map, marker=p.marker, dedupe=dedupe)
    return p, prep, plan, depth_batch(prep, plan, p, uid="img")


@pytest.mark.parametrize("size,K", [
    ((640, 480), (1000.0, 1000.0, 320.0, 240.0)),
    ((641, 479), (559.6, 558.1, 361.9, 242.0)),     # odd size, fx != fy (the README's iBims-like camera)
    ((333, 250), (300.0, 310.0, 160.3, 130.7)),     # upscaled (focal 750 > fx), fx != fy
    ((1001, 751), (1187.5, 1187.5, 500.0, 375.0)),  # 1001 * 750 / 1187.5 = 632.2 -> 632 (truncated)
])
def test_depthlm_marks_pixels_exactly_as_released(size, K):
    w, h = size
    rng = np.random.default_rng(w)
    rgb = rng.integers(0, 200, (h, w, 3), dtype=np.uint8)  # no pure red anywhere before marking
    fx, fy, cx, cy = K
    pts = [(x, y) for x in (0, 3, 6, 7, 9, 11, w // 2, w - 12, w - 9, w - 7, w - 1)
           for y in (0, 4, 7, 8, 10, h // 3, h - 11, h - 8, h - 6, h - 1)]
    p, prep, plan, b = _depthlm_batch(rgb, Camera(fx, fy, cx, cy, w, h), pts, dedupe=False)
    want_img, (fx2, fy2, cx2, cy2) = release_prepare(rgb, fx, fy, cx, cy)
    assert prep.pixels.shape == want_img.shape and np.array_equal(prep.pixels, want_img)
    assert (prep.camera.fx, prep.camera.fy, prep.camera.cx, prep.camera.cy) == (fx2, fy2, cx2, cy2)
    asked, skipped = [], []
    for x, y in pts:
        xm = int((x - cx) * (fx2 / fx) + cx2)  # the release's pixel mapping, truncated
        ym = int((y - cy) * (fy2 / fy) + cy2)
        want = release_mark(want_img, xm, ym)
        (skipped if want is None else asked).append(((x, y), (xm, ym), want))
    assert asked and skipped  # the points cover both sides of every border
    assert [tuple(map(float, q)) for q, _, _ in skipped] == [tuple(r) for r in plan.unmarkable.tolist()]
    assert len(b.queries) == len(asked) == len(plan)
    for q, ((x, y), (xm, ym), want) in zip(b.queries, asked):
        got = b.images[q.image_uids[0]]
        assert q.image_uids[0] == f"img:m{xm},{ym}"
        assert got.pixels.shape == want.shape and np.array_equal(got.pixels, want), ((x, y), (xm, ym))
        changed = np.argwhere(np.any(got.pixels != prep.pixels, axis=2))
        assert len(changed) == 9 and [ym, xm] not in changed.tolist()  # the queried pixel is left as it is
        assert b.queries[0].text == render_text(p)


def test_depthlm_border_rule_and_mapping_by_hand():
    """640x480, fx = fy = 1000 -> scale 0.75 -> 480x360; x' = int((x - 320) * 0.75 + 240) = int(0.75 x)."""
    rgb = np.full((480, 640, 3), 40, np.uint8)
    cam = Camera(1000.0, 1000.0, 320.0, 240.0, 640, 480)
    pts = [(100, 100), (7, 7), (6, 100), (100, 6), (633, 100), (634, 100), (100, 473), (100, 474), (101, 101)]
    p, prep, plan, b = _depthlm_batch(rgb, cam, pts)
    assert prep.pixels.shape == (360, 480, 3)
    # (7, 7) -> (5, 5) and (633, ..) -> 474 = W' - 6: markable; 6 -> 4 and 634 -> 475 = W' - 5: not
    assert plan.marked.tolist() == [[75, 75], [5, 5], [474, 75], [75, 354]]
    assert plan.unmarkable.tolist() == [[6, 100], [100, 6], [634, 100], [100, 474]]
    # (101, 101) -> int(75.75) = 75: the same marked pixel as (100, 100), asked once
    img = b.images["img:m75,75"].pixels
    red = sorted(map(tuple, np.argwhere(np.all(img == RED, axis=2))[:, ::-1].tolist()))
    assert red == sorted([(70, 75), (71, 75), (72, 75), (73, 75), (74, 75), (73, 76), (73, 74), (72, 77), (72, 73)])
    assert tuple(img[75, 75]) == (40, 40, 40)


def test_a_dense_depthlm_batch_holds_and_ships_one_image():
    """1,000 marked queries share the prepared pixels: each image is painted when read, the batch pickles
    (as the Ray pool ships it) to about one image, and the content ids differ exactly where pixels do."""
    import pickle


    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 200, (480, 640, 3), dtype=np.uint8)
    pts = np.stack([rng.uniform(10, 630, 1000), rng.uniform(10, 470, 1000)], 1)
    p, prep, plan, b = _depthlm_batch(rgb, Camera(1000.0, 1000.0, 320.0, 240.0, 640, 480), pts)
    assert len(b.images) == len(plan) > 900
    assert all(im.base is prep.pixels for im in b.images.values())
    assert len(pickle.dumps(b, protocol=5)) < prep.pixels.nbytes + 500 * len(b.images)  # not 1,000 images
    ids = content_ids(b.images)
    assert len(set(ids.values())) == len(b.images)
    for uid, im in list(b.images.items())[:20]:
        x, y = map(int, uid.split(":m")[1].split(","))
        assert np.array_equal(im.pixels, release_mark(prep.pixels, x, y))
    assert not np.any(np.all(prep.pixels == RED, axis=2))  # reading never paints the shared base
    again = depth_batch(prep, plan, p, uid="img")
    assert content_ids(again.images) == ids  # the next round's same pixels: the same ids (vLLM's cache)
    assert content_ids({"u": PromptImage("u", prep.pixels)})["u"] not in set(ids.values())


def test_depthlm_size_truncates_and_fy_scales_with_fx():
    p = load_profile("depthlm")
    cam = Camera(1000.0, 900.0, 320.0, 240.0, 641, 479)
    prep = prepare_image(np.zeros((479, 641, 3), np.uint8), cam, **p.preprocess.image_options())
    assert prep.pixels.shape[:2] == (359, 480)  # int(479 * 0.75), int(641 * 0.75): truncated, one scale
    assert prep.camera.fx == 750.0 and prep.camera.fy == pytest.approx(675.0)  # fy is not squared up


def test_draw_marker_refuses_to_clip():
    from densify.queries.prompts import draw_marker

    m = load_profile("depthlm").marker
    img = np.zeros((20, 30, 3), np.uint8)
    draw_marker(img, 5, 5, m)
    for x, y in ((4, 10), (25, 10), (10, 4), (10, 15)):
        with pytest.raises(ValueError, match="cannot be marked"):
            draw_marker(img, x, y, m)


def test_qwen_variant_keeps_the_marker_and_renders_the_release_system_prompt():
    dlm, qwen = load_profile("depthlm"), load_profile("depthlm-qwen")
    assert qwen.marker == dlm.marker and qwen.question.template == dlm.question.template
    assert dlm.system_prompt is None and qwen.system_prompt == "You are a helpful assistant."
    assert dlm.preprocess.focal == 750 and dlm.model == "facebook/DepthLM"


@pytest.mark.parametrize("name", ["depthlm", "depthlm-qwen"])
@pytest.mark.parametrize("text,value,failure", [
    # the training answer (the number twice, once inside <think>)
    ("<think> The point is around 3.42 meters away from the camera. </think>\n\n<answer> 3.42 </answer>", 3.42, None),
    ("<answer>12</answer>", 12.0, None),
    ("<answer> 1.5e1 </answer>", 15.0, None),
    ("<think> The point is around 3.42 meters away from the camera. </think>", None, "missing_tag"),
    ("<answer> far </answer>", None, "not_a_number"),
    ("<answer> -2.0 </answer>", None, "non_positive"),
    ("<answer> 0 </answer>", None, "non_positive"),
])
def test_depthlm_answer_parser(name, text, value, failure):
    from densify.queries.answers import parse_text

    got = parse_text(load_profile(name).question, text)
    assert got.failure == failure and (got.value == pytest.approx(value) if value is not None else got.value is None)


def test_pair_batches(textured_image):
    corr, pose = load_profile("vlm3-corr"), load_profile("vlm3-pose")
    cam = Camera(500, 500, 320, 240, 640, 480)
    prep = prepare_image(textured_image, cam, max_side=1024, coord_range=1000)
    plan = plan_queries(np.array([[264, 24]]), prep.pixel_map)
    b = corr_batch(prep, prep, plan, corr, uid1="a", uid2="b")
    assert b.queries[0].image_uids == ("a", "b")
    pb = pose_batch(prep, prep, pose, uid1="a", uid2="b")
    assert [q.question for q in pb.queries] == list(pose.questions)


def test_store_keys_of_marked_queries_name_their_pixel():
    """Marked images are named by their pixel: the answer-store key of a DepthLM query needs no hint, two
    pixels never share a key, and the same pixel asked again (another round) keys the same."""
    from densify.engines.store import AnswerStore

    rgb = np.random.default_rng(1).integers(0, 200, (480, 640, 3), dtype=np.uint8)
    cam = Camera(1000.0, 1000.0, 320.0, 240.0, 640, 480)
    _, _, plan, b = _depthlm_batch(rgb, cam, [(100, 100), (200, 100), (100, 200)])
    _, _, _, again = _depthlm_batch(rgb, cam, [(101, 101)])  # the same marked pixel as (100, 100)
    keys = [AnswerStore.query_part(q) for q in b.queries]
    assert len(set(keys)) == 3 and AnswerStore.query_part(again.queries[0]) == keys[0]
    parts = {AnswerStore.image_part("m", "depthlm", b.sampling, q.image_uids[0]) for q in b.queries}
    assert len(parts) == 1  # one image part: all of them are drawn from the same source image
