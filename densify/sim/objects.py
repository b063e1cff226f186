"""The simulated object model: answers SpatialRGPT-style questions from a synthetic scene's truth.

It reads the regions back out of the prompt text (a wrong prompt gives wrong answers), finds the object
each region shows from the per-pixel object ids, measures the objects' true shapes (from their metadata:
kind, centre, size, yaw) in a gravity-aligned viewer frame with the same functions the geometry answers
use, perturbs the answer through an error model and writes it the way SpatialRGPT's answers read (units
chosen as its data generator does: centimetres or inches under 1 m, metres or feet above). Without
object truth it answers with a refusal that no parser accepts: it never invents an answer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from densify.objects.geometry import RegionGeometry, ViewerFrame, answer, frame_from_up, geometry_of
from densify.objects.questions import CATEGORIES

NO_TRUTH_ANSWER = "I cannot tell which objects the regions show."
ROOM_KINDS = ("floor", "ceiling", "wall")


@dataclass(frozen=True)
class ObjectErrorModel:
    flip_rate: float = 0.12
    """share of qualitative answers that are wrong (predicate negated, the other region chosen)."""
    metric_sigma: float = 0.22
    """log-normal relative noise on lengths (std of log(pred / true))."""
    clock_sigma_h: float = 0.6
    """normal noise on a direction, in clock hours."""

    @classmethod
    def exact(cls) -> "ObjectErrorModel":
        return cls(0.0, 0.0, 0.0)


def _obj(o) -> dict:
    return o if isinstance(o, dict) else o.to_dict()


def shape_points(obj) -> np.ndarray:
    """World points spanning an object's true shape: a box's corners, a cylinder's rims, a sphere's surface."""
    o = _obj(obj)
    c = np.asarray(o["center"], float)
    sx, sy, sz = (float(v) for v in o["size"])
    if o["kind"] == "sphere":
        n = 400
        k = np.arange(n) + 0.5
        phi, th = np.arccos(1 - 2 * k / n), math.pi * (1 + 5 ** 0.5) * k
        return c + 0.5 * sx * np.stack([np.cos(th) * np.sin(phi), np.cos(phi), np.sin(th) * np.sin(phi)], 1)
    if o["kind"] == "cylinder":
        a = np.linspace(0, 2 * math.pi, 72, endpoint=False)
        ring = np.stack([0.5 * sx * np.cos(a), np.zeros_like(a), 0.5 * sz * np.sin(a)], 1)
        return c + np.concatenate([ring + [0, -sy / 2, 0], ring + [0, sy / 2, 0]])
    corners = np.array([[x, y, z] for x in (-.5, .5) for y in (-.5, .5) for z in (-.5, .5)]) * [sx, sy, sz]
    yaw = float(o.get("yaw", 0.0))
    cy, sn = math.cos(yaw), math.sin(yaw)
    R = np.array([[cy, 0, sn], [0, 1, 0], [-sn, 0, cy]])
    return c + corners @ R.T


def truth_frame(cam_to_world: np.ndarray) -> ViewerFrame:
    """The viewer frame with the world's true up (world +y) in camera coordinates."""
    R = np.asarray(cam_to_world, float)[:3, :3]
    return frame_from_up(R.T @ np.array([0.0, 1.0, 0.0]), "given")


def object_geometry(obj, cam_to_world: np.ndarray, frame: ViewerFrame | None = None) -> RegionGeometry:
    """An object's true centre, extents and nearest point in the viewer frame (exact, no trimming)."""
    T = np.asarray(cam_to_world, float)
    P = (shape_points(obj) - T[:3, 3]) @ T[:3, :3]   # world -> camera
    return geometry_of((frame or truth_frame(T)).coords(P), robust=False)


def object_in_box(object_ids: np.ndarray, box, objects: list) -> int | None:
    """The object a box shows: the furniture id covering most of the box's pixels (room surfaces ignored)."""
    h, w = object_ids.shape
    x1, y1, x2, y2 = box
    sub = object_ids[max(0, int(y1)):min(h, int(math.ceil(y2))), max(0, int(x1)):min(w, int(math.ceil(x2)))]
    kinds = {int(_obj(o)["id"]): _obj(o)["kind"] for o in objects}
    ids, counts = np.unique(sub[sub >= 0], return_counts=True)
    best, best_n = None, 0
    for i, n in zip(ids.tolist(), counts.tolist()):
        if kinds.get(i) not in ROOM_KINDS and i in kinds and n > best_n:
            best, best_n = i, n
    return best


