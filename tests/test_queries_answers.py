import numpy as np
import pytest

from densify.config.profiles import load_profile
from densify.engines.base import Completion
from densify.io.cameras import PixelMap
from densify.queries.answers import collect_depth, parse_text
from densify.queries.plan import PlanError, check_points, grid_points, plan_queries


def test_grid_by_count_and_stride():
    g = grid_points(640, 480, count=(64, 48))
    assert g.shape == (3072, 2) and g[:, 0].min() == 5 and g[:, 0].max() == 635
    assert len(grid_points(640, 480, count=3072)) == 3072
    s = grid_points(640, 480, stride=10)
    assert s.shape == (64 * 48, 2)
    with pytest.raises(PlanError):
        grid_points(640, 480)


def test_duplicate_prompt_coordinates_asked_once():
    # a tiny prompt range makes neighbouring pixels share prompt coordinates
    pm = PixelMap((640, 480), (640, 480), 100)
    plan = plan_queries(grid_points(640, 480, stride=2), pm)
    assert len(plan) == 101 * 101  # round() reaches the range at the far edge, as in the release
    assert len(np.unique(plan.prompt_xy, axis=0)) == len(plan)


def test_points_outside_image_named():
    with pytest.raises(PlanError, match=r"outside the 640x480 image, first \(640, 3\)"):
        check_points([[1, 1], [640, 3]], 640, 480, "--points")


DEPTH = load_profile("vlm3-depth").question


@pytest.mark.parametrize("text,value,failure", [
    ("<think> wall </think><answer>3.42</answer>", 3.42, None),
    ("<answer> 1e1 </answer>", 10.0, None),
    ("<answer>.5</answer>", 0.5, None),
    ("<answer>2.0</answer> <answer>9</answer>", 2.0, None),
    ("<answer>far</answer>", None, "not_a_number"),
    ("It is 3 meters away", None, "missing_tag"),
    ("<answer>0</answer>", None, "non_positive"),
    ("<answer>-2.5</answer>", None, "non_positive"),
    ("<answer>3.4 m</answer>", None, "not_a_number"),
    ("", None, "missing_tag"),
])
def test_depth_parser(text, value, failure):
    p = parse_text(DEPTH, text)
    assert p.failure == failure
    if value is not None:
        assert p.value == pytest.approx(value)


def test_corr_and_pose_parsers():
    corr = load_profile("vlm3-corr").question
    assert parse_text(corr, "<think>(1, 2) no</think>\n\n(440, 60)").value == (440.0, 60.0)
    assert parse_text(corr, "no idea").failure == "no_match"
    pose = load_profile("vlm3-pose").questions
    assert parse_text(pose["rotation_angle"], "Rotation angle: 89.7 degrees").value == 89.7
    assert parse_text(pose["euler_natural"], "Yaw=+89.6°, Pitch=+2.6°, Roll=+6.1°").value == (89.6, 2.6, 6.1)
    assert parse_text(pose["euler_natural"], "yaw 10, PITCH = -3").failure == "no_match"
    v = parse_text(pose["translation_direction"], "The camera moves left, forward, unit vector (-0.69, +0.02, +0.72).")
    assert v.value == (-0.69, 0.02, 0.72)
    assert parse_text(pose["translation_distance"], "Translation distance: 1.98 meters").value == 1.98


def test_collect_keeps_failures_and_engine_errors():
    p = load_profile("vlm3-depth")
    comps = [Completion("<answer>2</answer>"), Completion("", error="timeout"), Completion("nope")]
    a = collect_depth(p, np.array([[1, 1], [2, 2], [3, 3]]), np.array([[1, 1], [2, 2], [3, 3]]), comps)
    assert a.failures == [None, "engine_error", "missing_tag"]
    assert a.failure_counts() == {"engine_error": 1, "missing_tag": 1}
    recs = list(a.records())
    assert recs[0]["value"] == 2.0 and recs[1]["value"] is None and recs[2]["failure"] == "missing_tag"
