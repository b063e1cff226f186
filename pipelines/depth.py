"""`densify depth`: images -> cameras -> query plan -> prompts -> engine -> answers -> dense depth -> files.

Per image it writes <out>/<id>/: depth.npy (float32 m), depth.png (uint16 mm, 0 = none), preview.png,
confidence.npy, cloud.ply, answers.jsonl, camera.json; and <out>/summary.json for the run. Images whose
outputs exist are skipped unless `overwrite` is set; a bad image gets a failure record and the run goes on.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from densify import answers as answers_mod
from densify import outputs
from densify.cameras import Camera, CameraError, PreparedImage, prepare_image, resolve_camera
from densify.config import ConfigError
from densify.engines import EngineBatch, create_engine, generate_stream
from densify.engines.base import Engine, EngineError
from densify.engines.simulated import depth_truth, label_truth
from densify.eval.metrics import delta1, depth_report
from densify.fields import depth_method
from densify.images import ImageError, ImageSource, discover, load_rgb
from densify.truth import saved_depth
from densify.profiles import Profile, load_profile
from densify.progress import Progress
from densify.prompts import depth_batch, image_uid, sampling_for
from densify.queries import PlanError, QueryPlan, check_points, grid_points, plan_queries
from pipelines.configs import DepthJobConfig, depth_overrides, load_job_config

log = logging.getLogger("densify.depth")


@dataclass
class DepthTask:
    """One image on its way through the engine."""

    source: ImageSource
    rgb: np.ndarray
    camera: Camera
    prep: PreparedImage
    plan: QueryPlan
    truth_depth: np.ndarray | None = None


@dataclass
class ImageResult:
    id: str
    status: str  # "ok" | "skipped" | "failed"
    queries: int = 0
    failures: dict = field(default_factory=dict)
    error: str | None = None
    error_kind: str | None = None
    metrics: dict = field(default_factory=dict)
    depth: np.ndarray | None = None
    answers: answers_mod.PointAnswers | None = None


def plan_for(src: ImageSource, camera: Camera, prep: PreparedImage, cfg: DepthJobConfig,
             points: np.ndarray | None = None) -> QueryPlan:
    if points is None and src.extra.get("points") is not None:
        points = np.asarray(src.extra["points"], float)
    if points is not None:
        pts = check_points(points, camera.width, camera.height, str(src.path))
    elif cfg.plan.mode == "adaptive":
        pts = adaptive_planner(cfg, camera.width, camera.height).first_points()
    else:
        pts = grid_points(camera.width, camera.height, **cfg.plan.grid_kwargs())
    return plan_queries(pts, prep.pixel_map)


def adaptive_planner(cfg: DepthJobConfig, width: int, height: int, rgb=None):
    """plan.mode=adaptive: the planner for one image (budget: plan.budget, else the grid's size)."""
    from densify.fields.adaptive import AdaptivePlanner

    p = cfg.plan
    budget = p.budget or len(grid_points(width, height, **p.grid_kwargs()))
    return AdaptivePlanner((height, width), budget, coarse=p.coarse, rounds=p.rounds, rgb=rgb)


def adaptive_stream(engine: Engine, batches: Iterator[EngineBatch], profile: Profile, cfg: DepthJobConfig,
                     points=None):
    """plan.mode=adaptive: per image, the first batch then refinement rounds, one batch each.

    `images_in_flight` images advance in lockstep, so every round sends that many batches through the
    engine's stream at once (a vLLM engine or Ray pool stays busy across images). Images with explicit
    points are asked exactly those.
    """
    from densify.fields.adaptive import AdaptiveDepthImage

    it = iter(batches)
    while group := list(itertools.islice(it, cfg.images_in_flight)):
        states = []
        for batch in group:
            task: DepthTask = batch.tag
            fixed = points is not None or task.source.extra.get("points") is not None
            planner = adaptive_planner(cfg, task.camera.width, task.camera.height, rgb=task.rgb)
            if fixed:  # one round: exactly the given points
                planner.budget = len(task.plan)
                planner.rounds = 0
            truth = next(iter(batch.images.values())).truth
            states.append(AdaptiveDepthImage(planner, task.prep, profile, uid=image_uid(task.prep, task.source.id),
                                             truth=truth, sampling=batch.sampling, tag=task, first_batch=batch,
                                             first_plan=task.plan))
        active = [s for s in states if not s.done]
        while active:
            round_batches = []
            for s in active:
                b = s.next_batch()
                if b is not None:
                    b.tag = s  # routes the answers back; restored to the task below
                    round_batches.append(b)
            for b, completions in generate_stream(engine, round_batches):
                b.tag.receive(completions)
            active = [s for s in active if not s.done]
        for batch, s in zip(group, states):
            s.tag.plan = QueryPlan(s.run.pixels, s.run.prompt_xy)
            batch.tag = s.tag
            yield batch, s.run.completions


def depth_stream(engine: Engine, batches: Iterator[EngineBatch], profile: Profile, cfg: DepthJobConfig,
                 points=None):
    """Batches (tag: DepthTask) -> (batch, completions) through the engine, in rounds when adaptive."""
    if cfg.plan.mode == "adaptive":
        return adaptive_stream(engine, batches, profile, cfg, points)
    return generate_stream(engine, batches)


def prepare_task(src: ImageSource, profile: Profile, cfg: DepthJobConfig, *, with_truth: bool,
                 intrinsics=None, points=None) -> tuple[DepthTask, EngineBatch]:
    rgb = load_rgb(src.path)
    h, w = rgb.shape[:2]
    camera = resolve_camera(src.path, w, h, intrinsics if intrinsics is not None else src.intrinsics,
                            cfg.default_hfov_deg)
    p = profile.preprocess
    prep = prepare_image(rgb, camera, focal=p.focal, max_side=p.max_side, square_pixels=p.square_pixels,
                         coord_range=profile.coord_range, resample=p.resample)
    plan = plan_for(src, camera, prep, cfg, points)
    truth, truth_depth = None, None
    if with_truth:
        truth_depth = saved_depth(src)
        if src.labels is not None:
            truth = label_truth(prep, np.asarray(src.labels["pixels"], float), np.asarray(src.labels["depth"]))
            if truth_depth is not None:
                truth.depth = depth_truth(prep, truth_depth).depth
        elif truth_depth is not None:
            truth = depth_truth(prep, truth_depth)
    task = DepthTask(src, rgb, camera, prep, plan, truth_depth)
    sampling = sampling_for(profile, logprobs=cfg.logprobs, structured=cfg.structured)
    batch = depth_batch(prep, plan, profile, uid=image_uid(prep, src.id), truth=truth, sampling=sampling, tag=task)
    return task, batch


def finish_task(task: DepthTask, completions, profile: Profile, cfg: DepthJobConfig,
                out_dir: Path | None) -> ImageResult:
    ans = answers_mod.collect_depth(profile, task.plan.pixels, task.plan.prompt_xy, completions)
    try:
        densifier = depth_method(cfg.densify.method)
    except KeyError as exc:
        raise ConfigError(f"densify.method: {exc.args[0]}") from None
    lps = ans.logprobs if np.isfinite(ans.logprobs).any() else None
    dense = densifier(ans.pixels, ans.values, task.rgb, outliers=cfg.densify.outliers, logprobs=lps,
                      **cfg.densify.options)
    res = ImageResult(task.source.id, "ok", len(completions), ans.failure_counts(), depth=dense.values, answers=ans)
    if not ans.valid.any():
        res.status, res.error_kind = "failed", "answers"
        res.error = (f"none of {len(completions)} answers could be parsed ({res.failures}); check that the "
                     f"profile ({profile.name}) matches the model; answers are in answers.jsonl")
        if out_dir is not None and cfg.outputs.answers:
            outputs.write_jsonl(out_dir / task.source.id / "answers.jsonl", ans.records())
        return res
    if task.truth_depth is not None:
        res.metrics = {"dense": depth_report(dense.values, task.truth_depth)}
    labels = task.source.labels
    if labels is not None:
        lp = np.asarray(labels["pixels"], int)
        res.metrics["labels_dense"] = depth_report(dense.values[lp[:, 1], lp[:, 0]], labels["depth"])
    gt_pts = _truth_at(task, ans.pixels)
    if gt_pts is not None:
        res.metrics["points"] = {"delta1": delta1(ans.values, gt_pts), "n": int(np.isfinite(ans.values).sum())}
    if out_dir is not None:
        write_image_outputs(out_dir / task.source.id, task, ans, dense, cfg, res)
    return res


def _truth_at(task: DepthTask, pixels: np.ndarray) -> np.ndarray | None:
    if task.truth_depth is not None:
        p = np.asarray(pixels, int)
        return task.truth_depth[p[:, 1], p[:, 0]]
    labels = task.source.labels
    if labels is not None:
        lookup = {tuple(map(int, p)): d for p, d in zip(labels["pixels"], labels["depth"])}
        return np.array([lookup.get(tuple(map(int, p)), np.nan) for p in pixels])
    return None


def write_image_outputs(d: Path, task: DepthTask, ans, dense, cfg: DepthJobConfig, res: ImageResult) -> None:
    o = cfg.outputs
    depth = dense.values
    if o.npy:
        outputs.write_npy(d / "depth.npy", depth.astype(np.float32))
    if o.confidence:
        outputs.write_npy(d / "confidence.npy", dense.confidence.astype(np.float32))
    if o.png16:
        outputs.write_png(d / "depth.png", outputs.depth_png16(depth))
    if o.preview:
        outputs.write_png(d / "preview.png", np.concatenate([task.rgb, outputs.depth_preview(depth)], axis=1))
    if o.answers:
        outputs.write_jsonl(d / "answers.jsonl", ans.records())
    if o.ply:
        from densify.geometry.clouds import depth_to_cloud

        outputs.write_ply(d / "cloud.ply", depth_to_cloud(depth, task.rgb, task.camera, stride=o.ply_stride))
    outputs.write_json(d / "camera.json", {"intrinsics": task.camera.to_dict(),
                                           "preprocessed_size": list(task.prep.pixel_map.pre_size)})
    # Written last: its presence marks the image as done.
    outputs.write_json(d / "result.json", {"id": res.id, "status": res.status, "queries": res.queries,
                                           "failures": res.failures, "metrics": res.metrics,
                                           "image": str(task.source.path)})


def failure_kind(exc: BaseException, src: ImageSource | None = None) -> str:
    """The kind of a per-image failure record."""
    if isinstance(exc, ImageError):
        return exc.kind
    if isinstance(exc, CameraError):
        return "intrinsics"
    if isinstance(exc, PlanError):
        return "points"
    if isinstance(exc, EngineError):
        return "engine"
    if isinstance(exc, OSError):
        return "missing" if src is not None and not Path(src.path).exists() else "image"
    return "error"


def run_depth(sources: list[ImageSource], cfg: DepthJobConfig, out_dir: str | Path | None, *,
              engine: Engine | None = None, progress: bool = True, intrinsics=None, points=None,
              keep_maps: bool = False) -> dict:
    """Run the depth pipeline over images; returns the run summary (also written as summary.json).

    summary["_results"] holds one ImageResult per image; its depth map and answers only with `keep_maps`
    (otherwise memory stays flat however many images run)."""
    profile = load_profile(cfg.profile)
    if profile.task != "depth":
        raise ConfigError(f"profile: {profile.name!r} is a {profile.task} profile; densify depth needs a depth "
                          f"profile (vlm3-depth or depthlm)")
    out = Path(out_dir) if out_dir is not None else None
    own_engine = engine is None
    if engine is None:
        engine = create_engine(cfg.engine.name, profile=profile, **cfg.engine.options)
    with_truth = bool(getattr(engine, "uses_truth", False))
    results: list[ImageResult] = []
    bar = Progress(len(sources), enabled=progress)
    t0 = time.perf_counter()

    def batches() -> Iterator[EngineBatch]:
        for src in sources:
            if out is not None and not cfg.overwrite and (out / src.id / "result.json").is_file():
                results.append(ImageResult(src.id, "skipped"))
                bar.update()
                continue
            try:
                _, batch = prepare_task(src, profile, cfg, with_truth=with_truth, intrinsics=intrinsics,
                                        points=points)
            except (ImageError, CameraError, PlanError, OSError, ValueError) as exc:
                log.error("%s: %s", src.path, exc)
                results.append(ImageResult(src.id, "failed", error=str(exc), error_kind=failure_kind(exc, src)))
                bar.update(failed=1)
                continue
            yield batch

    try:
        stream = depth_stream(engine, batches(), profile, cfg, points)
        for batch, completions in stream:
            task: DepthTask = batch.tag
            try:
                res = finish_task(task, completions, profile, cfg, out)
            except (OSError, ValueError) as exc:
                log.error("%s: %s", task.source.path, exc)
                res = ImageResult(task.source.id, "failed", len(completions), error=str(exc), error_kind="output")
            if res.status == "failed":
                log.error("%s: %s", task.source.path, res.error)
            if not keep_maps:
                res.depth = res.answers = None
            results.append(res)
            bar.update(queries=res.queries, failed=int(res.status == "failed"))
    finally:
        bar.close()
        if own_engine:
            engine.close()
    wall = time.perf_counter() - t0
    summary = summarize(results, wall, profile, cfg)
    if out is not None:
        outputs.write_json(out / "summary.json", summary)
        fails = [r for r in results if r.status == "failed"]
        outputs.write_jsonl(out / "failures.jsonl", ({"id": r.id, "kind": r.error_kind, "error": r.error}
                                                     for r in fails))
    summary["_results"] = results
    return summary


def summarize(results: list[ImageResult], wall: float, profile: Profile, cfg: DepthJobConfig) -> dict:
    q = sum(r.queries for r in results)
    fails: dict[str, int] = {}
    for r in results:
        for k, v in r.failures.items():
            fails[k] = fails.get(k, 0) + v
    metrics = [r.metrics for r in results if r.metrics]
    agg = {}
    for key in ("dense", "points", "labels_dense"):
        vals = [m[key] for m in metrics if key in m]
        if vals:
            agg[key] = {k: float(np.nanmean([v[k] for v in vals])) for k in vals[0] if k != "n"}
    return {
        "profile": profile.name, "engine": cfg.engine.name,
        "images": len(results), "ok": sum(r.status == "ok" for r in results),
        "skipped": sum(r.status == "skipped" for r in results),
        "failed": sum(r.status == "failed" for r in results),
        "failed_images": [{"id": r.id, "kind": r.error_kind, "error": r.error} for r in results if r.status == "failed"],
        "queries": q, "answer_failures": fails,
        "answer_failure_rate": sum(fails.values()) / q if q else 0.0,
        "wall_s": wall, "queries_per_s": q / wall if wall > 0 else 0.0,
        "metrics": agg,
    }


# -- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="images, folders, globs or .jsonl manifests")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", help="pipeline YAML (default: configs/pipelines/depth.yaml)")
    p.add_argument("--profile", help="model profile (vlm3-depth, depthlm, or a YAML path)")
    p.add_argument("--engine", help="simulated | hf | vllm | openai | ray")
    p.add_argument("--model", help="checkpoint path or name for the engine (default: the profile's)")
    p.add_argument("--intrinsics", help="fx,fy,cx,cy for every image (else sidecar JSON, else default FoV)")
    p.add_argument("--stride", type=float, help="query every N pixels")
    p.add_argument("--count", type=int, help="about N queries per image")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key")
    p.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist")


def config_from_args(args) -> DepthJobConfig:
    return load_job_config(DepthJobConfig, args.config, depth_overrides(args), default_name="depth")


def run(args) -> int:
    from densify.cameras import parse_intrinsics_arg

    cfg = config_from_args(args)
    log.info("config: %s", cfg.model_dump_json())
    intr = parse_intrinsics_arg(args.intrinsics) if args.intrinsics else None
    sources = discover(args.inputs)
    summary = run_depth(sources, cfg, args.out, intrinsics=intr)
    print_summary(summary, args.out)
    return 1 if summary["failed"] else 0


def print_summary(summary: dict, out) -> None:
    from rich.console import Console

    c = Console(stderr=False)
    c.print(f"[bold]densify depth[/]: {summary['ok']} ok, {summary['skipped']} skipped, {summary['failed']} failed "
            f"of {summary['images']} images; {summary['queries']:,} queries in {summary['wall_s']:.1f} s "
            f"({summary['queries_per_s']:,.0f} q/s); answer failures {summary['answer_failures'] or 'none'}")
    for f in summary["failed_images"]:
        c.print(f"  [red]failed[/] {f['id']} ({f['kind']}): {f['error']}")
    if out:
        c.print(f"outputs in {out}")
