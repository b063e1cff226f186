"""`densify prompts`: print the exact prompt a profile sends for each point (one JSON object per line).

{"pixel": [x, y], "normalized": [u, v], "image_size": [w, h], "text": "..."}: pixel in the original image,
normalized the prompt coordinates (null for marker profiles), image_size after preprocessing.
"""

from __future__ import annotations

import json

from densify.cameras import parse_intrinsics_arg, prepare_image, resolve_camera
from densify.images import load_rgb
from densify.profiles import load_profile
from densify.prompts import render_text
from densify.queries import check_points, plan_queries


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
    rgb = load_rgb(image)
    h, w = rgb.shape[:2]
    cam = resolve_camera(image, w, h, intrinsics)
    p = profile.preprocess
    prep = prepare_image(rgb, cam, focal=p.focal, max_side=p.max_side, square_pixels=p.square_pixels,
                         coord_range=profile.coord_range, resample=p.resample)
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


def _num(v):
    v = float(v)
    return int(v) if v.is_integer() else v


def add_arguments(p) -> None:
    p.add_argument("--profile", required=True, help="vlm3-depth, depthlm, vlm3-corr, ... or a YAML path")
    p.add_argument("--image", required=True, help="the image the points belong to")
    p.add_argument("--intrinsics", help="fx,fy,cx,cy (else a JSON sidecar, else a default field of view)")
    p.add_argument("--points", required=True, help="'x,y;x,y' in original-image pixels")


def run(args) -> int:
    intr = parse_intrinsics_arg(args.intrinsics) if args.intrinsics else None
    for rec in prompt_records(args.profile, args.image, parse_points(args.points), intr):
        print(json.dumps(rec, ensure_ascii=False))
    return 0
