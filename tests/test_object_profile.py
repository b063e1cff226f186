"""vlm3-object: the release's sample prompt byte for byte, the rounding rule, the templates and the parsers."""

import json

import numpy as np
import pytest
from conftest import MODEL_FORMATS

from densify.config.profiles import Profile, load_profile
from densify.objects.questions import (CATEGORIES, RegionError, choice_index, make_regions, normalize_box,
                                       object_prompt, parse_regions, rewrite_answer)
from densify.queries.answers import parse_text
from pipelines.cli import main

# facebookresearch/VLM3 sample_data/spatialrgpt_labels.json
SAMPLE_PROMPT = ("Can you confirm if bounding box region (0, 39, 652, 999) is smaller than bounding box region "
                 "(6, 380, 228, 562)?")
SAMPLE_ANSWER = ("Incorrect, bounding box region (0, 39, 652, 999) is not smaller in size than bounding box region "
                 "(6, 380, 228, 562).")
SAMPLE_RAW_Q = "<image>\n Can you confirm if <mask> is smaller than <mask>?"
SAMPLE_RAW_A = "Incorrect, Region [0] is not smaller in size than Region [1]."
SAMPLE_INTRINSICS = [902.4662475585938, 901.3929443359375, 511.38848876953125, 383.7367858886719]
# Original 1024x768 boxes consistent with both published forms: round(v * 1000 / 1134.67...) gives the
# resized pixels [0, 33, 740, 850], [7, 324, 258, 479]; round(v / W * 1000) the normalised boxes.
SAMPLE_BOXES = [(0, 30.0, 667.5, 767.2), (6.2, 292.1, 233.1, 431.9)]


@pytest.fixture(scope="module")
def profile():
    return load_profile("vlm3-object")


def test_sample_prompt_byte_for_byte(profile):
    regs = make_regions(SAMPLE_BOXES, 1024, 768)
    for raw in (None, SAMPLE_RAW_Q):  # the profile's template and the benchmark's own text
        p = object_prompt(profile, "small_predicate", regs, (1024, 768), (1134, 851), (1.108, 1.108), raw_text=raw)
        assert p.text == SAMPLE_PROMPT
        assert p.regions_normalized == [(0, 39, 652, 999), (6, 380, 228, 562)]
    assert rewrite_answer(profile, SAMPLE_RAW_A, p.regions_normalized) == SAMPLE_ANSWER


def test_sample_resized_pixels_are_consistent_with_the_boxes():
    s = 1000 / SAMPLE_INTRINSICS[0]
    resized = [[int(round(v * s)) for v in b] for b in SAMPLE_BOXES]
    assert resized == [[0, 33, 740, 850], [7, 324, 258, 479]]


def test_rounding_is_to_nearest_not_truncation():
    # 667.5 / 1024 * 1000 = 651.86 -> 652 (truncation would give 651); 0.6 away from .5 both ways
    assert normalize_box((667.5, 0, 1024, 768), 1024, 768)[0] == 652
    assert normalize_box((668.2, 0, 1024, 768), 1024, 768)[0] == 653
    assert normalize_box((0, 0, 1024, 768), 1024, 768) == (0, 0, 1000, 1000)