def human_length(metres: float, rng) -> str:
    """A length the way SpatialRGPT's answers write it (its unit choices, two decimals)."""
    if metres < 1:
        opts = [(metres * 100, "centimeters", 0.2), (metres * 39.3701, "inches", 0.8)]
    elif metres < 3:
        opts = [(metres, "meters", 0.5), (metres * 3.28084, "feet", 0.5)]
    else:
        opts = [(metres, "meters", 0.7), (metres * 3.28084, "feet", 0.3)]
    r, acc = rng.random(), 0.0
    for v, unit, p in opts:
        acc += p
        if r < acc:
            return f"{round(v, 2)} {unit}"
    v, unit, _ = opts[-1]
    return f"{round(v, 2)} {unit}"


_PRED_WORDS = {"x": ("to the left of", "to the right of"), "up": ("below", "above"),
               "near": ("in front of", "behind"), "volume": ("smaller than", "bigger than"),
               "height": ("shorter than", "taller than"), "width": ("thinner than", "wider than")}
_CHOICE_WORDS = {"x": ("more to the left", "more to the right"), "up": ("below", "above"),
                 "near": ("in front", "behind"), "height": ("shorter", "taller"),
                 "volume": ("smaller", "bigger"), "width": ("thinner", "wider")}


def write_answer(category: str, value, region_texts: list[str], rng) -> str:
    """An answer text in SpatialRGPT's style for a value (bool, region index, metres or clock hour)."""
    cat = CATEGORIES[category]
    A = region_texts[0]
    B = region_texts[1] if len(region_texts) > 1 else ""
    if cat.kind == "predicate":
        word = _PRED_WORDS[cat.quantity][0 if cat.sign < 0 else 1]
        if value:
            return f"Yes, {A} is {word} {B}."
        return f"{'No' if rng.random() < 0.5 else 'Incorrect'}, {A} is not {word} {B}."
    if cat.kind == "choice":
        word = _CHOICE_WORDS[cat.quantity][0 if cat.sign < 0 else 1]
        return f"{region_texts[int(value)]} is {word}."
    if cat.kind == "clock":
        return f"{B} is roughly at {int(value)} o'clock from {A}."
    length = human_length(float(value), rng)
    if cat.quantity == "width":
        return f"The width of {A} is {length}."
    if cat.quantity == "height":
        return f"The height of {A} is {length}."
    word = {"distance": "", "horizontal_distance": " horizontally", "vertical_distance": " vertically"}[cat.quantity]
    return f"{A} and {B} are {length} apart{word}."


def perturb(category: str, value, rng, error: ObjectErrorModel):
    cat = CATEGORIES[category]
    if cat.kind == "predicate":
        return (not value) if error.flip_rate and rng.random() < error.flip_rate else bool(value)
    if cat.kind == "choice":
        return 1 - int(value) if error.flip_rate and rng.random() < error.flip_rate else int(value)
    if cat.kind == "clock":
        h = int(value) + (int(round(rng.normal(0, error.clock_sigma_h))) if error.clock_sigma_h else 0)
        h %= 12
        return 12 if h == 0 else h
    return float(value) * (math.exp(rng.normal(0, error.metric_sigma)) if error.metric_sigma else 1.0)


def true_answer(category: str, objects: list, ids: list[int], cam_to_world: np.ndarray):
    """The true answer to a category about objects `ids` (by id) seen from a camera."""
    by_id = {int(_obj(o)["id"]): o for o in objects}
    frame = truth_frame(cam_to_world)
    geoms = [object_geometry(by_id[i], cam_to_world, frame) for i in ids]
    return answer(category, geoms), geoms


def answer_from_truth(category: str, boxes_pre: list, region_texts: list[str], truth, rng,
                      error: ObjectErrorModel) -> str:
    """The simulated model's answer text. boxes_pre: the regions in the prompt image's pixels; truth: a
    GroundTruth with object_ids (prompt frame), objects and cam_to_world."""
    if category not in CATEGORIES:
        return NO_TRUTH_ANSWER
    need = CATEGORIES[category].regions
    if (truth is None or getattr(truth, "object_ids", None) is None or not getattr(truth, "objects", None)
            or getattr(truth, "cam_to_world", None) is None or len(boxes_pre) < need):
        return NO_TRUTH_ANSWER
    ids = [object_in_box(truth.object_ids, b, truth.objects) for b in boxes_pre[:need]]
    if any(i is None for i in ids):
        return NO_TRUTH_ANSWER
    value, _ = true_answer(category, truth.objects, ids, truth.cam_to_world)
    return write_answer(category, perturb(category, value, rng, error), region_texts, rng)


def regions_in_text(region_regex: str, text: str, coord_range: int, size: tuple[int, int]):
    """Regions written in a prompt -> (boxes in the prompt image's pixels, their exact texts)."""
    w, h = size
    boxes, texts = [], []
    for m in re.finditer(region_regex, text):
        x1, y1, x2, y2 = (int(g) for g in m.groups()[:4])
        boxes.append((x1 / coord_range * w, y1 / coord_range * h, x2 / coord_range * w, y2 / coord_range * h))
        texts.append(m.group(0))
    return boxes, texts
