"""Profiles are byte-exact to the published formats (model-formats.md)."""

import numpy as np
import pytest
from conftest import MODEL_FORMATS

from densify.config.loading import ConfigError
from densify.config.profiles import available_profiles, load_profile
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


def test_depthlm_marks_each_query(textured_image):
    p = load_profile("depthlm")
    prep = prepare_image(textured_image, Camera(500, 500, 320, 240, 640, 480), focal=750)
    plan = plan_queries(np.array([[100, 100], [400, 300]]), prep.pixel_map)
    b = depth_batch(prep, plan, p, uid="img")
    assert len(b.images) == 2 and b.sampling.system_prompt.startswith("A conversation between User")
    img0 = b.images[b.queries[0].image_uids[0]].pixels
    x, y = (int(round(c)) for c in b.queries[0].hint["pre_xy"])
    # the arrow's tip is red and sits at the queried pixel
    tip = img0[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3)
    assert any(px[0] > 200 and px[1] < 80 and px[2] < 80 for px in tip)
    assert not np.array_equal(img0, prep.pixels)


def test_pair_batches(textured_image):
    corr, pose = load_profile("vlm3-corr"), load_profile("vlm3-pose")
    cam = Camera(500, 500, 320, 240, 640, 480)
    prep = prepare_image(textured_image, cam, max_side=1024, coord_range=1000)
    plan = plan_queries(np.array([[264, 24]]), prep.pixel_map)
    b = corr_batch(prep, prep, plan, corr, uid1="a", uid2="b")
    assert b.queries[0].image_uids == ("a", "b")
    pb = pose_batch(prep, prep, pose, uid1="a", uid2="b")
    assert [q.question for q in pb.queries] == list(pose.questions)