def test_prompts_command_prints_the_sample(tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "spatialrgpt.png"
    Image.fromarray(np.zeros((768, 1024, 3), np.uint8)).save(img)
    fx, fy, cx, cy = SAMPLE_INTRINSICS
    (tmp_path / "spatialrgpt.json").write_text(json.dumps({"fx": fx, "fy": fy, "cx": cx, "cy": cy}))
    regions = ";".join(",".join(str(v) for v in b) for b in SAMPLE_BOXES)
    assert main(["prompts", "--profile", "vlm3-object", "--image", str(img), "--regions", regions,
                 "--question", "small_predicate", "--question", "height_data"]) == 2  # height: one region
    assert "height_data" in capsys.readouterr().err
    assert main(["prompts", "--profile", "vlm3-object", "--image", str(img), "--regions", regions,
                 "--question", "small_predicate", "--question", "direction"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert recs[0]["text"] == SAMPLE_PROMPT
    assert recs[0]["regions_normalized"] == [[0, 39, 652, 999], [6, 380, 228, 562]]
    assert recs[0]["image_size"][1] == 851  # uniform scale 1000 / fx, no row resampling (fy -> 998.81)
    assert recs[1]["text"] == ("If you are at bounding box region (0, 39, 652, 999), where will you find "
                               "bounding box region (6, 380, 228, 562)?")


def test_every_category_has_a_question(profile):
    assert set(CATEGORIES) == set(profile.questions)
    for name, q in profile.questions.items():
        assert q.template.count("<mask>") == CATEGORIES[name].regions == q.regions
        assert "bounding box" not in q.template


@pytest.mark.skipif(not MODEL_FORMATS.is_file(), reason="shared/reference not beside the checkout")
def test_region_format_and_sample_question_in_model_formats(profile):
    md = MODEL_FORMATS.read_text()
    assert f"`{profile.regions.format.format(x1='x1', y1='y1', x2='x2', y2='y2')}`" in md
    assert "<mask> is smaller than <mask>?`" in md and profile.questions["small_predicate"].template in md


def test_profile_validation_catches_token_mismatch(profile):
    data = profile.model_dump()
    data["questions"]["width_data"]["regions"] = 2
    with pytest.raises(ValueError, match="questions.width_data"):
        Profile.model_validate(data)
    data = profile.model_dump()
    data["regions"] = None
    with pytest.raises(ValueError, match="needs 'regions'"):
        Profile.model_validate(data)


@pytest.mark.parametrize("text,value", [
    ("Yes, Region [0] is to the left of Region [1].", True),
    ("Indeed, Region [0] is positioned on the left side of Region [1].", True),
    ("Correct, you'll find Region [0] to the left of Region [1].", True),
    ("No, Region [0] is not to the left of Region [1].", False),
    ("In fact, Region [0] is to the right of Region [1].", False),
    ("Incorrect, Region [0] is not on the left side of Region [1].", False),
    ("Correct, Region [0] is not as tall as Region [1].", True),  # short_true: 'not' does not negate
    ("Actually, Region [0] might be larger than Region [1].", False),
    ("That is True.", True), ("That is False.", False), (SAMPLE_ANSWER, False),
])
def test_predicate_answers(profile, text, value):
    assert parse_text(profile.questions["left_predicate"], text).value is value


def test_predicate_without_polarity_fails(profile):
    for text in ("I cannot determine that from the image.", "<think> The point is on the wall"):
        assert parse_text(profile.questions["left_predicate"], text).failure == "no_match"


def test_choice_answers(profile):
    norms = [(0, 39, 652, 999), (6, 380, 228, 562)]
    q = profile.questions["left_choice"]
    v = parse_text(q, "From the viewer's perspective, bounding box region (6, 380, 228, 562) appears more on the "
                      "left side.").value
    assert choice_index(v, norms) == 1
    assert choice_index(parse_text(q, "Region [0] is more to the left.").value, norms) == 0
    assert choice_index(parse_text(q, "bounding box region (500, 500, 600, 600) is.").value, norms) is None
    assert parse_text(q, "The left one.").failure == "no_match"


@pytest.mark.parametrize("text,metres", [
    ("The width of Region [0] is 1.02 meters.", 1.02), ("It is 48.47 centimeters.", 0.4847),
    ("Region [0] is 35.9 inches wide.", 35.9 * 0.0254), ("22.32 feet.", 22.32 * 0.3048),
    ("about 1.5m", 1.5), ("It is 120 mm.", 0.12), ("3 ft", 3 * 0.3048),
    ("bounding box region (0, 39, 652, 999) and bounding box region (6, 380, 228, 562) are 2.5 metres apart.", 2.5),
])
def test_metric_answers_in_metres(profile, text, metres):
    assert parse_text(profile.questions["distance_data"], text).value == pytest.approx(metres)


def test_metric_needs_a_unit_and_ignores_box_numbers(profile):
    q = profile.questions["width_data"]
    assert parse_text(q, "bounding box region (0, 39, 652, 999) is wide.").failure == "no_match"
    assert parse_text(q, "It is 12.").failure == "no_match"


def test_clock_answers(profile):
    q = profile.questions["direction"]
    assert parse_text(q, "Region [0] will find Region [1] around the 11 o'clock direction.").value == 11
    assert parse_text(q, "Region [1] is roughly at 3 o'clock from Region [0].").value == 3
    assert parse_text(q, "at 13 o'clock").failure == "no_match"


def test_bad_regions_name_the_region_and_the_fix():
    with pytest.raises(RegionError, match="region 2: .*outside the 640x480 image"):
        make_regions([(0, 0, 10, 10), (600, 400, 700, 470)], 640, 480)
    with pytest.raises(RegionError, match="region 1: .*inverted.*x1 <= x2"):
        make_regions([(50, 0, 10, 10)], 640, 480)
    with pytest.raises(RegionError, match="region 1: .*empty"):
        make_regions([(10, 10, 10.5, 40)], 640, 480)
    with pytest.raises(RegionError, match="region 1: mask is 10x5 but the image is 640x480"):
        make_regions([(0, 0, 10, 10)], 640, 480, [np.ones((5, 10), bool)])
    with pytest.raises(RegionError, match="region 2 is '1,2,3'"):
        parse_regions("0,0,5,5;1,2,3")


def test_unknown_question_names_the_choices(profile):
    regs = make_regions(SAMPLE_BOXES, 1024, 768)
    with pytest.raises(KeyError, match="unknown question 'smaller'.*small_predicate"):
        object_prompt(profile, "smaller", regs, (1024, 768), (1134, 851), (1.1, 1.1))
    with pytest.raises(RegionError, match="about 1 region"):
        object_prompt(profile, "width_data", regs, (1024, 768), (1134, 851), (1.1, 1.1))


def test_point_profiles_still_need_points(tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(img)
    assert main(["prompts", "--profile", "vlm3-depth", "--image", str(img)]) == 2
    assert "--points" in capsys.readouterr().err
    assert main(["prompts", "--profile", "vlm3-object", "--image", str(img)]) == 2
    assert "--regions" in capsys.readouterr().err
