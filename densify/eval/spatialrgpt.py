"""SpatialRGPT-Bench: the release format, a rule-based scorer, and a run over any engine.

Expected layout (the benchmark's release, a8cheng/SpatialRGPT-Bench, `SpatialRGPT-Bench_v1.json`; images
from Omni3D): one JSON file holding a list of records (a JSONL file with one record per line works too),
and an image folder that the records' `image_info.file_path` is relative to:

    {"id": "qualitative_3TrgWgKqnf",
     "image_info": {"file_path": "SUNRGBD/.../image.jpg", "width": 1024, "height": 768,
                    "intrinsics": [fx, fy, cx, cy]},          # optional (else a JSON sidecar, else 60 deg)
     "qa_info": {"type": "qualitative", "category": "small_predicate", "class": ["lamp", "television"]},
     "conversations": [{"from": "human", "value": "<image>\\n Can you confirm if <mask> is smaller than <mask>?"},
                       {"from": "gpt", "value": "Incorrect, Region [0] is not smaller in size than Region [1]."}],
     "bbox": [[x1, y1, x2, y2], ...],                          # original-image pixels, one per <mask>
     "rle": [{"size": [H, W], "counts": ...}, ...]}            # optional COCO RLE masks (string or list)

Intrinsics may also be given as `image_info.K` (3x3) or `image_info.fx/fy/cx/cy`. Boxes are scaled when
the image on disk has another size than `image_info` says, then clamped to the image (as SpatialRGPT's
evaluation clamps them); a question whose region is still unusable (empty, inverted) is skipped and listed
in `failed_questions`, the image's other questions run.

Scoring (SpatialRGPT's rules, with its GPT-4 judge replaced by the profile's answer parsers, applied to
both the reference answer and the response): qualitative: correct when the parsed predicate (yes/no) or the
chosen region equals the reference's; quantitative lengths: success when 0.75 * gt <= pred <= 1.25 * gt,
AbsRel = mean |pred - gt| / gt over answered questions; direction: success when the clock hours differ by at
most one (cyclic), error in hours. An unparseable response counts as a miss (and is left out of AbsRel);
a reference answer without a value (e.g. "they overlap vertically") leaves its question out, counted as
`unscorable`. Results are grouped as SpatialRGPT reports them (left/right, below/above, behind/front,
big/small, tall/short, wide/thin; direct/horizontal/vertical distance, width, height, direction).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from densify.config.profiles import Profile
from densify.engines.base import generate_stream
from densify.io.cameras import Camera, decode
from densify.objects.questions import (CATEGORIES, QUALITATIVE_GROUPS, QUANTITATIVE_GROUPS, choice_index, clock_error,
                                       make_regions, question_of, rewrite_answer)
from densify.queries import answers as answers_mod

log = logging.getLogger("densify.eval.spatialrgpt")


# ----------------------------------------------------------------------------------------------
# COCO RLE (column-major run lengths, starting with a run of zeros)


def rle_encode(mask: np.ndarray) -> dict:
    """A boolean HxW mask -> uncompressed COCO RLE {"size": [H, W], "counts": [...]}."""
    m = np.asarray(mask, bool)
    flat = m.flatten(order="F")
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], starts, [flat.size]])).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs  # the first run counts zeros
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": [int(c) for c in runs]}


def _counts_from_string(s: str) -> list[int]:
    """COCO's compressed counts string (6-bit chunks offset by 48, deltas after the second run)."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_decode(rle: dict) -> np.ndarray:
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode()
    if isinstance(counts, str):
        counts = _counts_from_string(counts)
    flat = np.zeros(h * w, bool)
    pos, val = 0, False
    for c in counts:
        if val:
            flat[pos:pos + c] = True
        pos += c
        val = not val
    return flat.reshape((w, h)).T


# ----------------------------------------------------------------------------------------------
# Reading


@dataclass
class BenchItem:
    id: str
    image: Path
    category: str
    type: str
    question: str
    """raw question text (with <image> and <mask> tokens)"""
    answer: str
    """reference answer (with Region [i] references)"""
    boxes: list
    rles: list | None = None
    width: int | None = None
    height: int | None = None
    intrinsics: list | None = None
    file_path: str = ""
    """image_info.file_path as the record gives it (names the image wherever the folder lies)"""


