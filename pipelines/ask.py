"""`densify ask`: object questions about regions of one image, asked to the object model and (with
--geometry) answered from a dense depth map, with their agreement. Prints one JSON document.

  densify ask IMAGE --regions "x1,y1,x2,y2;x1,y1,x2,y2" --question small_predicate --question distance_data
              [--mask a.png --mask b.png] [--engine simulated|hf|vllm|openai|ray] [--model CKPT]
              [--geometry [--depth depth.npy] [--up floor|camera]] [--out answers.json]

Boxes are original-image pixels. --geometry without --depth runs densify's depth pipeline on the image
(--depth-profile, --depth-engine). The vertical comes from a floor plane fitted to the depth map
(--up floor, falling back to the camera's axes when none is found) or from the camera (--up camera); the
output says which.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from densify import outputs
from densify.cameras import parse_intrinsics_arg, resolve_camera
from densify.config import parse_set_options
from densify.engines import create_engine, generate_stream
from densify.images import load_rgb
from densify.object_qa import ask_records, build_prompts, geometry_context, image_batch, prepare_object_image
from densify.objects import RegionError, make_regions, parse_regions, question_of
from densify.profiles import load_profile

log = logging.getLogger("densify.ask")


def add_arguments(p) -> None:
    p.add_argument("image", help="the image the regions belong to")
    p.add_argument("--regions", required=True, help="'x1,y1,x2,y2;x1,y1,x2,y2' boxes in original-image pixels")
    p.add_argument("--question", action="append", required=True,
                   help="question name (repeatable): the profile's SpatialRGPT-Bench categories, e.g. "
                        "small_predicate, left_choice, distance_data, height_data, direction")
    p.add_argument("--mask", action="append", help="a mask image (or .npy) per region, original size, in order")
    p.add_argument("--profile", default="vlm3-object", help="object profile (default vlm3-object)")
    p.add_argument("--engine", default="simulated", help="simulated | hf | vllm | openai | ray")
    p.add_argument("--model", help="checkpoint for the engine")
    p.add_argument("--intrinsics", help="fx,fy,cx,cy (else a JSON sidecar, else a default field of view)")
    p.add_argument("--geometry", action="store_true", help="also answer from a dense depth map")
    p.add_argument("--depth", help="with --geometry: a depth map (.npy, metres, the image's size) instead of "
                                   "running densify's depth pipeline")
    p.add_argument("--up", choices=["floor", "camera"], default="floor",
                   help="vertical from a fitted floor plane (default; falls back to the camera) or the camera")
    p.add_argument("--depth-profile", default="vlm3-depth", help="with --geometry: depth profile to densify with")
    p.add_argument("--depth-engine", help="with --geometry: engine for depth (default: --engine)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="engine options, e.g. engine.seed=3")
    p.add_argument("--out", help="also write the JSON here")


def _load_mask(path: str, k: int):
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--mask {path}: no such file (mask of region {k + 1})")
    if p.suffix == ".npy":
        return np.load(p)
    from PIL import Image
    with Image.open(p) as im:
        return np.asarray(im.convert("L")) > 127


def _pipeline_depth(image: str, intrinsics, profile: str, engine: str, options: dict) -> np.ndarray:
    """Densify's depth map for the image. The one place this command runs the depth pipeline (the
    restructure replaces it with the library depth stage)."""
    from densify.images import discover
    from pipelines.configs import DepthJobConfig
    from pipelines.depth import run_depth

    cfg = DepthJobConfig(profile=profile, engine={"name": engine, "options": options},
                         outputs={"npy": False, "png16": False, "preview": False, "ply": False, "answers": False,
                                  "confidence": False}, overwrite=True)
    summary = run_depth(discover([image]), cfg, None, progress=False, intrinsics=intrinsics, keep_maps=True)
    res = summary["_results"][0]
    if res.status != "ok" or res.depth is None:
        raise ValueError(f"{image}: the depth pipeline failed ({res.error}); pass a depth map with --depth")
    return res.depth


def run(args) -> int:
    profile = load_profile(args.profile)
    if profile.task != "object":
        raise ValueError(f"--profile {args.profile} is a {profile.task} profile; densify ask needs an object "
                         f"profile (vlm3-object)")
    for q in args.question:
        question_of(profile, q)
    rgb = load_rgb(args.image)
    h, w = rgb.shape[:2]
    intr = parse_intrinsics_arg(args.intrinsics) if args.intrinsics else None
    cam = resolve_camera(args.image, w, h, intr)
    boxes = parse_regions(args.regions)
    masks = [_load_mask(m, k) for k, m in enumerate(args.mask)] if args.mask else None
    regions = make_regions(boxes, w, h, masks)
    prep = prepare_object_image(rgb, cam, profile)
    qs = []
    for q in args.question:
        n = profile.questions[q].regions or len(regions)
        if len(regions) < n:
            raise RegionError(f"--question {q} is about {n} regions but --regions gives {len(regions)}; "
                              f"add a box")
        qs.append((q, regions[:n], None))
    prompts = build_prompts(profile, prep, qs)

    over = parse_set_options(args.set).get("engine", {})
    options = dict(over.get("options", over))
    if args.model:
        options["model"] = args.model
    engine = create_engine(args.engine, profile=profile, **options)
    try:
        truth = None
        if getattr(engine, "uses_truth", False):  # the simulator's truth, saved beside a synthetic image
            from densify.synthetic.object_answers import saved_object_truth
            truth = saved_object_truth(Path(args.image), prep)
        batch = image_batch(profile, prep, prompts, str(args.image), truth=truth)
        _, completions = next(iter(generate_stream(engine, [batch])))
    finally:
        engine.close()

    ctx = None
    if args.geometry:
        if args.depth:
            depth, source = np.load(args.depth), str(args.depth)
        else:
            depth = _pipeline_depth(args.image, intr, args.depth_profile, args.depth_engine or args.engine,
                                    {k: v for k, v in options.items() if k != "model"})
            source = f"densify depth ({args.depth_profile}, {args.depth_engine or args.engine} engine)"
        ctx = geometry_context(depth, cam, args.up, source)
    recs = ask_records(profile, prompts, completions, ctx)
    doc = {"image": str(args.image), "image_size": [w, h], "profile": profile.name, "engine": args.engine,
           "regions": [list(r.box) for r in regions], "answers": recs}
    if ctx is not None:
        doc["geometry"] = {"depth": ctx.source, "up": ctx.frame.source,
                           "up_vector_camera": [round(float(v), 4) for v in ctx.frame.up]}
        judged = [r["agree"] for r in recs if r.get("agree") is not None]
        doc["agreement"] = {"compared": len(judged), "agree": int(sum(judged))}
    print(json.dumps(doc, indent=1))
    if args.out:
        outputs.write_json(Path(args.out), doc)
    return 0
