"""The depth stage: a stream of images -> plan -> prompts -> engine rounds -> answers -> dense field -> outputs.

    stage = DepthStage(cfg, engine, layout=RunLayout(out))
    for result in stage.run(sources):      # DepthResult per image: ok, skipped (done earlier) or failed
        ...

Each image is prepared as the profile wants it, asked a grid (plan.mode=grid) or a coarse grid and then
refinement rounds (adaptive), one engine batch per image per round; `images_in_flight` images (at least
the engine's capacity) advance together so a streaming engine or pool stays busy. Answers are parsed and
densified at full resolution; with a layout the files are written and `result.json` last. A bad image
becomes a failed result and the stream goes on. Used by `densify depth`, `label`, `eval`, `reconstruct`,
the Python facade and the benchmarks.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from densify.config.profiles import Profile, load_profile
from densify.engines import Engine, EngineBatch, EngineError, ImageRef
from densify.eval.metrics import delta1, depth_report
from densify.fields import DenseField, depth_method
from densify.fields.edge_aware import require_contrib
from densify.geometry.clouds import require_open3d
from densify.io import outputs
from densify.io.cameras import Camera, CameraError, PreparedImage, prepare_image, resolve_camera
from densify.io.images import ImageError, ImageSource, load_image
from densify.io.layout import ImageFiles, RunLayout, fingerprint
from densify.queries import answers as answers_mod
from densify.queries.plan import PlanError, QueryPlan, check_points, grid_points, plan_queries
from densify.queries.prompts import depth_batch, image_ref, image_uid, sampling_for
from densify.stages.settings import DepthConfig

log = logging.getLogger("densify.depth")

__all__ = ["DepthStage", "DepthResult", "DepthTask", "failure_kind", "settings_fingerprint"]


@dataclass
class DepthTask:
    """One image on its way through the engine."""

    source: ImageSource
    rgb: np.ndarray
    camera: Camera
    prep: PreparedImage
    plan: QueryPlan
    uid: str
    ref: ImageRef
    fixed: bool = False
    """Exactly the given points are asked (no adaptive rounds)."""
    started: float = 0.0
    scale: float = 1.0
    """Decoded size / the image's own size (below 1 when decoded reduced: DepthConfig.max_side)."""


@dataclass
class DepthResult:
    """One image's outcome. Maps and answers are kept only when the stage was asked to (keep_maps)."""

    id: str
    image: str
    status: str
    """ok | skipped (done earlier with the same settings) | failed"""
    queries: int = 0
    failures: dict = field(default_factory=dict)
    """Answer failures by kind (unparseable answers and the like; the image itself may still be ok)."""
    error: str | None = None
    error_kind: str | None = None
    uid: str | None = None
    """The prompt image's uid (answer-store statistics are keyed by it)."""
    camera: Camera | None = None
    metrics: dict = field(default_factory=dict)
    wall_s: float = 0.0
    depth: np.ndarray | None = None
    confidence: np.ndarray | None = None
    answers: answers_mod.PointAnswers | None = None
    rgb: np.ndarray | None = None
    scale: float = 1.0
    """Pixels of the maps and answers per pixel of the image file (below 1 when decoded reduced)."""

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def record(self) -> dict:
        return {"id": self.id, "image": self.image, "status": self.status, "queries": self.queries,
                "failures": self.failures, "error": self.error, "kind": self.error_kind, "metrics": self.metrics}


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


def settings_fingerprint(cfg: DepthConfig, profile: Profile) -> str:
    """What shapes a depth result: the profile, the model, the engine's answer-changing options, the plan,
    the densifier, the sampling options, the decoding size and the assumed field of view (not memory,
    scheduling or network settings)."""
    # the answer store's identity too (the model is named on its own here)
    return fingerprint({"profile": profile.model_dump(mode="json"), "model": cfg.model or profile.model,
                        "engine": cfg.engine.answer_identity(), "plan": cfg.plan.model_dump(mode="json"),
                        "densify": cfg.densify.model_dump(mode="json"), "logprobs": cfg.logprobs,
                        "structured": cfg.structured, "max_side": cfg.max_side,
                        "default_hfov_deg": cfg.default_hfov_deg})


