"""benchmarks/marked_batch: a DepthLM batch painted on read holds and ships about one image; drawn out up
front it holds one per query (what the benchmark compares)."""

from benchmarks.marked_batch import measure


def test_painted_marks_hold_one_image_and_drawn_ones_one_per_query():
    r = measure(120, (320, 240))
    one_image = r["prepared"][0] * r["prepared"][1] * 3 / 1e6
    assert r["queries"] == 120
    lazy, eager = r["painted_on_read"], r["drawn_up_front"]
    assert lazy["pickled_mb"] < one_image + 0.1 and lazy["held_mb"] < one_image + 0.1
    assert eager["pickled_mb"] > 100 * one_image and eager["held_mb"] > 100 * one_image
