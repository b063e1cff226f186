"""`densify prompts`: print the exact prompt a profile sends for each point (one JSON object per line).

{"pixel": [x, y], "normalized": [u, v], "image_size": [w, h], "text": "..."}: pixel in the original image,
normalized the prompt coordinates (null for marker profiles), image_size after preprocessing. Marker
profiles (depthlm) add "marked": the preprocessed pixel the marker points at, or "failure": "unmarkable"
for a point too close to a border to be marked (never asked). With --save-images DIR each record names
the PNG of the image the engine is sent for it ("image_file": marked and resized, drawn by the same
function that draws for the engine; one shared file for profiles that write coordinates instead).
Object profiles (vlm3-object) take --regions and --question instead of --points and print
{"question": ..., "text": "...", "regions_normalized": [[x1, y1, x2, y2], ...], "image_size": [w, h]}.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from densify.config.profiles import load_profile
from densify.io import outputs
from densify.io.cameras import decode, parse_intrinsics_arg, prepare_for
from densify.queries.plan import check_points, markable, plan_queries
from densify.queries.prompts import depth_batch, image_uid, render_text


def parse_points(text: str) -> list[tuple[float, float]]:
    pts = []
    for item in text.split(";"):
        if not item.strip():
            continue
        try:
            x, y = (float(v) for v in item.split(","))
        except ValueError:
            raise ValueError(f"--points must look like 'x,y;x,y', got {item!r}") from None
        pts.append((x, y))
    if not pts:
        raise ValueError("--points is empty; give at least one 'x,y'")
    return pts


def prompt_records(profile_name: str, image, points, intrinsics=None, save_images: str | Path | None = None):
    profile = load_profile(profile_name)
    img = decode(image, intrinsics)
    h, w = img.rgb.shape[:2]
    prep = prepare_for(img.rgb, img.camera, profile)
    pts = check_points(points, w, h, "--points")
    size = list(prep.pixel_map.pre_size)
    out_dir = Path(save_images) if save_images is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    if profile.marker is not None:
        yield from _marker_records(profile, prep, pts, Path(image).stem, out_dir)
        return
    plan = plan_queries(pts, prep.pixel_map, dedupe=False)
    shared = None
    if out_dir is not None:  # every query shows the same prepared image
        shared = str(outputs.write_png(out_dir / f"{Path(image).stem}_{profile.name}.png", prep.pixels))
    coord_names = ("x1", "y1") if profile.images_per_query == 2 else ("x", "y")
    for i, (x, y) in enumerate(plan.pixels):
        u, v = (int(c) for c in plan.prompt_xy[i])
        rec = {"pixel": [_num(x), _num(y)], "normalized": [u, v], "image_size": size,
               "text": render_text(profile, **{coord_names[0]: u, coord_names[1]: v})}
        if shared is not None:
            rec["image_file"] = shared
        yield rec


def _marker_records(profile, prep, pts: np.ndarray, stem: str, out_dir: Path | None):
    """Records in the order of the points; the images are the ones `depth_batch` makes for the engine."""
    pm = prep.pixel_map
    marked = pm.to_pixel(pts)
    ok = markable(marked, pm.pre_size, profile.marker)
    plan = plan_queries(pts[ok], pm, dedupe=False, marker=profile.marker)
    batch = depth_batch(prep, plan, profile, uid=image_uid(prep, stem))
    asked = iter(zip(plan.marked.tolist(), batch.queries))
    for (x, y), (xm, ym), good in zip(pts.tolist(), marked.tolist(), ok.tolist()):
        rec = {"pixel": [_num(x), _num(y)], "normalized": None, "image_size": list(pm.pre_size),
               "marked": [int(xm), int(ym)]}
        if not good:
            yield {**rec, "text": None, "failure": "unmarkable"}
            continue
        (xq, yq), q = next(asked)
        assert (xq, yq) == (xm, ym)
        rec["text"] = q.text
        if out_dir is not None:
            path = out_dir / f"{stem}_{profile.name}_m{xm}_{ym}.png"
            rec["image_file"] = str(outputs.write_png(path, batch.images[q.image_uids[0]].pixels))
        yield rec


def object_prompt_records(profile_name: str, image, regions: str, questions: list[str], intrinsics=None):
    from densify.objects.qa import build_prompts, prepare_object_image
    from densify.objects.questions import make_regions, parse_regions, question_of

    profile = load_profile(profile_name)
    for q in questions:
        question_of(profile, q)
    img = decode(image, intrinsics)
    h, w = img.rgb.shape[:2]
    prep = prepare_object_image(img.rgb, img.camera, profile)
    regs = make_regions(parse_regions(regions), w, h)
    for p in build_prompts(profile, prep, [(q, regs, None) for q in questions]):
        yield {"question": p.question, "text": p.text, "regions_normalized": [list(n) for n in p.regions_normalized],
               "image_size": list(p.image_size)}


def _num(v):
    v = float(v)
    return int(v) if v.is_integer() else v


def add_arguments(p) -> None:
    p.add_argument("--profile", required=True, help="The profile: vlm3-depth, depthlm, vlm3-corr, vlm3-object, ... or a profile YAML path.")
    p.add_argument("--image", required=True, help="The image the points or regions belong to.")
    p.add_argument("--intrinsics", help="Intrinsics fx,fy,cx,cy in pixels (default: a JSON sidecar, else a 60 degree field of view).")
    p.add_argument("--points", help="Points 'x,y;x,y' in original-image pixels (point profiles).")
    p.add_argument("--regions", help="Boxes 'x1,y1,x2,y2;x1,y1,x2,y2' in original-image pixels (object profiles).")
    p.add_argument("--question", action="append", help="A question name (object profiles; repeatable), "
                                                       "e.g. small_predicate, distance_data, direction.")
    p.add_argument("--save-images", metavar="DIR", help="Write the image the engine is sent for each query as a PNG "
                                                        "into DIR (marked and resized; point profiles).")


def run(args) -> int:
    intr = parse_intrinsics_arg(args.intrinsics) if args.intrinsics else None
    if load_profile(args.profile).task == "object":
        if not args.regions:
            raise ValueError(f"profile {args.profile} asks about regions: pass --regions 'x1,y1,x2,y2;...' "
                             f"and --question NAME")
        qs = args.question or [load_profile(args.profile).default_question]
        for rec in object_prompt_records(args.profile, args.image, args.regions, qs, intr):
            print(json.dumps(rec, ensure_ascii=False))
        return 0
    if not args.points:
        raise ValueError(f"profile {args.profile} asks about points: pass --points 'x,y;x,y'")
    for rec in prompt_records(args.profile, args.image, parse_points(args.points), intr, args.save_images):
        print(json.dumps(rec, ensure_ascii=False))
    return 0