class DepthStage:
    """Depth maps for a stream of images through one engine (see the module docstring).

    layout: where files go (None: nothing is written). keep_maps: keep depth maps, confidence, answers
    and pixels in the results (memory then grows with the images). evaluate(source, result) -> metrics:
    an evaluation hook (the demo's ground truth); labelled points of DepthLM manifests are scored anyway.
    on_round(queries): called as answers of each engine round arrive (progress inside an image).
    cpu_workers: prepare, plan (adaptive rounds) and finish (densify, write) images in this many Ray CPU
    tasks at a time instead of this process (Ray must be running, e.g. for the engine pool).
    """

    def __init__(self, cfg: DepthConfig, engine: Engine | None, *, layout: RunLayout | None = None,
                 keep_maps: bool = False, evaluate: Callable[[ImageSource, DepthResult], dict] | None = None,
                 on_round: Callable[[int], None] | None = None, cpu_workers: int = 0):
        self.cpu_workers = int(cpu_workers)
        self._cpu_room = False  # a free CPU for the workers was seen (asked once per stage)
        self.cfg = cfg
        self.profile = load_profile(cfg.profile)
        self.engine = engine
        self.layout = layout
        self.keep_maps = keep_maps
        self.evaluate = evaluate
        self.on_round = on_round
        self._capped = False  # the plan asks more queries than an image holds (said once)
        self.fingerprint = settings_fingerprint(cfg, self.profile)
        self.sampling = sampling_for(self.profile, logprobs=cfg.logprobs, structured=cfg.structured)
        if cfg.densify.method == "edge" or cfg.plan.mode == "adaptive":
            require_contrib()  # before any engine work, not as a failure of every image
        if cfg.outputs.ply:
            require_open3d()

    # -- one image
    def prepare(self, src: ImageSource, *, intrinsics=None, points=None) -> tuple[DepthTask, EngineBatch]:
        cfg, profile = self.cfg, self.profile
        t0 = time.perf_counter()
        img = load_image(src.path, max_side=cfg.max_side)
        rgb, (W, H) = img.rgb, img.size
        h, w = rgb.shape[:2]
        camera = resolve_camera(src.path, W, H, intrinsics if intrinsics is not None else src.intrinsics,
                                cfg.default_hfov_deg)
        if (w, h) != (W, H):  # decoded reduced: intrinsics, points and outputs at the decoded size
            camera = camera.scaled(w, h)
        prep = prepare_image(rgb, camera, coord_range=profile.coord_range, **profile.preprocess.image_options())
        if points is None and src.extra.get("points") is not None:
            points = np.asarray(src.extra["points"], float)
        if points is not None:
            pts = check_points(np.asarray(points, float) * img.scale, w, h, str(src.path))
        elif cfg.plan.mode == "adaptive":
            pts = self._planner(w, h).first_points()
        else:
            pts = grid_points(w, h, **cfg.plan.grid_kwargs())
        plan = plan_queries(pts, prep.pixel_map, marker=profile.marker)
        if points is None:
            self._say_if_capped(w, h, len(plan))
        uid = image_uid(prep, src.id)
        ref = image_ref(src.id, prep, src.path, src.manifest)
        task = DepthTask(src, rgb, camera, prep, plan, uid, ref, fixed=points is not None, started=t0,
                         scale=img.scale)
        return task, depth_batch(prep, plan, profile, uid=uid, ref=ref, sampling=self.sampling, tag=task)

    def _say_if_capped(self, width: int, height: int, planned: int) -> None:
        """Warn (once per stage) when an image holds fewer distinct query positions than the plan asks for."""
        p = self.cfg.plan
        if self._capped or p.stride is not None:
            return
        wanted = int(p.count[0]) * int(p.count[1]) if isinstance(p.count, list) else int(p.count)
        if p.mode == "adaptive":
            wanted, planned = p.budget or wanted, width * height
        if planned < 0.95 * wanted:
            self._capped = True
            log.warning("plan.count %s: a %dx%d image has only %s distinct query positions (pixels, or prompt "
                        "coordinates of the %s profile), so at most %s are asked per image like this one; lower --count",
                        f"{wanted:,}", width, height, f"{planned:,}", self.profile.name, f"{planned:,}")

    def _planner(self, width: int, height: int, rgb=None):
        from densify.fields.adaptive import AdaptivePlanner

        p = self.cfg.plan
        budget = p.budget or len(grid_points(width, height, **p.grid_kwargs()))
        return AdaptivePlanner((height, width), budget, coarse=p.coarse, rounds=p.rounds, rgb=rgb)

    def finish(self, task: DepthTask, completions) -> DepthResult:
        """Answers -> dense depth -> files (result.json last) -> the image's result."""
        cfg, profile, src = self.cfg, self.profile, task.source
        res = DepthResult(src.id, str(src.path), "ok", len(completions), uid=task.uid, camera=task.camera,
                          scale=task.scale)
        errors = [c.error for c in completions if c.error is not None]
        ans = answers_mod.collect_depth(profile, task.plan.pixels, task.plan.prompt_xy, completions,
                                        unmarkable=task.plan.unmarkable)
        res.failures = ans.failure_counts()
        files = self.layout.image(src.id) if self.layout is not None else None
        if errors:
            res.status, res.error_kind = "failed", "engine"
            res.error = f"{len(errors)} of {len(completions)} answers failed: {errors[0]}"
        elif not completions and len(task.plan.unmarkable):
            res.status, res.error_kind = "failed", "unmarkable"
            res.error = (f"all {len(task.plan.unmarkable)} planned points are too close to a border of the "
                         f"{task.prep.pixel_map.pre_size[0]}x{task.prep.pixel_map.pre_size[1]} preprocessed image "
                         f"for the {profile.name} marker; ask about points further inside")
        elif not ans.valid.any():
            res.status, res.error_kind = "failed", "answers"
            res.error = (f"none of {len(completions)} answers could be parsed ({res.failures}); check that the "
                         f"profile ({profile.name}) matches the model; answers are in answers.jsonl")
        if res.status == "failed":
            if files is not None and cfg.outputs.answers and completions:
                outputs.write_jsonl(files.answers, ans.records())
            return res
        lps = ans.logprobs if np.isfinite(ans.logprobs).any() else None
        dense = depth_method(cfg.densify.method)(ans.pixels, ans.values, task.rgb, outliers=cfg.densify.outliers,
                                                 logprobs=lps, **cfg.densify.options)
        res.depth, res.confidence, res.answers, res.rgb = dense.values, dense.confidence, ans, task.rgb
        res.metrics = label_metrics(src, res)
        if self.evaluate is not None:
            res.metrics.update(self.evaluate(src, res))
        if files is not None:
            self.write(files, task, ans, dense, res)
        return res

    def write(self, files: ImageFiles, task: DepthTask, ans, dense: DenseField, res: DepthResult) -> None:
        o = self.cfg.outputs
        depth = dense.values
        outputs.sweep_temp_files(files.dir)  # what an interrupted write of this image left
        written = []
        if o.npy:
            written.append(outputs.write_npy(files.depth_npy, depth.astype(np.float32)))
        if o.confidence:
            written.append(outputs.write_npy(files.confidence, dense.confidence.astype(np.float32)))
        if o.png16:
            written.append(outputs.write_png(files.depth_png, outputs.depth_png16(depth)))
        if o.preview:
            from densify.io.preview import depth_preview

            written.append(outputs.write_png(files.preview, depth_preview(task.rgb, depth)))
        if o.answers:
            written.append(outputs.write_jsonl(files.answers, ans.records()))
        if o.ply:
            from densify.geometry.clouds import depth_to_cloud

            written.append(outputs.write_ply(files.cloud, depth_to_cloud(depth, task.rgb, task.camera,
                                                                          stride=o.ply_stride)))
        written.append(outputs.write_json(files.camera, {"intrinsics": task.camera.to_dict(),
                                                         "preprocessed_size": list(task.prep.pixel_map.pre_size),
                                                         "decoded_scale": task.scale}))
        record = {**res.record(), "fingerprint": self.fingerprint, "profile": self.profile.name}
        outputs.write_json(files.result, files.certify(record, [Path(p) for p in written]))

    # -- a stream of images
    def run(self, sources: Iterable[ImageSource], *, intrinsics=None, points=None) -> Iterator[DepthResult]:
        """One DepthResult per source, in completion order (skipped and failed ones as they are found)."""
        if self.cpu_workers:
            yield from self._run_in_workers(sources, intrinsics, points)
            return
        ready: deque[DepthResult] = deque()

        def batches() -> Iterator[EngineBatch]:
            for src in sources:
                t0 = time.perf_counter()
                if not self._admit(src, ready):
                    continue
                try:
                    _, batch = self.prepare(src, intrinsics=intrinsics, points=points)
                except (ImageError, CameraError, PlanError, OSError, ValueError, MemoryError) as exc:
                    ready.append(DepthResult(src.id, str(src.path), "failed", error=str(exc),
                                             error_kind=failure_kind(exc, src), wall_s=time.perf_counter() - t0))
                    continue
                yield batch

        for batch, completions in self._rounds(batches()):
            yield from _drain(ready)
            task: DepthTask = batch.tag
            try:
                res = self.finish(task, completions)
            except (OSError, ValueError, MemoryError) as exc:
                if outputs.disk_full(exc):
                    raise  # no later image could be written either: stop (exit 74); a rerun resumes
                res = DepthResult(task.source.id, str(task.source.path), "failed", len(completions),
                                  error=f"{type(exc).__name__}: {exc}", error_kind="output")
            res.wall_s = time.perf_counter() - task.started
            if not self.keep_maps:
                res.depth = res.confidence = res.answers = res.rgb = None
            yield res
        yield from _drain(ready)

    def _admit(self, src: ImageSource, ready: deque) -> bool:
        """False when the image needs no engine work: a manifest error or done earlier (its result is queued)."""
        if "manifest_error" in src.extra:
            ready.append(DepthResult(src.id, str(src.path), "failed", error=src.extra["manifest_error"],
                                     error_kind="manifest"))
            return False
        skipped = self._skip(src)
        if skipped is not None:
            ready.append(skipped)
            return False
        return True

    def _run_in_workers(self, sources, intrinsics, points) -> Iterator[DepthResult]:
        """Images prepared, planned round by round (adaptive plans) and finished (densified, written) in Ray
        CPU tasks, at most 2 x cpu_workers prepared or finished at once; this process routes batches."""
        import ray

        if not ray.is_initialized():
            raise RuntimeError("cpu_workers need Ray: run the engine in a Ray pool (ray.enabled)")
        if not self._cpu_room:
            _wait_for_a_free_cpu(self.cpu_workers)
            self._cpu_room = True
        prep_fn = ray.remote(num_cpus=1, max_retries=0)(_worker_prepare)
        fin_fn = ray.remote(num_cpus=1, max_retries=0)(_worker_finish)
        window = 2 * self.cpu_workers
        cfg_ref = ray.put(self.cfg)
        root = str(self.layout.images_root) if self.layout is not None else None
        ready: deque[DepthResult] = deque()

        def batches() -> Iterator[EngineBatch]:
            todo, pending = iter(sources), deque()
            while True:
                while len(pending) < window:
                    src = next(todo, None)
                    if src is None:
                        break
                    if self._admit(src, ready):
                        pending.append((src, time.perf_counter(),
                                        prep_fn.remote(cfg_ref, src, intrinsics, points)))
                if not pending:
                    return
                src, t0, ref = pending.popleft()
                try:
                    task, batch = ray.get(ref)
                except Exception as exc:  # the task's own error: a record for this image
                    exc = getattr(exc, "cause", None) or exc
                    ready.append(DepthResult(src.id, str(src.path), "failed", error=str(exc),
                                             error_kind=failure_kind(exc, src), wall_s=time.perf_counter() - t0))
                    continue
                task.started = t0
                batch.tag = task
                yield batch

        finishing: dict = {}

        def collect(block: bool) -> Iterator[DepthResult]:
            while finishing:
                done, _ = ray.wait(list(finishing), num_returns=1, timeout=None if block else 0)
                if not done:
                    return
                task, n = finishing.pop(done[0])
                try:
                    res = ray.get(done[0])
                except Exception as exc:
                    exc = getattr(exc, "cause", None) or exc
                    if outputs.disk_full(exc):
                        raise exc from None
                    res = DepthResult(task.source.id, str(task.source.path), "failed", n,
                                      error=f"{type(exc).__name__}: {exc}", error_kind="output")
                res.wall_s = time.perf_counter() - task.started
                yield res
                block = False

        for batch, completions in self._rounds(batches(), plan_remote=True):
            yield from _drain(ready)
            task: DepthTask = batch.tag
            finishing[fin_fn.remote(cfg_ref, root, task, completions, self.keep_maps)] = (task, len(completions))
            yield from collect(block=len(finishing) >= window)
        yield from _drain(ready)
        while finishing:
            yield from collect(block=True)

    def one(self, src: ImageSource, *, intrinsics=None) -> DepthResult:
        """One image through the stage (its depth map kept when the stage keeps maps)."""
        return next(iter(self.run([src], intrinsics=intrinsics)))

    def _skip(self, src: ImageSource) -> DepthResult | None:
        """A result for an image done earlier with the same settings; None when it must be (re)done."""
        if self.layout is None:
            return None
        files = self.layout.image(src.id)
        if self.cfg.overwrite:
            files.result.unlink(missing_ok=True)  # an interrupted overwrite must not look done
            return None
        prev = files.done(self.fingerprint)
        if prev is None:
            if files.result.exists():
                log.info("%s: settings changed or files incomplete since the last run: redoing it", src.id)
                files.result.unlink(missing_ok=True)
            return None
        return DepthResult(src.id, str(src.path), "skipped", int(prev.get("queries", 0)), prev.get("failures", {}),
                           metrics=prev.get("metrics", {}))

    def _rounds(self, batches: Iterator[EngineBatch], plan_remote: bool = False):
        """Adaptive plans: every image asks its rounds one after another, but images advance on their own
        (no lockstep across images): as soon as one round's answers are back, that image plans its next
        round while the engine works on the other images' batches, and a finished image makes room for
        the next. plan_remote: each round is planned in a Ray CPU task (the image's state travels there and
        back), not in this process. Yields (first batch with its task, all completions) per image as it
        finishes."""
        if self.cfg.plan.mode != "adaptive":
            yield from self._engine_stream(batches)
            return
        from densify.fields.adaptive import AdaptiveDepthImage

        width = max(self.cfg.images_in_flight, self.engine.capacity)
        source = iter(batches)
        queued: deque[EngineBatch] = deque()   # round batches ready for the engine
        finished: deque = deque()              # states whose image needs no more rounds
        firsts: dict[int, EngineBatch] = {}    # state.key -> the image's first batch (carries its task)
        planning: set = set()                  # plan_remote: ObjectRefs of rounds being planned
        serial = itertools.count()
        active = 0
        exhausted = False
        if plan_remote:
            import ray

            plan_fn = ray.remote(num_cpus=1, max_retries=0)(_plan_round)

        def place(state, b) -> None:
            nonlocal active
            if b is None:
                finished.append(state)
                active -= 1
                return
            b.tag = state  # routes the answers back; the task is restored when the image finishes
            queued.append(b)

        def planned(timeout: float) -> None:
            """Take the rounds planned remotely so far (waiting at most `timeout` s)."""
            if not planning:
                return
            ready, _ = ray.wait(list(planning), num_returns=len(planning), timeout=timeout)
            for ref in ready:
                planning.discard(ref)
                place(*ray.get(ref))

        def feed() -> Iterator[EngineBatch | None]:
            nonlocal active, exhausted
            while True:
                planned(0)
                while not exhausted and active < width:
                    batch = next(source, None)
                    if batch is None:
                        exhausted = True
                        break
                    task: DepthTask = batch.tag
                    planner = self._planner(task.camera.width, task.camera.height, rgb=task.rgb)
                    if task.fixed:  # one round: exactly the given points
                        planner.budget, planner.rounds = len(task.plan), 0
                    state = AdaptiveDepthImage(planner, task.prep, self.profile, uid=task.uid, ref=task.ref,
                                               sampling=batch.sampling, tag=task, first_batch=batch,
                                               first_plan=task.plan)
                    state.key = next(serial)  # names the image across copies made by remote planning
                    firsts[state.key] = batch
                    active += 1
                    place(state, state.next_batch())  # the first round is built already: nothing to plan
                if not queued and planning:
                    planned(0.005)  # the engine may hold nothing: wait a little for a planned round
                if queued:
                    yield queued.popleft()
                elif exhausted and active == 0:
                    return
                else:
                    yield None  # nothing new yet: answers or planned rounds are on their way

        def done() -> Iterator[tuple[EngineBatch, list]]:
            while finished:
                state = finished.popleft()
                task = state.tag
                task.plan = QueryPlan(state.run.pixels, state.run.prompt_xy, unmarkable=state.run.unmarkable)
                batch = firsts.pop(state.key)
                batch.tag = task
                yield batch, state.run.completions

        for b, completions in self._engine_stream(feed()):
            if plan_remote:
                planning.add(plan_fn.remote(b.tag, completions))
            else:
                place(*_plan_round(b.tag, completions))
            yield from done()
        yield from done()

    def _engine_stream(self, batches):
        for batch, completions in self.engine.stream(batches):
            if self.on_round is not None:
                self.on_round(len(completions))
            yield batch, completions


