"""`densify ask`: object questions about regions of one image, asked to the object model and (with
--geometry) answered from a dense depth map, with their agreement. Prints one JSON document.

  densify ask IMAGE --regions "x1,y1,x2,y2;x1,y1,x2,y2" --question small_predicate --question distance_data
              [--mask a.png --mask b.png] [--engine simulated|hf|vllm|openai|ray] [--model CKPT]
              [--geometry [--depth depth.npy] [--up floor|camera]] [--out answers.json]

Boxes are original-image pixels. --geometry without --depth runs densify's depth stage on the image (the
depth profile's model on the same engine; --set depth.model=... for another checkpoint). The vertical comes from a floor plane fitted to the depth map
(--up floor, falling back to the camera's axes when none is found) or from the camera (--up camera); the
output says which.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from densify.config.loading import ConfigError
from densify.config.profiles import load_profile
from densify.io import outputs
from densify.io.cameras import decode
from densify.io.images import ImageSource
from densify.objects.qa import ask_records, build_prompts, geometry_context, image_batch, prepare_object_image
from densify.objects.questions import RegionError, make_regions, parse_regions, question_of
from densify.stages.depth import DepthStage
from densify.stages.engine import build_engine
from densify.stages.settings import DepthConfig
from pipelines import common

log = logging.getLogger("densify.ask")


def add_arguments(p) -> None:
    p.add_argument("image", help="The image the regions belong to.")
    p.add_argument("--regions", required=True, help="Boxes 'x1,y1,x2,y2;x1,y1,x2,y2' in original-image pixels.")
    p.add_argument("--question", action="append", required=True,
                   help="A question name (repeatable): the profile's SpatialRGPT-Bench categories, e.g. "
                        "small_predicate, left_choice, distance_data, height_data, direction.")
    p.add_argument("--mask", action="append", help="A mask image (or .npy) per region, the image's size, in order.")
    p.add_argument("--profile", default="vlm3-object", help="The object profile (default vlm3-object).")
    p.add_argument("--engine", help="The engine: vllm or hf (default: vllm when installed, else hf), openai, ray, "
                                    "or simulated (tests and demos: answers from ground truth).")
    p.add_argument("--model", help="The object checkpoint (default: the profile's model).")
    common.add_intrinsics_arg(p, "the image")
    p.add_argument("--geometry", action="store_true", help="Also answer from a dense depth map.")
    p.add_argument("--depth", help="With --geometry: a depth map (.npy, metres, the image's size) instead of "
                                   "running densify's depth stage.")
    p.add_argument("--up", choices=["floor", "camera"], default="floor",
                   help="The vertical from a fitted floor plane (default; falls back to the camera) or the camera.")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="Override a setting of the engine or the depth stage, e.g. --set engine.options.seed=3.")
    p.add_argument("--out", help="Also write the JSON document here.")


def _load_mask(path: str, k: int):
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--mask {path}: no such file (mask of region {k + 1})")
    if p.suffix == ".npy":
        return np.load(p)
    from PIL import Image
    with Image.open(p) as im:
        return np.asarray(im.convert("L")) > 127


def _given_depth(args, w: int, h: int):
    """The --depth map, checked against the image: a map of another size would be read at the wrong pixels."""
    if args.up != "floor" and not args.geometry:
        raise ConfigError(f"--up {args.up}: used only with --geometry; add --geometry or drop --up")
    if not args.depth:
        return None
    if not args.geometry:
        raise ConfigError(f"--depth {args.depth}: used only with --geometry (the geometry answers); add --geometry "
                          f"or drop --depth")
    try:
        depth = np.load(args.depth, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--depth {args.depth}: not a readable .npy depth map ({exc})") from None
    if depth.ndim == 3 and depth.shape[2] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2 or depth.shape != (h, w):
        raise ConfigError(f"--depth {args.depth}: a {'x'.join(map(str, depth.shape[::-1]))} map for a {w}x{h} image; "
                          f"give the depth map of this image at its size (metres, H x W)")
    if not np.issubdtype(depth.dtype, np.number):
        raise ConfigError(f"--depth {args.depth}: holds {depth.dtype} values, not depth in metres")
    return depth.astype(np.float32)


def run(args) -> int:
    profile = load_profile(args.profile)
    if profile.task != "object":
        raise ConfigError(f"--profile {args.profile} is a {profile.task} profile; densify ask needs an object "
                          f"profile (vlm3-object)")
    for q in args.question:
        question_of(profile, q)
    cfg = common.load(argparse.Namespace(engine=args.engine, set=args.set), DepthConfig, "depth")
    intr = common.intrinsics(args)
    img = decode(args.image, intr)
    rgb, cam = img.rgb, img.camera
    h, w = rgb.shape[:2]
    regions = make_regions(parse_regions(args.regions), w, h,
                           [_load_mask(m, k) for k, m in enumerate(args.mask)] if args.mask else None)
    prep = prepare_object_image(rgb, cam, profile)
    qs = []
    for q in args.question:
        n = profile.questions[q].regions or len(regions)
        if len(regions) < n:
            raise RegionError(f"--question {q} is about {n} regions but --regions gives {len(regions)}; add a box")
        qs.append((q, regions[:n], None))
    most = max(len(r) for _, r, _ in qs)
    if len(regions) > most:  # an extra box would be ignored without a word
        raise RegionError(f"--regions gives {len(regions)} boxes but --question {', '.join(args.question)} "
                          f"{'is' if len(args.question) == 1 else 'are'} about at most {most}; drop the extra box, "
                          f"or ask about it separately")
    depth = _given_depth(args, w, h)  # checked before any engine starts
    prompts = build_prompts(profile, prep, qs)
    sid = Path(args.image).stem
    with build_engine(cfg.engine, profile, model=args.model) as engine:
        _, completions = next(iter(engine.stream([image_batch(profile, prep, prompts, sid, path=args.image)])))
    ctx = None
    if args.geometry:
        if depth is not None:
            source = str(args.depth)
        else:
            with build_engine(cfg.engine, load_profile(cfg.profile), model=cfg.model) as deng:
                full = cfg.model_copy(update={"max_side": None})  # the map at the image's size, as the boxes
                res = DepthStage(full, deng, keep_maps=True).one(ImageSource(sid, Path(args.image)), intrinsics=intr)
            if res.status != "ok":
                raise ConfigError(f"{args.image}: the depth stage failed ({res.error}); pass a depth map with --depth")
            depth, source = res.depth, f"densify depth ({cfg.profile}, {cfg.engine.name} engine)"
        ctx = geometry_context(depth, cam, args.up, source)
    recs = ask_records(profile, prompts, completions, ctx)
    doc = {"image": str(args.image), "image_size": [w, h], "profile": profile.name, "engine": cfg.engine.name,
           "simulated": engine.simulated, "regions": [list(r.box) for r in regions], "answers": recs}
    if ctx is not None:
        doc["geometry"] = {"depth": ctx.source, "up": ctx.frame.source,
                           "up_vector_camera": [round(float(v), 4) for v in ctx.frame.up]}
        judged = [r["agree"] for r in recs if r.get("agree") is not None]
        doc["agreement"] = {"compared": len(judged), "agree": int(sum(judged))}
    print(json.dumps(doc, indent=1))
    if args.out:
        outputs.write_json(Path(args.out), doc)
    failed = [r["question"] for r in recs if r["model"]["failure"] is not None]
    if failed:  # done, but not every question got a usable answer: exit 1, as for failed images
        log.error("%d of %d question(s) got no usable answer from the model: %s", len(failed), len(recs),
                  ", ".join(failed))
    return 1 if failed else 0
