"""`densify eval ibims|spatialrgpt`: score an engine on labelled data.

ibims: DepthLM-style evaluation at labelled points (delta_1, AbsRel, parse failures), on the 12-image
sample in shared/data/ibims1-sample or the full iBims JSONL of the DepthLM release (one JSON object per
image with intrinsics, pixel_coords and metric depth).
spatialrgpt: SpatialRGPT-Bench questions about image regions asked of an object profile (vlm3-object),
scored by rule (qualitative accuracy, quantitative success within 25% and AbsRel, per category); with
--geometry the same questions answered from dense depth too.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

import numpy as np

from densify.config.loading import ConfigError, Override
from densify.config.profiles import load_profile
from densify.eval.labels import label_report, label_sources
from densify.io import outputs
from densify.io.layout import RunLayout
from densify.stages.engine import build_engine
from densify.stages.settings import DepthConfig
from densify.stages.summary import run_depth
from pipelines import common

log = logging.getLogger("densify.eval")

DEFAULT_IBIMS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ibims1-sample" / "ibims1_sample.jsonl"


def add_arguments(p) -> None:
    p.add_argument("suite", choices=["ibims", "spatialrgpt"],
                   help="The suite: ibims (labelled depth points) or spatialrgpt (object questions).")
    p.add_argument("--data", help="The data: for ibims a DepthLM-format JSONL (default: the iBims-1 sample in "
                                  "../shared/data); for spatialrgpt SpatialRGPT-Bench_v1.json (or JSONL).")
    p.add_argument("--images", help="For spatialrgpt, the folder the records' image_info.file_path is relative to "
                                    "(default: the data file's folder).")
    p.add_argument("--synthetic", metavar="SCENE_DIR", help="For spatialrgpt, build the question set from a scene "
                                                            "folder written by `densify synth` and score it.")
    p.add_argument("--geometry", action="store_true", help="For spatialrgpt, also answer every question from dense "
                                                           "depth.")
    p.add_argument("--depth-dir", help="For spatialrgpt --geometry, depth maps as <dir>/<image stem>.depth.npy or "
                                       "<dir>/<image stem>/depth.npy (default: densify's depth stage runs).")
    p.add_argument("--up", choices=["floor", "camera"], default="floor",
                   help="For spatialrgpt --geometry, the vertical from a fitted floor plane (default) or the camera.")
    common.add_engine_args(p)
    p.add_argument("--limit", type=int, help="Score the first N images (ibims) or questions (spatialrgpt) only.")
    p.add_argument("--out", help="Write eval.json (and per-image outputs or answers) here (default: nothing written).")
    common.add_config_args(p, "depth")


_SPATIALRGPT_ONLY = ("synthetic", "images", "geometry", "depth_dir")


def run(args) -> int:
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: give a positive number")
    if args.suite == "spatialrgpt" and args.synthetic and args.data:
        raise ConfigError(f"--synthetic {args.synthetic} and --data {args.data} both give the questions; give one")
    if args.suite == "ibims":
        given = [f"--{k.replace('_', '-')}" for k in _SPATIALRGPT_ONLY if getattr(args, k)]
        if given:
            raise ConfigError(f"{', '.join(given)}: only for `densify eval spatialrgpt`; drop it for ibims")
    if args.up != "floor" and not args.geometry:
        raise ConfigError(f"--up {args.up}: only with --geometry (the vertical of the geometry answers)")
    if args.out:
        RunLayout(args.out).check()
    with RunLayout(args.out).lock() if args.out else contextlib.nullcontext():
        return run_spatialrgpt(args) if args.suite == "spatialrgpt" else run_ibims(args)


def run_ibims(args) -> int:
    data = Path(args.data or DEFAULT_IBIMS)
    if not data.is_file():
        raise ConfigError(f"--data {data}: no such file; pass --data PATH/TO/ibims.jsonl")
    # Scores are at the asked points: no previews or clouds, and the fast densifier.
    extra = [Override(("outputs", "ply"), False, "eval"), Override(("outputs", "preview"), False, "eval"),
             Override(("densify", "method"), "linear", "eval")]
    cfg = common.load(args, DepthConfig, "depth", extra)
    layout = RunLayout(args.out) if args.out else None
    sources = label_sources(data, args.limit)
    engine = build_engine(cfg.engine, load_profile(cfg.profile), model=cfg.model)
    try:
        if layout is not None:
            common.write_config(layout, cfg)
        # every image is asked exactly its labelled pixels, and asked again on a rerun
        summary, results = run_depth(sources, cfg.model_copy(update={"overwrite": True}), engine, layout,
                                     keep_maps=True, progress=common.progress(len(sources)))
    finally:
        engine.close()
    rep = label_report(summary, results, sources, data=str(data))
    if layout is not None:
        layout.sweep(layout.eval)
        outputs.write_json(layout.eval, rep)
    c = common.report(rep)
    c.print(f"eval {args.suite} ({rep['engine']} engine, {rep['profile']}, model {common.esc(rep['model'])}): {rep['images']} "
            f"images, {rep['points']} labelled points, answered {rep['answered']}")
    c.print(f"  delta_1 {rep['delta1']:.3f} (over answered: {rep['delta1_answered']:.3f}), AbsRel "
            f"{rep['absrel_answered']:.3f}, parse failures {common.esc(rep['parse_failures'] or 'none')}, "
            f"{rep['queries_per_s']:.0f} q/s")
    for f in rep["failed_images"][:10]:
        c.print(f"  [red]failed[/] {common.esc(f['id'])} ({common.esc(f['kind'])}): {common.esc(f['error'])}")
    if args.out:
        c.print(common.written(args.out, ["eval.json", "summary.json", "failures.jsonl", "config.yaml"]))
    return 1 if rep["failed_images"] else 0


def _depth_for(args, cfg: DepthConfig):
    """Depth maps for the geometry answers: saved ones (--depth-dir), or densify's depth stage."""
    if args.depth_dir:
        root = Path(args.depth_dir)

        def saved(item, camera):
            for cand in (root / f"{item.image.stem}.depth.npy", root / item.image.stem / "depth.npy"):
                if cand.is_file():
                    return np.load(cand)
            log.warning("%s: no depth map in %s; no geometry answers for it", item.image, root)
            return None
        return saved, None
    from densify.io.images import ImageSource
    from densify.stages.depth import DepthStage

    engine = build_engine(cfg.engine, load_profile(cfg.profile), model=cfg.model)
    stage = DepthStage(cfg, engine, keep_maps=True)

    def computed(item, camera):
        src = ImageSource(item.image.stem, item.image, [camera.fx, camera.fy, camera.cx, camera.cy])
        res = stage.one(src)
        return res.depth if res.status == "ok" else None
    return computed, engine


