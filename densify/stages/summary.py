"""A depth run as a whole: the depth stage over a list of images, and the run's summary (counts, failures
by kind, answer failures, throughput, mean metrics), written even when the run is interrupted."""

from __future__ import annotations

import logging
import time

import numpy as np

from densify.config.profiles import Profile, load_profile
from densify.engines import Engine
from densify.io import outputs
from densify.io.images import ImageSource
from densify.io.layout import RunLayout
from densify.stages.depth import DepthStage
from densify.stages.settings import DepthConfig
from densify.stages.transform import DepthResult

log = logging.getLogger("densify.depth")

__all__ = ["run_depth", "summarize"]


def _count(pairs) -> dict[str, int]:
    out: dict[str, int] = {}
    for k, v in pairs:
        out[k] = out.get(k, 0) + v
    return out


def _mean_metrics(results: list[DepthResult]) -> dict:
    agg = {}
    metrics = [r.metrics for r in results if r.metrics]
    for key in sorted({k for m in metrics for k in m}):
        vals = [m[key] for m in metrics if key in m]
        agg[key] = {k: float(np.nanmean([v[k] for v in vals])) for k in vals[0] if k != "n"}
    return agg


def summarize(results: list[DepthResult], wall: float, profile: Profile, cfg: DepthConfig, **extra) -> dict:
    """A run's summary: counts, failures by kind, answer failures, throughput, mean metrics."""
    asked = [r for r in results if r.status != "skipped"]  # skipped images were answered in an earlier run
    q = sum(r.queries for r in asked)
    fails = _count((k, v) for r in asked for k, v in r.failures.items())
    kinds = _count((r.error_kind or "error", 1) for r in results if r.status == "failed")
    return {
        "profile": profile.name, "engine": cfg.engine.name,
        "model": None if extra.get("simulated") else cfg.model or profile.model, "images": len(results),
        "ok": sum(r.status == "ok" for r in results),
        "skipped": sum(r.status == "skipped" for r in results),
        "failed": sum(r.status == "failed" for r in results), "failed_by_kind": kinds,
        "failed_images": [{"id": r.id, "image": r.image, "kind": r.error_kind, "error": r.error}
                          for r in results if r.status == "failed"][:1000],
        "queries": q, "answer_failures": fails,  # unmarkable points were never asked: not in the rate
        "answer_failure_rate": sum(v for k, v in fails.items() if k != "unmarkable") / q if q else 0.0,
        "wall_s": wall, "queries_per_s": q / wall if wall > 0 else 0.0, "metrics": _mean_metrics(results), **extra,
    }


def run_depth(sources: list[ImageSource], cfg: DepthConfig, engine: Engine, layout: RunLayout | None, *,
              intrinsics=None, points=None, keep_maps: bool = False, evaluate=None, progress=None,
              **summary_extra) -> tuple[dict, list[DepthResult]]:
    """The depth stage over a list of images as one run: results in input order and the run's summary,
    written (summary.json, failures.jsonl) even when the run is interrupted or stops on an error, which the
    summary then says."""
    profile = load_profile(cfg.profile)
    if layout is not None:
        layout.sweep(layout.summary, layout.failures)  # what a killed run's last writes left
    on_round = (lambda n: progress.update(images=0, queries=n)) if progress is not None else None
    stage = DepthStage(cfg, engine, layout=layout, keep_maps=keep_maps, evaluate=evaluate, on_round=on_round)
    results: dict[str, DepthResult] = {}
    t0 = time.perf_counter()
    interrupted, error = False, None
    stream = stage.run(sources, intrinsics=intrinsics, points=points)
    try:
        for r in stream:
            results[r.id] = r
            if progress is not None:
                progress.update(failed=int(r.status == "failed"))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the only way a run is interrupted
        interrupted = True
        raise
    except BaseException as exc:  # the run stopped on an error: the summary says which, not "interrupted"
        error = f"{type(exc).__name__}: {exc}"[:500]
        raise
    finally:
        stream.close()  # in-flight work is cancelled here, while the caller's engine is still up
        if progress is not None:
            progress.close()
        ordered = [results[s.id] for s in sources if s.id in results]
        summary = summarize(ordered, time.perf_counter() - t0, profile, cfg, simulated=engine.simulated,
                            interrupted=interrupted, complete=error is None and not interrupted
                            and len(ordered) == len(sources), **({"error": error} if error else {}), **summary_extra)
        if layout is not None and layout.root.is_dir():
            _write_summary(layout, summary, ordered, stopped=interrupted or error is not None)
    return summary, ordered


def _write_summary(layout: RunLayout, summary: dict, results: list[DepthResult], *, stopped: bool) -> None:
    """summary.json and failures.jsonl; when the run stopped on its own error, that error wins over one here."""
    try:
        outputs.write_json(layout.summary, summary)
        outputs.write_jsonl(layout.failures, ({"id": r.id, "image": r.image, "kind": r.error_kind, "error": r.error}
                                              for r in results if r.status == "failed"))
    except OSError as exc:
        if not stopped:
            raise
        log.error("could not write the run's summary: %s", exc)
