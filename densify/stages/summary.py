"""A depth run as a whole: the depth stage over a list of images, and the run's summary (counts, failures
by kind, answer failures, throughput, queries per image and why plans stopped, mean metrics, the forcing
audit, the engines' busy share where they count it, when the first and last maps came out), written even
when the run is interrupted."""

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

__all__ = ["run_depth", "summarize", "engine_busy", "timeline"]


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


def _plans(results: list[DepthResult], cfg: DepthConfig) -> dict:
    """Queries per image and why the images' plans stopped (adaptive: shared, precise, cap, ...)."""
    done = [r for r in results if r.status == "ok"]
    per_image = [r.queries for r in done]
    stops = _count((r.plan.get("stop", r.plan.get("mode", "?")), 1) for r in done if r.plan)
    return {"count": cfg.plan.count, "mode": cfg.plan.mode, "stops": stops,
            "queries_per_image": ({"mean": float(np.mean(per_image)), "min": int(min(per_image)),
                                   "max": int(max(per_image))} if per_image else None)}


def timeline(finished: list[float]) -> dict | None:
    """When the maps came out, in seconds from the run's start: the first (what a user waits for; it carries
    the engines' first requests) and the last. No steady rate: images in flight progress together, so the gaps
    between maps understate it until a run is many times longer than `images_in_flight`; wall / maps of a long
    run gives it."""
    if not finished:
        return None
    return {"maps": len(finished), "first_map_s": round(min(finished), 3), "last_map_s": round(max(finished), 3)}


def summarize(results: list[DepthResult], wall: float, profile: Profile, cfg: DepthConfig, **extra) -> dict:
    """A run's summary: counts, failures by kind, answer failures, throughput, mean metrics."""
    asked = [r for r in results if r.status != "skipped"]  # skipped images were answered in an earlier run
    q = sum(r.queries for r in asked)
    fails = _count((k, v) for r in asked for k, v in r.failures.items())
    kinds = _count((r.error_kind or "error", 1) for r in results if r.status == "failed")
    return {
        "profile": profile.name, "engine": cfg.engine.name, "plan": _plans(asked, cfg),
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
    finished: list[float] = []  # seconds from the start at which each asked image's map came out
    busy0 = engine_busy(engine)
    t0, started = time.perf_counter(), time.time()
    interrupted, error = False, None
    stream = stage.run(sources, intrinsics=intrinsics, points=points)
    try:
        for r in stream:
            results[r.id] = r
            if r.status == "ok":
                finished.append(time.perf_counter() - t0)
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
        if (interrupted or error) and layout is not None:
            _count_certified(sources, results, layout, stage.fingerprint, started)
        ordered = [results[s.id] for s in sources if s.id in results]
        summary_extra["timeline"] = timeline(finished)
        if stage.forcing is not None:
            summary_extra["forcing"] = stage.forcing.report()
        busy1 = engine_busy(engine) if busy0 is not None and not interrupted and not error else None
        if busy1 is not None:
            busy, wall = busy1[0] - busy0[0], time.perf_counter() - t0
            summary_extra["engine_busy"] = {"engines": busy1[1], "busy_s": round(busy, 3),
                                            "share": round(busy / max(wall * busy1[1], 1e-9), 4)}
        summary = summarize(ordered, time.perf_counter() - t0, profile, cfg, simulated=engine.simulated,
                            interrupted=interrupted, complete=error is None and not interrupted
                            and len(ordered) == len(sources), **({"error": error} if error else {}), **summary_extra)
        if layout is not None and layout.root.is_dir():
            _write_summary(layout, summary, ordered, stopped=interrupted or error is not None)
    return summary, ordered


def engine_busy(engine: Engine) -> tuple[float, int] | None:
    """(seconds the engines had work, engines) where they count it (paced simulated engines, in this process
    or in a Ray pool); None otherwise (a GPU's busy share is NVML's, benchmarks/depth_bench.py)."""
    stats = engine.engine_stats() if hasattr(engine, "engine_stats") else [dict(getattr(engine, "stats", {}) or {})]
    busy = [s["busy_s"] for s in stats if "busy_s" in s]
    return (float(sum(busy)), len(busy)) if busy else None


def _count_certified(sources, results: dict, layout: RunLayout, fp: str, since: float) -> None:
    """An interrupt can land between an image's result.json and its result reaching the caller: count every
    image this run certified (result.json newer than the run's start, matching its settings) as ok."""
    for src in sources:
        if src.id in results:
            continue
        files = layout.image(src.id)
        try:
            if files.result.stat().st_mtime < since:
                continue
        except OSError:
            continue
        prev = files.done(fp)
        if prev is not None:
            results[src.id] = DepthResult(src.id, str(src.path), "ok", int(prev.get("queries", 0)),
                                          prev.get("failures", {}), metrics=prev.get("metrics", {}),
                                          plan=prev.get("plan") or {})


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