def run_spatialrgpt(args) -> int:
    from densify.eval.spatialrgpt import bench_images, format_table, read_bench, run_bench

    if args.synthetic:
        from densify.synthetic.object_questions import build_question_set
        data = Path(args.synthetic) / "spatialrgpt_synthetic.json"
        build_question_set(args.synthetic, out=data)
    elif args.data:
        data = Path(args.data)
    else:
        raise ConfigError("spatialrgpt needs --data PATH/TO/SpatialRGPT-Bench_v1.json (with --images FOLDER) or "
                          "--synthetic SCENE_DIR")
    items = read_bench(data, args.images)
    profile = load_profile(args.profile or "vlm3-object")
    if profile.task != "object":
        raise ConfigError(f"--profile {profile.name}: a {profile.task} profile; spatialrgpt needs vlm3-object")
    # The depth stage's settings; the object model is the same engine with the object profile's checkpoint.
    dcfg = common.load(argparse.Namespace(engine=args.engine, config=args.config, set=args.set), DepthConfig, "depth")
    engine = build_engine(dcfg.engine, profile, model=args.model)
    depth_engine = None
    try:
        depth_for = None
        if args.geometry:
            depth_for, depth_engine = _depth_for(args, dcfg)
        rep = run_bench(items, profile, engine, depth_for=depth_for, up=args.up, limit=args.limit,
                        progress=common.progress(bench_images(items, args.limit)))
    finally:
        engine.close()
        if depth_engine is not None:
            depth_engine.close()
    records = rep.pop("_records")
    rep["data"] = str(data)
    rep["simulated"] = engine.simulated
    if args.out:
        common.write_config(RunLayout(args.out), dcfg)
        RunLayout(args.out).sweep(Path(args.out) / "eval.json", Path(args.out) / "answers.jsonl")
        outputs.write_json(Path(args.out) / "eval.json", rep)
        outputs.write_jsonl(Path(args.out) / "answers.jsonl", records)
    c = common.report(rep)
    c.print(f"eval spatialrgpt ({rep['engine']} engine, {rep['profile']}): {rep['questions']} questions on "
            f"{rep['images']} images, unscorable references {rep['model']['unscorable']}, "
            f"failed questions {len(rep['failed_questions'])}")
    c.print(common.esc(format_table(rep)))
    if args.out:
        c.print(common.written(args.out, ["eval.json", "answers.jsonl", "config.yaml"]))
    return 1 if rep["failed_images"] else 0