def _intrinsics(info: dict):
    if "intrinsics" in info:
        return list(info["intrinsics"])[:4]
    if "K" in info:
        K = np.asarray(info["K"], float).reshape(3, 3)
        return [K[0, 0], K[1, 1], K[0, 2], K[1, 2]]
    if all(k in info for k in ("fx", "fy", "cx", "cy")):
        return [info["fx"], info["fy"], info["cx"], info["cy"]]
    return None


def read_bench(path: str | Path, image_root: str | Path | None = None) -> list[BenchItem]:
    """The benchmark's JSON (a list of records) or JSONL; image paths relative to image_root (default: the
    file's folder). A record missing a needed key is an error naming the record and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such benchmark file; pass --data PATH/TO/SpatialRGPT-Bench_v1.json")
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: neither a JSON list nor JSON lines ({exc})") from None
    if isinstance(data, dict):
        data = data.get("data") or data.get("questions") or [data]
    root = Path(image_root) if image_root is not None else path.parent
    items = []
    for n, rec in enumerate(data):
        where = f"{path}: record {n} ({rec.get('id', '?') if isinstance(rec, dict) else '?'})"
        try:
            info, qa, conv = rec["image_info"], rec["qa_info"], rec["conversations"]
            items.append(BenchItem(
                id=str(rec.get("id", n)), image=root / info["file_path"], category=qa["category"],
                type=qa.get("type", ""), question=conv[0]["value"], answer=conv[1]["value"],
                boxes=[list(map(float, b)) for b in rec["bbox"]], rles=rec.get("rle"),
                width=info.get("width"), height=info.get("height"), intrinsics=_intrinsics(info),
                file_path=str(info["file_path"])))
        except (KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"{where}: missing or malformed {exc}; each record needs image_info.file_path, "
                             f"qa_info.category, conversations (question, answer) and bbox") from None
    return items


# ----------------------------------------------------------------------------------------------
# Scoring


@dataclass
class Scored:
    category: str
    group: str
    kind: str
    correct: bool
    answered: bool
    rel_err: float | None = None
    """lengths: |pred - gt| / gt; direction: hours off"""


def score(category: str, pred, gt) -> Scored | None:
    """One answer against the reference (values as the parsers give them); None when gt has no value."""
    cat = CATEGORIES[category]
    if gt is None:
        return None
    if pred is None:
        return Scored(cat.name, cat.group, cat.kind, False, False)
    if cat.kind in ("predicate", "choice"):
        return Scored(cat.name, cat.group, cat.kind, bool(pred == gt), True)
    if cat.kind == "clock":
        e = clock_error(pred, gt)
        return Scored(cat.name, cat.group, cat.kind, e <= 1, True, float(e))
    gt, pred = float(gt), float(pred)
    ok = 0.75 * gt <= pred <= 1.25 * gt
    return Scored(cat.name, cat.group, cat.kind, ok, True, abs(pred - gt) / (gt + 1e-4))


def summarize(scores: list[Scored], unscorable: int = 0) -> dict:
    """Per group (SpatialRGPT's rows) and overall: accuracy in %, AbsRel for lengths, hours for direction."""
    by = defaultdict(list)
    for s in scores:
        by[s.group].append(s)
    out = {"groups": {}}
    for g in QUALITATIVE_GROUPS + QUANTITATIVE_GROUPS:
        ss = by.get(g, [])
        if not ss:
            continue
        errs = [s.rel_err for s in ss if s.rel_err is not None]
        row = {"n": len(ss), "answered": sum(s.answered for s in ss),
               "accuracy": round(100.0 * sum(s.correct for s in ss) / len(ss), 1)}
        if g in QUANTITATIVE_GROUPS:
            key = "mean_hours_off" if g == "direction" else "absrel"
            row[key] = round(float(np.mean(errs)), 3) if errs else None
        out["groups"][g] = row
    for name, groups in (("qualitative", QUALITATIVE_GROUPS), ("quantitative", QUANTITATIVE_GROUPS)):
        ss = [s for s in scores if s.group in groups]
        out[name] = {"n": len(ss), "accuracy": round(100.0 * sum(s.correct for s in ss) / len(ss), 1) if ss else None}
    cats = defaultdict(list)
    for s in scores:
        cats[s.category].append(s)
    out["categories"] = {c: {"n": len(ss), "accuracy": round(100.0 * sum(s.correct for s in ss) / len(ss), 1)}
                         for c, ss in sorted(cats.items())}
    out["unscorable"] = unscorable
    return out


def reference_value(profile: Profile, item: BenchItem, norms) -> object | None:
    """The reference answer's value, parsed by the same rules as a response (Region [i] -> the box text)."""
    q = question_of(profile, item.category)
    p = answers_mod.parse_text(q, rewrite_answer(profile, item.answer, norms))
    if p.failure is not None:
        return None
    return choice_index(p.value, norms) if q.parser == "choice" else p.value


# ----------------------------------------------------------------------------------------------
# Running


DepthFor = Callable[[BenchItem, Camera], np.ndarray | None]
"""A depth map (metres, original pixels) for an item's image, or None."""


@dataclass
class BenchRun:
    records: list[dict] = field(default_factory=list)
    model: list[Scored] = field(default_factory=list)
    geometry: list[Scored] = field(default_factory=list)
    unscorable: int = 0
    failed_images: list[dict] = field(default_factory=list)
    failed_questions: list[dict] = field(default_factory=list)


def bench_regions(item: BenchItem, width: int, height: int, use_masks: bool = True):
    """An item's regions in the loaded image's pixels: boxes scaled when image_info gives another size,
    then clamped to the image as SpatialRGPT's evaluation does; masks decoded and resized to the image."""
    import cv2

    sx = width / item.width if item.width else 1.0
    sy = height / item.height if item.height else 1.0
    boxes = [[min(max(b[0] * sx, 0), width), min(max(b[1] * sy, 0), height),
              min(max(b[2] * sx, 0), width), min(max(b[3] * sy, 0), height)] for b in item.boxes]
    masks = None
    if use_masks and item.rles:
        masks = []
        for r in item.rles:
            m = rle_decode(r)
            if m.shape != (height, width):
                m = cv2.resize(m.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
            masks.append(m)
    return make_regions(boxes, width, height, masks)


def bench_images(items: list[BenchItem], limit: int | None = None) -> int:
    """How many images the (first `limit`) questions are about: the steps of `run_bench`'s progress."""
    return len({it.image for it in (items[:limit] if limit else items)})


def run_bench(items: list[BenchItem], profile: Profile, engine, *, depth_for: DepthFor | None = None,
              up: str = "floor", use_masks: bool = True, limit: int | None = None, progress=None) -> dict:
    """Ask `engine` every question (one batch per image) and score it; with depth_for also answer every
    question from that image's depth map and score those answers the same way. progress: a
    densify.io.progress.Progress over the images (`bench_images`), updated as each is scored."""
    from densify.objects.qa import (build_prompts, geometry_answer, geometry_context, image_batch, parse_model_answer,
                                    prepare_object_image, to_json_value)

    items = items[:limit] if limit else items
    unknown = sorted({it.category for it in items if it.category not in profile.questions})
    if unknown:
        raise KeyError(f"categories {unknown} are not questions of profile {profile.name}; "
                       f"known: {', '.join(profile.questions)}")
    by_image: dict[Path, list[BenchItem]] = defaultdict(list)
    for it in items:
        by_image[it.image].append(it)
    run = BenchRun()
    up_sources: dict[str, int] = defaultdict(int)
    t0 = time.perf_counter()

    def batches():
        for path, its in by_image.items():
            try:
                img = decode(path, its[0].intrinsics)
                rgb, cam = img.rgb, img.camera
                h, w = rgb.shape[:2]
                prep = prepare_object_image(rgb, cam, profile)
            except (OSError, ValueError) as exc:
                log.error("%s: %s", path, exc)
                run.failed_images.append({"image": str(path), "error": str(exc), "questions": len(its)})
                if progress is not None:
                    progress.update(failed=1)
                continue
            ok, prompts = [], []
            for it in its:
                try:
                    regions = bench_regions(it, w, h, use_masks)
                    prompts += build_prompts(profile, prep, [(it.category, regions, it.question)])
                    ok.append(it)
                except ValueError as exc:
                    log.error("%s: question %s: %s", path, it.id, exc)
                    run.failed_questions.append({"id": it.id, "error": str(exc)})
            if not ok:
                if progress is not None:
                    progress.update(failed=1)
                continue
            yield image_batch(profile, prep, prompts, its[0].file_path or str(path), path=path,
                              tag=(ok, prompts, cam))

    for batch, completions in generate_stream(engine, batches()):
        its, prompts, cam = batch.tag
        ctx = None
        if depth_for is not None:
            d = depth_for(its[0], cam)
            ctx = geometry_context(d, cam, up, "depth_for") if d is not None else None
            up_sources[ctx.frame.source if ctx is not None else "no depth"] += 1
        for it, p, c in zip(its, prompts, completions):
            m = parse_model_answer(profile, p, c)
            gt = reference_value(profile, it, p.regions_normalized)
            rec = {"id": it.id, "category": it.category, "text": p.text, "reference": it.answer,
                   "reference_value": to_json_value(gt), "model": {"text": m.text, "value": to_json_value(m.value),
                                                                  "failure": m.failure}}
            s = score(it.category, m.value, gt)
            if s is None:
                run.unscorable += 1
            else:
                run.model.append(s)
                rec["model"]["correct"] = s.correct
            if ctx is not None:
                g = geometry_answer(ctx, it.category, p.regions)
                rec["geometry"] = {"value": to_json_value(g.value), "error": g.error, "up": ctx.frame.source}
                sg = score(it.category, g.value, gt)
                if sg is not None:
                    run.geometry.append(sg)
                    rec["geometry"]["correct"] = sg.correct
            run.records.append(rec)
        if progress is not None:
            progress.update(queries=len(completions), failed=int(all(c.error is not None for c in completions)))
    if progress is not None:
        progress.close()
    wall = time.perf_counter() - t0
    report = {"profile": profile.name, "engine": getattr(engine, "name", "?"), "questions": len(items),
              "images": len(by_image), "failed_images": run.failed_images,
              "failed_questions": run.failed_questions, "wall_s": round(wall, 2),
              "scorer": "rule-based (profile parsers on reference and response; 25% band; clock +-1 h)",
              "model": summarize(run.model, run.unscorable)}
    if depth_for is not None:
        report["geometry"] = summarize(run.geometry, run.unscorable)
        report["geometry"]["up"] = up
        report["geometry"]["up_sources"] = dict(up_sources)  # images per source (floor-plane, camera, ...)
    report["_records"] = run.records
    return report


def format_table(report: dict) -> str:
    """A markdown table: per group, the model's and (when present) the geometry answers' scores."""
    cols = ["model"] + (["geometry"] if "geometry" in report else [])
    lines = ["| group | n | " + " | ".join(f"{c} acc % | {c} AbsRel / h off" for c in cols) + " |",
             "|---|---|" + "---|---|" * len(cols)]
    for g in QUALITATIVE_GROUPS + QUANTITATIVE_GROUPS:
        row = report["model"]["groups"].get(g)
        if row is None:
            continue
        cells = []
        for c in cols:
            r = report[c]["groups"].get(g, {})
            err = r.get("absrel", r.get("mean_hours_off"))
            cells += [f"{r.get('accuracy', '-')}", "-" if err is None else f"{err}"]
        lines.append(f"| {g} | {row['n']} | " + " | ".join(cells) + " |")
    for name in ("qualitative", "quantitative"):
        cells = []
        for c in cols:
            cells += [f"{report[c][name]['accuracy']}", ""]
        lines.append(f"| **{name}** | {report['model'][name]['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
