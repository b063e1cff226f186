"""Object questions: image regions, their normalised form, the exact question text, choices and clock errors.

An object profile (vlm3-object) asks SpatialRGPT-Bench-style questions about regions of one image. Each
region is a box [x1, y1, x2, y2] in original-image pixels (optionally with a mask of the image's size);
the prompt writes it with the profile's region format, its corners normalised to [0, coord_range] relative
to the image's width and height and rounded to the nearest integer (Python's round, as the releases do).

Categories are SpatialRGPT-Bench's (`qa_info.category`); `CATEGORIES` says what each one asks, for the
geometry answers, the scorer and the synthetic question set; their answers are parsed with every other
answer (densify.queries.answers). Nothing here knows the truth.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from densify.config.profiles import Profile, Question


class RegionError(ValueError):
    """A region (box or mask) cannot be used; the message names the region and the fix."""


@dataclass(frozen=True)
class Category:
    """What a SpatialRGPT-Bench category asks."""

    name: str
    kind: str
    """predicate | choice | metric | clock"""
    quantity: str
    """x (left-right), up (height above the floor), near (distance from the viewer), volume, height, width,
    distance, horizontal_distance, vertical_distance, direction"""
    sign: int = 1
    """+1: the predicate/choice holds for the larger quantity (right, above, behind, big, tall, wide);
    -1: for the smaller (left, below, front, small, short, thin)."""
    regions: int = 2
    group: str = ""
    """The row it is reported under (SpatialRGPT's table)."""


def _cats() -> dict[str, Category]:
    out = {}
    pairs = [("left", "right", "x", "left/right"), ("below", "above", "up", "below/above"),
             ("front", "behind", "near", "behind/front"), ("small", "big", "volume", "big/small"),
             ("short", "tall", "height", "tall/short"), ("thin", "wide", "width", "wide/thin")]
    for neg, pos, qty, group in pairs:
        for word, sign in ((neg, -1), (pos, 1)):
            out[f"{word}_predicate"] = Category(f"{word}_predicate", "predicate", qty, sign, 2, group)
            if qty not in ("volume", "width"):  # SpatialRGPT has no big/small or wide/thin choice questions
                out[f"{word}_choice"] = Category(f"{word}_choice", "choice", qty, sign, 2, group)
    for name, qty, n, group in [("distance_data", "distance", 2, "direct_distance"),
                                ("horizontal_distance_data", "horizontal_distance", 2, "horizontal_distance"),
                                ("vertical_distance_data", "vertical_distance", 2, "vertical_distance"),
                                ("width_data", "width", 1, "width"), ("height_data", "height", 1, "height")]:
        out[name] = Category(name, "metric", qty, 1, n, group)
    out["direction"] = Category("direction", "clock", "direction", 1, 2, "direction")
    return out


CATEGORIES: dict[str, Category] = _cats()
QUALITATIVE_GROUPS = ["left/right", "below/above", "behind/front", "big/small", "tall/short", "wide/thin"]
QUANTITATIVE_GROUPS = ["direct_distance", "horizontal_distance", "vertical_distance", "width", "height",
                       "direction"]



def category_of(profile: Profile, question: str) -> Category:
    q = question_of(profile, question)
    name = q.category or question
    if name not in CATEGORIES:
        raise KeyError(f"question {question!r}: category {name!r} is not a SpatialRGPT-Bench category "
                       f"({', '.join(CATEGORIES)})")
    return CATEGORIES[name]


def question_of(profile: Profile, name: str) -> Question:
    if profile.task != "object":
        raise ValueError(f"profile {profile.name!r} is a {profile.task} profile; object questions need an "
                         f"object profile (vlm3-object)")
    if name not in profile.questions:
        raise KeyError(f"unknown question {name!r} for profile {profile.name}; choose one of: "
                       f"{', '.join(profile.questions)}")
    return profile.questions[name]


# ----------------------------------------------------------------------------------------------
# Regions


@dataclass
class Region:
    """One region of an image: a box in original pixels, and optionally a boolean mask (HxW)."""

    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None
    name: str = "region 1"


def parse_regions(text: str, option: str = "--regions") -> list[tuple[float, float, float, float]]:
    """'x1,y1,x2,y2;x1,y1,x2,y2' -> boxes."""
    boxes = []
    for k, item in enumerate(t for t in text.split(";") if t.strip()):
        try:
            vals = [float(v) for v in item.split(",")]
        except ValueError:
            vals = []
        if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
            raise RegionError(f"{option}: region {k + 1} is {item.strip()!r}; write each box as four numbers "
                              f"'x1,y1,x2,y2' in original-image pixels, boxes separated by ';'")
        boxes.append(tuple(vals))
    if not boxes:
        raise RegionError(f"{option} is empty; give at least one box 'x1,y1,x2,y2'")
    return boxes


def check_region(region: Region, width: int, height: int) -> Region:
    """A clear error for boxes outside the image, empty or inverted boxes, and masks of the wrong size."""
    x1, y1, x2, y2 = region.box
    if x2 < x1 or y2 < y1:
        raise RegionError(f"{region.name}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is inverted; write it as "
                          f"x1,y1,x2,y2 with x1 <= x2 and y1 <= y2 (top-left corner first)")
    if x2 - x1 < 1 or y2 - y1 < 1:
        raise RegionError(f"{region.name}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is empty (under one pixel wide "
                          f"or tall); give the object's full extent")
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise RegionError(f"{region.name}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) reaches outside the "
                          f"{width}x{height} image; boxes are original-image pixels with 0 <= x1 < x2 <= "
                          f"{width} and 0 <= y1 < y2 <= {height} (clip it to the image)")
    if region.mask is not None:
        m = np.asarray(region.mask)
        if m.shape[:2] != (height, width) or m.ndim != 2:
            raise RegionError(f"{region.name}: mask is {'x'.join(map(str, m.shape[::-1]))} but the image is "
                              f"{width}x{height}; give a mask of the original image's size (HxW)")
        if not np.any(m):
            raise RegionError(f"{region.name}: mask is empty; give a mask with the object's pixels set")
    return region


def make_regions(boxes, width: int, height: int, masks=None) -> list[Region]:
    masks = list(masks) if masks is not None else [None] * len(boxes)
    if len(masks) != len(boxes):
        raise RegionError(f"{len(masks)} mask(s) for {len(boxes)} region(s); give one mask per region or none")
    return [check_region(Region(tuple(float(v) for v in b), None if m is None else np.asarray(m).astype(bool),
                                f"region {k + 1}"), width, height)
            for k, (b, m) in enumerate(zip(boxes, masks))]


def normalize_box(box, width: int, height: int, coord_range: int = 1000) -> tuple[int, int, int, int]:
    """Original pixels -> [0, coord_range] integers relative to W and H, rounded to nearest (the release's
    sample: 1024x768 boxes -> (0, 39, 652, 999), (6, 380, 228, 562))."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return (int(round(x1 / width * coord_range)), int(round(y1 / height * coord_range)),
            int(round(x2 / width * coord_range)), int(round(y2 / height * coord_range)))


def region_norm_size(profile: Profile, orig_size: tuple[int, int], pre_size: tuple[int, int],
                     scale: tuple[float, float]) -> tuple[float, float, float, float]:
    """(sx, sy, W, H): original pixels are multiplied by (sx, sy) and normalised by (W, H)."""
    if profile.regions.relative_to == "original":
        return 1.0, 1.0, float(orig_size[0]), float(orig_size[1])
    return scale[0], scale[1], float(pre_size[0]), float(pre_size[1])


def region_text(profile: Profile, norm: tuple[int, int, int, int]) -> str:
    x1, y1, x2, y2 = norm
    return profile.regions.format.format(x1=x1, y1=y1, x2=x2, y2=y2)


def clean_question(profile: Profile, raw: str) -> str:
    """A benchmark's question text without its image token (and the whitespace around the question)."""
    return raw.replace(profile.regions.image_token, "").strip()


def render_question(profile: Profile, template: str, norms: list[tuple[int, int, int, int]]) -> str:
    """Replace each mask token, in order, by the region's text; the counts must agree."""
    tok = profile.regions.mask_token
    parts = clean_question(profile, template).split(tok)
    if len(parts) - 1 != len(norms):
        raise RegionError(f"the question has {len(parts) - 1} {tok} region(s) but {len(norms)} region(s) were "
                          f"given; give exactly {len(parts) - 1} box(es) with --regions")
    out = parts[0]
    for norm, rest in zip(norms, parts[1:]):
        out += region_text(profile, norm) + rest
    return out + profile.suffix


def rewrite_answer(profile: Profile, answer: str, norms: list[tuple[int, int, int, int]]) -> str:
    """A benchmark answer's `Region [i]` references written the way the model writes regions."""
    def sub(m):
        i = int(m.group(1))
        return region_text(profile, norms[i]) if 0 <= i < len(norms) else m.group(0)
    return re.sub(profile.regions.answer_region_regex, sub, answer)


@dataclass
class ObjectPrompt:
    """One object question, ready for an engine."""

    question: str
    """profile question name (= its SpatialRGPT category)"""
    text: str
    regions: list[Region]
    regions_normalized: list[tuple[int, int, int, int]]
    image_size: tuple[int, int]
    """the prompt image's size (after preprocessing)"""
    meta: dict = field(default_factory=dict)


def object_prompt(profile: Profile, question: str, regions: list[Region], orig_size, pre_size, scale, *,
                  raw_text: str | None = None) -> ObjectPrompt:
    """The exact text of one object question: the profile's template (or a benchmark's raw question text)
    with its regions written in."""
    q = question_of(profile, question)
    if q.regions is not None and len(regions) != q.regions:
        raise RegionError(f"question {question!r} is about {q.regions} region(s) but {len(regions)} were "
                          f"given; pass exactly {q.regions} box(es) with --regions")
    sx, sy, W, H = region_norm_size(profile, orig_size, pre_size, scale)
    rng = profile.regions.coord_range
    norms = [normalize_box((r.box[0] * sx, r.box[1] * sy, r.box[2] * sx, r.box[3] * sy), W, H, rng)
             for r in regions]
    text = render_question(profile, raw_text if raw_text is not None else q.template, norms)
    return ObjectPrompt(question, text, list(regions), norms, tuple(pre_size))


# ----------------------------------------------------------------------------------------------
# Answers


_re_cache: dict = {}


def _rx(pattern: str, flags=re.IGNORECASE) -> re.Pattern:
    key = (pattern, flags)
    if key not in _re_cache:
        _re_cache[key] = re.compile(pattern, flags)
    return _re_cache[key]


def choice_index(value: tuple | None, norms: list[tuple[int, int, int, int]]) -> int | None:
    """Which of the prompt's regions a parsed choice names (an exact box, else the nearest within 5 units)."""
    if value is None:
        return None
    kind, v = value
    if kind == "index":
        return v if 0 <= v < len(norms) else None
    d = [sum(abs(a - b) for a, b in zip(v, n)) for n in norms]
    k = int(np.argmin(d))
    return k if d[k] <= 20 else None


def strip_regions(profile: Profile, text: str) -> str:
    """Answer text without its region references (their numbers are not measurements)."""
    text = _rx(profile.regions.region_regex, 0).sub(" ", text)
    return _rx(profile.regions.answer_region_regex, 0).sub(" ", text)


def clock_error(a: int, b: int) -> int:
    """Hours between two clock directions, the short way round (0..6)."""
    d = abs(int(a) - int(b)) % 12
    return min(d, 12 - d)
