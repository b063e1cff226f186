"""`densify eval ibims`: DepthLM-style evaluation at labelled points (delta_1, AbsRel, parse failures).

Works on the 12-image sample in shared/data/ibims1-sample and on the full iBims JSONL of the DepthLM
release: one JSON object per image with intrinsics, pixel_coords and metric depth.
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
    p.add_argument("suite", choices=["ibims"], help="evaluation suite")
    p.add_argument("--data", default=str(DEFAULT_IBIMS), help="DepthLM-format JSONL (default: the iBims sample)")
    p.add_argument("--profile", default=None, help="depth profile (default vlm3-depth)")
    p.add_argument("--engine", default=None, help="simulated | hf | vllm | openai | ray")
    p.add_argument("--model", help="checkpoint for the engine")
    p.add_argument("--config", help="pipeline YAML")
    p.add_argument("--limit", type=int, help="first N images only")
    p.add_argument("--out", help="write per-image outputs and eval.json here")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")


def run(args) -> int:
    data = Path(args.data)
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