def _wait_for_a_free_cpu(cpu_workers: int, timeout_s: float = 20.0) -> None:
    """The CPU tasks need a CPU that the engine actors leave free; without one they would wait forever.
    A one-CPU task that cannot start within `timeout_s` says so (Ray's resource view can lag, so it is
    asked by a task, not read)."""
    import ray

    from densify.config.loading import ConfigError

    probe = ray.remote(num_cpus=1, max_retries=0)(_nothing).remote()
    if not ray.wait([probe], timeout=timeout_s)[0]:
        ray.cancel(probe, force=True)
        total = ray.cluster_resources().get("CPU", 0)
        raise ConfigError(f"ray.cpu_workers={cpu_workers} runs images in Ray CPU tasks, but none of the Ray "
                          f"cluster's {total:g} CPUs was free for {timeout_s:g} s (the engine actors or other work "
                          f"hold them): set ray.num_actors or ray.num_cpus_per_actor lower to leave CPUs free, or "
                          f"ray.cpu_workers=0")


def _nothing() -> None:
    return None


def _drain(ready: deque) -> Iterator[DepthResult]:
    while ready:
        yield ready.popleft()


def label_metrics(src: ImageSource, res: DepthResult) -> dict:
    """Scores at the labelled points of a DepthLM-style manifest (evaluation data, never shown to the engine)."""
    if src.labels is None or res.depth is None:
        return {}
    lp = np.asarray(src.labels["pixels"], float).reshape(-1, 2) * res.scale
    gt = np.asarray(src.labels["depth"], float)
    h, w = res.depth.shape
    xi = np.clip(np.round(lp[:, 0]).astype(int), 0, w - 1)
    yi = np.clip(np.round(lp[:, 1]).astype(int), 0, h - 1)
    out = {"labels_dense": depth_report(res.depth[yi, xi], gt)}
    if res.answers is not None:
        lookup = {tuple(map(int, np.round(p))): v for p, v in zip(res.answers.pixels, res.answers.values)}
        pred = np.array([lookup.get(tuple(map(int, np.round(p))), np.nan) for p in lp])
        if np.isfinite(pred).any():
            out["labels_points"] = {"delta1": delta1(pred, gt), "n": int(np.isfinite(pred).sum())}
    return out


