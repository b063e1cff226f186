"""The depth stage: a stream of images -> plan -> prompts -> engine rounds -> answers -> dense field -> outputs.

    stage = DepthStage(cfg, engine, layout=RunLayout(out))
    for result in stage.run(sources):      # DepthResult per image: ok, skipped (done earlier) or failed
        ...

Each image is prepared as the profile wants it, asked a grid (plan.mode=grid) or a coarse grid and then
refinement rounds (adaptive), one engine batch per image per round; `images_in_flight` images (at least
the engine's capacity) advance together so a streaming engine or pool stays busy. Answers are parsed and
densified at full resolution, in `cpu_threads` threads while the engine's loop goes on feeding the engine
(rounds are planned there too); with a layout the files are written and `result.json` last. A bad image
becomes a failed result and the stream goes on. Used by `densify depth`, `label`, `eval`, `reconstruct`,
the Python facade and the benchmarks.

Its parts: the per-image transform (stages.transform), the round scheduler (stages.rounds), the Ray
CPU-worker executor (stages.workers); a whole run with its summary is stages.summary.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time
from collections import deque
from typing import Callable, Iterable, Iterator

from densify.engines import Engine, EngineBatch
from densify.fields.adaptive import AdaptiveDepthImage
from densify.io import outputs
from densify.io.cameras import CameraError
from densify.io.images import ImageError, ImageSource
from densify.io.layout import RunLayout
from densify.queries.plan import PlanError
from densify.stages.rounds import RoundScheduler, engine_stream
from densify.stages.settings import DepthConfig
from densify.stages.transform import (DepthResult, DepthTask, DepthTransform, failed, failure_kind, read_camera,
                                      settings_fingerprint, wants_forcing)
from densify.stages.workers import CpuWorkers

log = logging.getLogger("densify.depth")

__all__ = ["DepthStage", "DepthResult", "DepthTask", "failure_kind", "read_camera", "settings_fingerprint"]

_PREPARE_ERRORS = (ImageError, CameraError, PlanError, OSError, ValueError, MemoryError)


class DepthStage(DepthTransform):
    """Depth maps for a stream of images through one engine (see the module docstring).

    layout: where files go (None: nothing is written). keep_maps: keep depth maps, confidence, answers
    and pixels in the results (memory then grows with the images). evaluate(source, result) -> metrics:
    an evaluation hook (the demo's ground truth); labelled points of DepthLM manifests are scored anyway.
    on_round(queries): called as answers of each engine round arrive (progress inside an image).
    cpu_workers: prepare, plan (adaptive rounds) and finish (densify, write) images in this many Ray CPU
    tasks at a time instead of this process (Ray must be running, e.g. for the engine pool).
    planner_options: more AdaptivePlanner options for adaptive plans (benchmark variants).
    Where the profile declares (or lets a job learn) its fixed answer text, the engine is wrapped in a
    ForcingEngine (densify.queries.forcing; `forcing` then holds it, for its audit report).
    """

    def __init__(self, cfg: DepthConfig, engine: Engine | None, *, layout: RunLayout | None = None,
                 keep_maps: bool = False, evaluate: Callable[[ImageSource, DepthResult], dict] | None = None,
                 on_round: Callable[[int], None] | None = None, cpu_workers: int = 0,
                 planner_options: dict | None = None):
        super().__init__(cfg, layout=layout, evaluate=evaluate, planner_options=planner_options)
        self.engine = engine
        self.forcing = None
        if engine is not None and wants_forcing(cfg, self.profile):
            from densify.queries.forcing import ForcingEngine

            self.engine = self.forcing = ForcingEngine(engine, self.profile, cfg.forcing)
        self._threads: cf.ThreadPoolExecutor | None = None  # run(): plan rounds and finish images
        self.keep_maps = keep_maps
        self.on_round = on_round
        self.cpu_workers = int(cpu_workers)
        self.workers = CpuWorkers(self.cpu_workers) if self.cpu_workers else None

    def run(self, sources: Iterable[ImageSource], *, intrinsics=None, points=None) -> Iterator[DepthResult]:
        """One DepthResult per source, in completion order (skipped and failed ones as they are found)."""
        if self.workers is not None:
            yield from self.workers.run(self, sources, intrinsics, points)
            return
        ready: deque[DepthResult] = deque()
        if self.cfg.cpu_threads > 0:
            yield from self._run_threaded(self._prepared(sources, intrinsics, points, ready), ready)
            return
        for batch, completions in self.rounds(self._prepared(sources, intrinsics, points, ready)):
            yield from _drain(ready)
            yield self._finished(batch.tag, completions)
        yield from _drain(ready)

    def _run_threaded(self, batches: Iterator[EngineBatch], ready: deque) -> Iterator[DepthResult]:
        """Images densified and written in threads (numpy, SciPy and OpenCV release the GIL), so the engine's
        loop goes on feeding the engine meanwhile; results are handed on oldest first."""
        n = self.cfg.cpu_threads
        pool = self._threads = cf.ThreadPoolExecutor(n, thread_name_prefix="densify-cpu")
        self._defer_certify, self._disk_full = True, None
        pending: deque[cf.Future] = deque()  # finishing images, oldest first
        try:
            for batch, completions in self.rounds(batches):  # rounds are planned in the same threads
                yield from _drain(ready)
                if self._disk_full is not None:
                    raise self._disk_full
                pending.append(pool.submit(self._finished, batch.tag, completions))
                while pending and (pending[0].done() or len(pending) > 2 * n):
                    yield from self._handed(pending.popleft().result())
            yield from _drain(ready)
            while pending:
                yield from self._handed(pending.popleft().result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # running finishes end before certifying goes back
            self._threads, self._defer_certify = None, False

    def _handed(self, res: DepthResult) -> Iterator[DepthResult]:
        """Hand a result on, then write its result.json: once the caller asks for the next one (it has this
        one) or closes the stream (an interrupt), so a run's summary and its result.json files agree."""
        closing = False
        try:
            yield res
        except GeneratorExit:
            closing = True
            raise
        finally:
            try:
                self.certify(res)
            except OSError as exc:
                if not closing:
                    raise  # e.g. a full disk: the run stops (exit 74); a rerun redoes this image
                log.error("%s: could not certify the image while stopping: %s", res.id, exc)

    def _finished(self, task: DepthTask, completions) -> DepthResult:
        """finish() with an output failure as the image's failure record (a full disk stops the run)."""
        if self._disk_full is not None:  # another image found the disk full: write nothing more
            raise self._disk_full
        try:
            res = self.finish(task, completions)
        except (OSError, ValueError, MemoryError) as exc:
            if outputs.disk_full(exc):
                self._disk_full = exc
                raise  # no later image could be written either: stop (exit 74); a rerun resumes
            res = failed(task.source, exc, task.started, len(completions), "output", f"{type(exc).__name__}: {exc}")
        res.wall_s = time.perf_counter() - task.started
        return res if self.keep_maps else res.drop_maps()

    def one(self, src: ImageSource, *, intrinsics=None) -> DepthResult:
        """One image through the stage (its depth map kept when the stage keeps maps)."""
        return next(iter(self.run([src], intrinsics=intrinsics)))

    def rounds(self, batches: Iterable[EngineBatch], plan_remote: bool = False):
        """(first batch with its task, all completions) per image as it finishes: the grid plan's one batch,
        or an adaptive plan's rounds (see stages.rounds; plan_remote: planned in Ray CPU tasks)."""
        if self.cfg.plan.mode != "adaptive":
            return engine_stream(self.engine, batches, self.on_round)
        width = max(self.cfg.images_in_flight, self.engine.capacity)
        return RoundScheduler(self.engine, width, self._adaptive, on_round=self.on_round,
                              plan_remote=plan_remote, threads=self._threads).run(batches)

    def _adaptive(self, batch: EngineBatch) -> AdaptiveDepthImage:
        """An image's adaptive run, from its first batch (planned by the image's own planner)."""
        task: DepthTask = batch.tag
        return AdaptiveDepthImage(task.planner, task.prep, self.profile, uid=task.uid, ref=task.ref,
                                  sampling=batch.sampling, tag=task, first_batch=batch, first_plan=task.plan)

    def admit(self, src: ImageSource, ready: deque) -> bool:
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

    def _prepared(self, sources, intrinsics, points, ready: deque) -> Iterator[EngineBatch]:
        """First batches of the images that need engine work (the others' results go to `ready`)."""
        for src in sources:
            t0 = time.perf_counter()
            if not self.admit(src, ready):
                continue
            try:
                _, batch = self.prepare(src, intrinsics=intrinsics, points=points)
            except _PREPARE_ERRORS as exc:
                ready.append(failed(src, exc, t0))
                continue
            yield batch

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
                           metrics=prev.get("metrics", {}), plan=prev.get("plan") or {})


def _drain(ready: deque) -> Iterator[DepthResult]:
    while ready:
        yield ready.popleft()
