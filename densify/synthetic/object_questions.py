"""A SpatialRGPT-Bench-style question set built from a saved synthetic scene, with true answers.

Reads what `Scene.save` / `densify synth` wrote (view_NNN.png, .objects.npy, .json with cam_to_world,
objects.json) and writes the benchmark's own release format (see densify/eval/spatialrgpt.py), so the
reader, the prompts, the parsers and the scorer run on it exactly as on the real benchmark. Regions are the
visible pixels of furniture (box + uncompressed COCO RLE mask); answers are written from the objects' true
shapes with `object_answers.true_answer`, in SpatialRGPT's answer style. Questions whose truth is too close
to call (objects under `min_gap_m` apart, sizes under `min_rel` different, distances under `min_dist_m`)
are left out, as are objects cut by the image border or smaller than `min_pixels`.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from densify.config.profiles import load_profile
from densify.eval.spatialrgpt import rle_encode
from densify.objects.geometry import margin
from densify.objects.questions import CATEGORIES
from densify.sim.objects import ROOM_KINDS, true_answer, write_answer


def visible_objects(object_ids: np.ndarray, objects: list[dict], *, min_pixels: int = 600, border: int = 2):
    """Furniture ids seen in a view (not cut by the border, big enough) -> (box x1 y1 x2 y2, mask)."""
    h, w = object_ids.shape
    kinds = {o["id"]: o["kind"] for o in objects}
    out = {}
    for i in np.unique(object_ids[object_ids >= 0]).tolist():
        if kinds.get(i) in ROOM_KINDS or i not in kinds:
            continue
        m = object_ids == i
        if m.sum() < min_pixels:
            continue
        ys, xs = np.nonzero(m)
        x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        if x1 < border or y1 < border or x2 > w - border or y2 > h - border:
            continue
        out[i] = ((x1, y1, x2, y2), m)
    return out


def build_question_set(folder, *, seed: int = 0, per_category: int = 3, min_gap_m: float = 0.15,
                       min_rel: float = 0.15, min_dist_m: float = 0.15, profile: str = "vlm3-object",
                       out: str | Path | None = None) -> list[dict]:
    """Questions for every view of a saved scene folder (at most per_category per category and view)."""
    folder = Path(folder)
    objects = json.loads((folder / "objects.json").read_text())
    by_id = {o["id"]: o for o in objects}
    templates = {n: q.template for n, q in load_profile(profile).questions.items()}
    rng = np.random.default_rng(seed)
    records = []
    for img in sorted(folder.glob("view_*.png")):
        ids_p, side_p = img.with_suffix(".objects.npy"), img.with_suffix(".json")
        if not ids_p.is_file() or not side_p.is_file():
            continue
        side = json.loads(side_p.read_text())
        ids = np.load(ids_p)
        h, w = ids.shape
        T = np.asarray(side["cam_to_world"], float)
        vis = visible_objects(ids, objects)
        keys = sorted(vis)
        for cat in CATEGORIES.values():
            if cat.name not in templates:
                continue
            if cat.regions == 1:
                cands = [(k,) for k in keys]
            else:
                cands = list(itertools.permutations(keys, 2))
            rng.shuffle(cands)
            n = 0
            for combo in cands:
                if n >= per_category:
                    break
                value, geoms = true_answer(cat.name, objects, list(combo), T)
                if cat.kind in ("predicate", "choice"):
                    gap = margin(cat, geoms)
                    if gap < (min_gap_m if cat.quantity in ("x", "up", "near") else min_rel):
                        continue
                elif cat.kind == "metric" and value < min_dist_m:
                    continue
                elif cat.kind == "clock" and np.hypot(*(geoms[1].center - geoms[0].center)[[0, 2]]) < 0.5:
                    continue  # a direction needs the objects apart on the floor
                refs = [f"Region [{k}]" for k in range(len(combo))]
                records.append({
                    "id": f"synthetic_{img.stem}_{cat.name}_{n}",
                    "image_info": {"file_path": img.name, "width": w, "height": h,
                                   "intrinsics": [side["fx"], side["fy"], side["cx"], side["cy"]]},
                    "text_q": templates[cat.name].replace("<mask>", "{}").format(*refs),
                    "qa_info": {"type": "qualitative" if cat.kind in ("predicate", "choice") else "quantitative",
                                "category": cat.name, "class": [by_id[k]["kind"] for k in combo]},
                    "conversations": [{"from": "human", "value": "<image>\n " + templates[cat.name]},
                                      {"from": "gpt", "value": write_answer(cat.name, value, refs, rng)}],
                    "bbox": [list(vis[k][0]) for k in combo],
                    "rle": [rle_encode(vis[k][1]) for k in combo],
                })
                n += 1
    if out is not None:
        Path(out).write_text(json.dumps(records))
    return records
