"""Scoring at labelled points, as DepthLM reports it (delta_1 over all labels; a missing answer counts as a
miss), on DepthLM-format JSONL data (iBims-1 and the others of the DepthLM release). Pure functions: the
depth stage runs the images (`densify eval ibims` asks exactly the labelled pixels), these score them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from densify.eval.metrics import absrel, delta1, depth_report
from densify.io.images import ImageError, ImageSource, read_jsonl_manifest

__all__ = ["answers_at", "label_metrics", "label_report", "label_sources", "score_points"]


def label_sources(jsonl: str | Path, limit: int | None = None) -> list[ImageSource]:
    """The records of a DepthLM JSONL, each asked exactly its labelled pixels."""
    sources = read_jsonl_manifest(Path(jsonl))[:limit] if limit else read_jsonl_manifest(Path(jsonl))
    for s in sources:
        if s.labels is None:
            raise ImageError(f"{jsonl}: image {s.path} has no pixel_coords/depth labels; every record of an "
                             f"evaluation file needs them")
        s.extra["points"] = np.asarray(s.labels["pixels"], float)
    return sources


def answers_at(answers, pixels: np.ndarray, *, nearest: bool) -> np.ndarray:
    """The answered value at each pixel (NaN where none was asked): answers are matched by integer pixel,
    rounded to the nearest (`nearest`) or truncated."""
    key = (lambda p: tuple(map(int, np.round(p)))) if nearest else (lambda p: tuple(map(int, p)))
    lookup = {key(p): v for p, v in zip(answers.pixels, answers.values)}
    return np.array([lookup.get(key(p), np.nan) for p in pixels])


def label_metrics(labels: dict | None, depth: np.ndarray | None, answers=None, scale: float = 1.0) -> dict:
    """Scores of a dense map (and of its point answers) at an image's labelled points, which the engine
    never sees. labels: {"pixels": Nx2 file pixels, "depth": N}; scale: decoded pixels per file pixel."""
    if labels is None or depth is None:
        return {}
    lp = np.asarray(labels["pixels"], float).reshape(-1, 2) * scale
    gt = np.asarray(labels["depth"], float)
    h, w = depth.shape
    xi = np.clip(np.round(lp[:, 0]).astype(int), 0, w - 1)
    yi = np.clip(np.round(lp[:, 1]).astype(int), 0, h - 1)
    out = {"labels_dense": depth_report(depth[yi, xi], gt)}
    if answers is not None:
        pred = answers_at(answers, lp, nearest=True)
        if np.isfinite(pred).any():
            out["labels_points"] = {"delta1": delta1(pred, gt), "n": int(np.isfinite(pred).sum())}
    return out


def score_points(labels: dict, answers, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(answer, label) per labelled point of an image asked exactly its labelled pixels (NaN: no answer)."""
    asked = np.asarray(labels["pixels"], float).reshape(-1, 2) * scale  # the decoded image's pixels
    return answers_at(answers, asked, nearest=False), np.asarray(labels["depth"], float)


def label_report(summary: dict, results, sources: list[ImageSource], *, data: str = "") -> dict:
    """The evaluation report of a depth run over labelled images: `summary` and `results` (the run's
    per-image results with their answers kept) as the depth stage gives them."""
    by_id = {s.id: s for s in sources}
    preds, gts, per_image = [], [], []
    for r in results:
        if r.status != "ok":
            continue
        pred, gt = score_points(by_id[r.id].labels, r.answers, r.scale)
        preds.append(pred)
        gts.append(gt)
        per_image.append({"id": r.id, "delta1": delta1(pred, gt), "absrel": absrel(pred, gt),
                          "answered": int(np.isfinite(pred).sum()), "labels": len(gt)})
    pred, gt = (np.concatenate(preds), np.concatenate(gts)) if preds else (np.array([]), np.array([]))
    return {
        "data": str(data), "profile": summary["profile"], "engine": summary["engine"], "model": summary["model"],
        "simulated": summary["simulated"], "images": summary["ok"], "failed_images": summary["failed_images"],
        "points": int(len(gt)), "answered": int(np.isfinite(pred).sum()),
        "delta1": float(np.mean(np.where(np.isfinite(pred), np.maximum(pred / gt, gt / pred) < 1.25, False)))
        if len(gt) else float("nan"),
        "delta1_answered": delta1(pred, gt), "absrel_answered": absrel(pred, gt),
        "parse_failures": summary["answer_failures"], "wall_s": summary["wall_s"],
        "queries_per_s": summary["queries_per_s"], "per_image": per_image,
    }