def summarize(results: list[DepthResult], wall: float, profile: Profile, cfg: DepthConfig, **extra) -> dict:
    """A run's summary: counts, failures by kind, answer failures, throughput, mean metrics."""
    asked = [r for r in results if r.status != "skipped"]  # skipped images were answered in an earlier run
    q = sum(r.queries for r in asked)
    fails: dict[str, int] = {}
    for r in asked:
        for k, v in r.failures.items():
            fails[k] = fails.get(k, 0) + v
    kinds: dict[str, int] = {}
    for r in results:
        if r.status == "failed":
            kinds[r.error_kind or "error"] = kinds.get(r.error_kind or "error", 0) + 1
    agg = {}
    metrics = [r.metrics for r in results if r.metrics]
    for key in sorted({k for m in metrics for k in m}):
        vals = [m[key] for m in metrics if key in m]
        agg[key] = {k: float(np.nanmean([v[k] for v in vals])) for k in vals[0] if k != "n"}
    return {
        "profile": profile.name, "engine": cfg.engine.name,
        "model": None if extra.get("simulated") else cfg.model or profile.model, "images": len(results), "ok": sum(r.status == "ok" for r in results),
        "skipped": sum(r.status == "skipped" for r in results),
        "failed": sum(r.status == "failed" for r in results), "failed_by_kind": kinds,
        "failed_images": [{"id": r.id, "image": r.image, "kind": r.error_kind, "error": r.error}
                          for r in results if r.status == "failed"][:1000],
        "queries": q, "answer_failures": fails,  # unmarkable points were never asked: not in the rate
        "answer_failure_rate": sum(v for k, v in fails.items() if k != "unmarkable") / q if q else 0.0,
        "wall_s": wall, "queries_per_s": q / wall if wall > 0 else 0.0, "metrics": agg, **extra,
    }


