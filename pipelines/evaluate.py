"""`densify eval ibims`: DepthLM-style evaluation at labelled points (delta_1, AbsRel, parse failures).

Works on the 12-image sample in shared/data/ibims1-sample and on the full iBims JSONL of the DepthLM
release: one JSON object per image with intrinsics, pixel_coords and metric depth.

`densify eval spatialrgpt`: SpatialRGPT-Bench (object questions, vlm3-object) with a rule-based scorer, per
category; with --geometry also the answers from dense depth. Layout and scoring: densify/eval/spatialrgpt.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from densify import outputs
from densify.images import read_jsonl_manifest
from pipelines.configs import DepthJobConfig, depth_overrides, load_job_config
from pipelines.depth import run_depth
from densify.eval.metrics import absrel, delta1

log = logging.getLogger("densify.eval")

DEFAULT_IBIMS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ibims1-sample" / "ibims1_sample.jsonl"


def evaluate_labels(jsonl: str | Path, cfg: DepthJobConfig, out_dir=None, *, engine=None, limit: int | None = None,
                    progress: bool = True) -> dict:
    """Ask the engine exactly the labelled pixels of every image; score the point answers."""
    sources = read_jsonl_manifest(Path(jsonl))
    if limit:
        sources = sources[:limit]
    for s in sources:
        if s.labels is None:
            raise ValueError(f"{jsonl}: image {s.path} has no pixel_coords/depth labels")
        s.extra["points"] = np.asarray(s.labels["pixels"], float)
    cfg = cfg.model_copy(update={"overwrite": True})
    summary = run_depth(sources, cfg, out_dir, engine=engine, progress=progress, keep_maps=True)
    preds, gts, per_image = [], [], []
    for r in summary.pop("_results"):
        if r.status != "ok":
            continue
        src = next(s for s in sources if s.id == r.id)
        lookup = {tuple(map(int, p)): v for p, v in zip(r.answers.pixels, r.answers.values)}
        pred = np.array([lookup.get(tuple(map(int, p)), np.nan) for p in src.labels["pixels"]])
        gt = np.asarray(src.labels["depth"], float)
        preds.append(pred)
        gts.append(gt)
        per_image.append({"id": r.id, "delta1": delta1(pred, gt), "absrel": absrel(pred, gt),
                          "answered": int(np.isfinite(pred).sum()), "labels": len(gt)})
    pred, gt = (np.concatenate(preds), np.concatenate(gts)) if preds else (np.array([]), np.array([]))
    report = {
        "data": str(jsonl), "profile": summary["profile"], "engine": summary["engine"],
        "images": summary["ok"], "failed_images": summary["failed_images"], "points": int(len(gt)),
        "answered": int(np.isfinite(pred).sum()),
        # as DepthLM reports it: over all labelled points; a failed answer counts as a miss
        "delta1": float(np.mean(np.where(np.isfinite(pred), np.maximum(pred / gt, gt / pred) < 1.25, False)))
        if len(gt) else float("nan"),
        "delta1_answered": delta1(pred, gt), "absrel_answered": absrel(pred, gt),
        "parse_failures": summary["answer_failures"], "wall_s": summary["wall_s"],
        "queries_per_s": summary["queries_per_s"], "per_image": per_image,
    }
    if out_dir is not None:
        outputs.write_json(Path(out_dir) / "eval.json", report)
    return report


def add_arguments(p) -> None:
    p.add_argument("suite", choices=["ibims", "spatialrgpt"], help="evaluation suite")
    p.add_argument("--data", default=None, help="ibims: DepthLM-format JSONL (default: the iBims sample); "
                                                "spatialrgpt: SpatialRGPT-Bench_v1.json (or JSONL)")
    p.add_argument("--images", help="spatialrgpt: folder the records' image_info.file_path is relative to "
                                    "(default: the data file's folder)")
    p.add_argument("--synthetic", metavar="SCENE_DIR", help="spatialrgpt: build the question set from a scene "
                                                            "folder written by `densify synth` and evaluate it")
    p.add_argument("--geometry", action="store_true", help="spatialrgpt: also answer from dense depth")
    p.add_argument("--depth-dir", help="spatialrgpt --geometry: depth maps as <dir>/<image stem>.depth.npy or "
                                       "<dir>/<image stem>/depth.npy (else densify's depth pipeline runs)")
    p.add_argument("--up", choices=["floor", "camera"], default="floor",
                   help="spatialrgpt --geometry: vertical from a fitted floor plane or the camera")
    p.add_argument("--profile", default=None, help="depth profile (default vlm3-depth)")
    p.add_argument("--engine", default=None, help="simulated | hf | vllm | openai | ray")
    p.add_argument("--model", help="checkpoint for the engine")
    p.add_argument("--config", help="pipeline YAML")
    p.add_argument("--limit", type=int, help="first N images only")
    p.add_argument("--out", help="write per-image outputs and eval.json here")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")


def _depth_for(args):
    """Depth maps for the geometry answers: saved ones (--depth-dir) or densify's depth pipeline, one image
    at a time (the one place this suite runs the depth pipeline)."""
    if args.depth_dir:
        root = Path(args.depth_dir)

        def saved(item, camera):
            for cand in (root / f"{item.image.stem}.depth.npy", root / item.image.stem / "depth.npy"):
                if cand.is_file():
                    return np.load(cand)
            log.warning("%s: no depth map in %s; no geometry answers for it", item.image, root)
            return None
        return saved
    over = depth_overrides(args)
    over["profile"] = "vlm3-depth"
    over.setdefault("outputs", {}).update({"npy": False, "png16": False, "preview": False, "ply": False,
                                           "answers": False, "confidence": False})
    cfg = load_job_config(DepthJobConfig, None, over, default_name="depth").model_copy(update={"overwrite": True})

    def computed(item, camera):
        from densify.images import ImageSource
        src = ImageSource(item.image.stem, item.image, [camera.fx, camera.fy, camera.cx, camera.cy])
        res = run_depth([src], cfg, None, progress=False, keep_maps=True)["_results"][0]
        return res.depth if res.status == "ok" else None
    return computed


def run_spatialrgpt(args) -> int:
    from densify import outputs as out_mod
    from densify.engines import create_engine
    from densify.eval.spatialrgpt import format_table, read_bench, run_bench
    from densify.profiles import load_profile

    if args.synthetic:
        from densify.synthetic.object_questions import build_question_set
        data = Path(args.synthetic) / "spatialrgpt_synthetic.json"
        build_question_set(args.synthetic, out=data)
    elif args.data:
        data = Path(args.data)
    else:
        raise ValueError("spatialrgpt needs --data PATH/TO/SpatialRGPT-Bench_v1.json (with --images FOLDER) or "
                         "--synthetic SCENE_DIR")
    items = read_bench(data, args.images)
    profile = load_profile(args.profile or "vlm3-object")
    options = dict(depth_overrides(args).get("engine", {}).get("options", {}))
    engine = create_engine(args.engine or "simulated", profile=profile, **options)
    try:
        truth_for = None
        if getattr(engine, "uses_truth", False):  # the simulator's truth, saved beside synthetic images
            from densify.synthetic.object_answers import saved_object_truth as truth_for
        rep = run_bench(items, profile, engine, depth_for=_depth_for(args) if args.geometry else None,
                        truth_for=truth_for, up=args.up, limit=args.limit)
    finally:
        engine.close()
    records = rep.pop("_records")
    rep["data"] = str(data)
    if args.out:
        out_mod.write_json(Path(args.out) / "eval.json", rep)
        out_mod.write_jsonl(Path(args.out) / "answers.jsonl", records)
    print(f"eval spatialrgpt ({rep['engine']} engine, {rep['profile']}): {rep['questions']} questions on "
          f"{rep['images']} images, unscorable references {rep['model']['unscorable']}, "
          f"failed questions {len(rep['failed_questions'])}")
    print(format_table(rep))
    return 1 if rep["failed_images"] else 0


def run(args) -> int:
    if args.suite == "spatialrgpt":
        return run_spatialrgpt(args)
    data = Path(args.data or DEFAULT_IBIMS)
    if not data.is_file():
        raise FileNotFoundError(f"{data}: no such JSONL; pass --data PATH/TO/ibims.jsonl")
    over = depth_overrides(args)
    over.setdefault("outputs", {}).update({"ply": False, "preview": False})
    over.setdefault("densify", {}).setdefault("method", "linear")  # scores are at the asked points
    cfg = load_job_config(DepthJobConfig, args.config, over, default_name="depth")
    rep = evaluate_labels(data, cfg, args.out, limit=args.limit)
    print(f"eval {args.suite} ({rep['engine']} engine, {rep['profile']}): {rep['images']} images, "
          f"{rep['points']} labelled points, answered {rep['answered']}")
    print(f"  delta_1 {rep['delta1']:.3f} (over answered: {rep['delta1_answered']:.3f}), "
          f"AbsRel {rep['absrel_answered']:.3f}, parse failures {rep['parse_failures'] or 'none'}, "
          f"{rep['queries_per_s']:.0f} q/s")
    return 1 if rep["failed_images"] else 0
