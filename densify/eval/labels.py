"""Scoring an engine at labelled points, as DepthLM reports it (delta_1 over all labels; a missing answer
counts as a miss), on DepthLM-format JSONL data (iBims-1 and the others of the DepthLM release)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from densify.engines import Engine
from densify.eval.metrics import absrel, delta1
from densify.io import outputs
from densify.io.images import ImageError, ImageSource, read_jsonl_manifest
from densify.io.layout import RunLayout
from densify.stages.depth import run_depth
from densify.stages.settings import DepthConfig

__all__ = ["evaluate_labels", "label_sources"]


def label_sources(jsonl: str | Path, limit: int | None = None) -> list[ImageSource]:
    """The records of a DepthLM JSONL, each asked exactly its labelled pixels."""
    sources = read_jsonl_manifest(Path(jsonl))[:limit] if limit else read_jsonl_manifest(Path(jsonl))
    for s in sources:
        if s.labels is None:
            raise ImageError(f"{jsonl}: image {s.path} has no pixel_coords/depth labels; every record of an "
                             f"evaluation file needs them")
        s.extra["points"] = np.asarray(s.labels["pixels"], float)
    return sources


def evaluate_labels(sources: list[ImageSource], cfg: DepthConfig, engine: Engine, layout: RunLayout | None = None,
                    *, data: str = "", progress=None) -> dict:
    """Ask the engine exactly the labelled pixels of every image; score the point answers."""
    cfg = cfg.model_copy(update={"overwrite": True})
    summary, results = run_depth(sources, cfg, engine, layout, keep_maps=True, progress=progress)
    by_id = {s.id: s for s in sources}
    preds, gts, per_image = [], [], []
    for r in results:
        if r.status != "ok":
            continue
        src = by_id[r.id]
        lookup = {tuple(map(int, p)): v for p, v in zip(r.answers.pixels, r.answers.values)}
        asked = np.asarray(src.labels["pixels"], float).reshape(-1, 2) * r.scale  # the decoded image's pixels
        pred = np.array([lookup.get(tuple(map(int, p)), np.nan) for p in asked])
        gt = np.asarray(src.labels["depth"], float)
        preds.append(pred)
        gts.append(gt)
        per_image.append({"id": r.id, "delta1": delta1(pred, gt), "absrel": absrel(pred, gt),
                          "answered": int(np.isfinite(pred).sum()), "labels": len(gt)})
    pred, gt = (np.concatenate(preds), np.concatenate(gts)) if preds else (np.array([]), np.array([]))
    report = {
        "data": str(data), "profile": summary["profile"], "engine": summary["engine"], "model": summary["model"],
        "simulated": summary["simulated"], "images": summary["ok"], "failed_images": summary["failed_images"],
        "points": int(len(gt)), "answered": int(np.isfinite(pred).sum()),
        "delta1": float(np.mean(np.where(np.isfinite(pred), np.maximum(pred / gt, gt / pred) < 1.25, False)))
        if len(gt) else float("nan"),
        "delta1_answered": delta1(pred, gt), "absrel_answered": absrel(pred, gt),
        "parse_failures": summary["answer_failures"], "wall_s": summary["wall_s"],
        "queries_per_s": summary["queries_per_s"], "per_image": per_image,
    }
    if layout is not None:
        layout.sweep(layout.eval)
        outputs.write_json(layout.eval, report)
    return report