def read_camera(files: ImageFiles) -> Camera | None:
    try:
        return Camera(**json.loads(files.camera.read_text())["intrinsics"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_depth(sources: list[ImageSource], cfg: DepthConfig, engine: Engine, layout: RunLayout | None, *,
              intrinsics=None, points=None, keep_maps: bool = False, evaluate=None, progress=None,
              **summary_extra) -> tuple[dict, list[DepthResult]]:
    """The depth stage over a list of images as one run: results in input order and the run's summary,
    written (summary.json, failures.jsonl) even when the run is interrupted, which the summary then says."""
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
            try:
                outputs.write_json(layout.summary, summary)
                outputs.write_jsonl(layout.failures, ({"id": r.id, "image": r.image, "kind": r.error_kind,
                                                       "error": r.error} for r in ordered if r.status == "failed"))
            except OSError as exc:
                if not interrupted and error is None:
                    raise
                log.error("could not write the run's summary: %s", exc)  # the error that stopped the run wins
    return summary, ordered


# -- images prepared and finished in Ray CPU tasks (DepthStage.cpu_workers)

_WORKER_STAGES: dict = {}


def _worker_stage(cfg: DepthConfig, root: str | None) -> DepthStage:
    """One stage per settings and output folder in each worker process (profiles load once)."""
    key = (cfg.model_dump_json(), root)
    stage = _WORKER_STAGES.get(key)
    if stage is None:
        stage = _WORKER_STAGES[key] = DepthStage(cfg, None, layout=RunLayout(root) if root else None)
    return stage


def _plan_round(state, completions):
    """An adaptive image takes a round's answers and plans its next round: (state, next batch or None)."""
    state.receive(completions)
    if any(c.error is not None for c in completions):
        state.done = True  # engine errors: no more rounds, the image fails in finish()
    return state, state.next_batch()


def _worker_prepare(cfg: DepthConfig, src: ImageSource, intrinsics, points):
    return _worker_stage(cfg, None).prepare(src, intrinsics=intrinsics, points=points)


def _worker_finish(cfg: DepthConfig, root: str | None, task: DepthTask, completions, keep_maps: bool) -> DepthResult:
    res = _worker_stage(cfg, root).finish(task, completions)
    if not keep_maps:
        res.depth = res.confidence = res.answers = res.rgb = None
    return res
