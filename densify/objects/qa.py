"""Object questions about one image, end to end: prompts -> engine batch -> parsed answers, and the same
questions answered from a depth map, with their agreement. Used by `densify ask` and the SpatialRGPT-Bench
evaluation; plain functions and dataclasses, no command-line concerns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from densify.config.profiles import Profile
from densify.engines.base import Completion, EngineBatch
from densify.objects import geometry as georeg
from densify.io.cameras import Camera, PreparedImage, prepare_for
from densify.objects.questions import (CATEGORIES, ObjectPrompt, Region, category_of, choice_index, object_prompt,
                                       question_of)
from densify.queries import answers as answers_mod
from densify.queries.prompts import image_ref, image_uid, object_batch


def prepare_object_image(rgb: np.ndarray, camera: Camera, profile: Profile) -> PreparedImage:
    """An image as the object profile wants it (its boxes are normalised by the image size, not by
    prompt coordinates)."""
    return prepare_for(rgb, camera, profile)


def build_prompts(profile: Profile, prep: PreparedImage, questions: list[tuple[str, list[Region], str | None]]
                  ) -> list[ObjectPrompt]:
    """(question name, regions, optional raw benchmark text) -> exact prompts for one image."""
    pm = prep.pixel_map
    return [object_prompt(profile, name, regs, pm.orig_size, pm.pre_size, (pm.sx, pm.sy), raw_text=raw)
            for name, regs, raw in questions]


def image_batch(profile: Profile, prep: PreparedImage, prompts: list[ObjectPrompt], source_id: str, *,
                path=None, tag=None) -> EngineBatch:
    return object_batch(prep, prompts, profile, uid=image_uid(prep, source_id),
                        ref=image_ref(source_id, prep, path), tag=tag)


@dataclass
class ModelAnswer:
    text: str
    value: object | None
    """bool (predicate), region index (choice), metres (metric), clock hour (direction); None: no answer"""
    failure: str | None = None


def parse_model_answer(profile: Profile, prompt: ObjectPrompt, c: Completion) -> ModelAnswer:
    q = question_of(profile, prompt.question)
    p = answers_mod.parse_completion(q, c)
    v = p.value
    if p.failure is None and q.parser == "choice":
        v = choice_index(v, prompt.regions_normalized)
        if v is None:
            return ModelAnswer(c.text, None, "unknown_region")
    return ModelAnswer(c.text, v, p.failure if p.failure is not None else (c.error and "engine_error"))


@dataclass
class GeometryContext:
    """A depth map of the original image (metres, original pixels), its camera and the viewer frame."""

    depth: np.ndarray
    camera: Camera
    frame: georeg.ViewerFrame
    source: str = "given"
    """where the depth came from: a depth.npy, densify's depth pipeline, ..."""


def geometry_context(depth: np.ndarray, camera: Camera, up: str = "floor", source: str = "given") -> GeometryContext:
    depth = np.asarray(depth, np.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth map must be HxW, got shape {depth.shape}")
    if depth.shape != (camera.height, camera.width):
        # A depth map at another resolution of the same image: resample to the image's pixels.
        depth = cv2.resize(depth, (camera.width, camera.height), interpolation=cv2.INTER_NEAREST)
    if up == "camera":
        frame = georeg.camera_frame()
    elif up == "floor":
        frame = georeg.estimate_floor_frame(depth, camera)
    else:
        raise ValueError(f"up must be 'floor' or 'camera', got {up!r}")
    return GeometryContext(depth, camera, frame, source)


@dataclass
class GeometryAnswer:
    value: object | None
    regions: list[dict] = field(default_factory=list)
    error: str | None = None


def geometry_answer(ctx: GeometryContext, category: str, regions: list[Region]) -> GeometryAnswer:
    cat = CATEGORIES[category]
    try:
        geoms = [georeg.region_geometry(ctx.depth, ctx.camera, r, ctx.frame) for r in regions[:cat.regions]]
        return GeometryAnswer(georeg.answer(cat, geoms), [g.to_dict() for g in geoms])
    except ValueError as exc:
        return GeometryAnswer(None, error=str(exc))


def to_json_value(v):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return round(float(v), 4)
    return v


def ask_records(profile: Profile, prompts: list[ObjectPrompt], completions: list[Completion],
                geometry: GeometryContext | None = None) -> list[dict]:
    """One JSON-ready record per question: the prompt, the model's answer, and with geometry the answer
    from the depth map and whether the two agree."""
    out = []
    for p, c in zip(prompts, completions):
        cat = category_of(profile, p.question)
        m = parse_model_answer(profile, p, c)
        rec = {"question": p.question, "category": cat.name, "kind": cat.kind, "text": p.text,
               "regions_normalized": [list(n) for n in p.regions_normalized],
               "model": {"text": m.text, "value": to_json_value(m.value), "failure": m.failure}}
        if c.error is not None:  # why the engine gave no answer (e.g. the simulator has no truth for a box)
            rec["model"]["error"] = c.error
        if cat.kind == "metric":
            rec["unit"] = "m"
        if geometry is not None:
            g = geometry_answer(geometry, cat.name, p.regions)
            rec["geometry"] = {"value": to_json_value(g.value), "regions": g.regions, "error": g.error,
                               "up": geometry.frame.source, "depth": geometry.source}
            rec["agree"] = georeg.agree(cat, m.value, g.value)
        out.append(rec)
    return out
