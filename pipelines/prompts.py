"""`densify prompts`: print the exact prompt a profile sends for each point (one JSON object per line).

{"pixel": [x, y], "normalized": [u, v], "image_size": [w, h], "text": "..."}: pixel in the original image,
normalized the prompt coordinates (null for marker profiles), image_size after preprocessing.
Object profiles (vlm3-object) take --regions and --question instead of --points and print
{"question": ..., "text": "...", "regions_normalized": [[x1, y1, x2, y2], ...], "image_size": [w, h]}.
"""

from __future__ import annotations

import json

from densify.config.profiles import load_profile
from densify.io.cameras import decode, parse_intrinsics_arg, prepare_for
from densify.queries.plan import check_points, plan_queries
from densify.queries.prompts import render_text


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


def prompt_records(profile_name: str, image, points, intrinsics=None):
    profile = load_profile(profile_name)
    img = decode(image, intrinsics)
    h, w = img.rgb.shape[:2]
    prep = prepare_for(img.rgb, img.camera, profile)
    pts = check_points(points, w, h, "--points")
    plan = plan_queries(pts, prep.pixel_map, dedupe=False)
    coord_names = ("x1", "y1") if profile.images_per_query == 2 else ("x", "y")
    for i, (x, y) in enumerate(plan.pixels):
        if plan.prompt_xy is not None:
            u, v = (int(c) for c in plan.prompt_xy[i])
            text = render_text(profile, **{coord_names[0]: u, coord_names[1]: v})
            norm = [u, v]
        else:
            text, norm = render_text(profile), None
        yield {"pixel": [_num(x), _num(y)], "normalized": norm, "image_size": list(prep.pixel_map.pre_size),
               "text": text}


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
    for rec in prompt_records(args.profile, args.image, parse_points(args.points), intr):
        print(json.dumps(rec, ensure_ascii=False))
    return 0
