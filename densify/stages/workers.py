"""The depth stage's Ray CPU-worker executor (`ray.cpu_workers`): images are prepared, planned round by
round (adaptive plans) and finished (densified, written) in Ray CPU tasks, at most 2 x cpu_workers prepared
or finished at once; the driver only routes batches between the workers and the engine.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Iterable, Iterator

from densify.engines import EngineBatch
from densify.io import outputs
from densify.io.images import ImageSource
from densify.io.layout import RunLayout
from densify.stages.settings import DepthConfig
from densify.stages.transform import DepthResult, DepthTask, DepthTransform, failed

__all__ = ["CpuWorkers", "wait_for_a_free_cpu"]


def wait_for_a_free_cpu(cpu_workers: int, timeout_s: float = 20.0) -> None:
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


class CpuWorkers:
    """Runs a depth stage's images in `n` Ray CPU tasks at a time (see the module docstring)."""

    def __init__(self, n: int):
        self.n = int(n)
        self._cpu_room = False  # a free CPU for the workers was seen (asked once per stage)

    def run(self, stage, sources: Iterable[ImageSource], intrinsics, points) -> Iterator[DepthResult]:
        """The stage's results (stage: a DepthStage), in completion order."""
        import ray

        if not ray.is_initialized():
            raise RuntimeError("cpu_workers need Ray: run the engine in a Ray pool (ray.enabled)")
        if not self._cpu_room:
            wait_for_a_free_cpu(self.n)
            self._cpu_room = True
        cfg_ref = ray.put(stage.cfg)
        root = str(stage.layout.images_root) if stage.layout is not None else None
        ready: deque[DepthResult] = deque()
        finishing = _Finishing(cfg_ref, root, stage.keep_maps, 2 * self.n)
        prepared = self._prepared(stage, sources, cfg_ref, intrinsics, points, ready)
        for batch, completions in stage.rounds(prepared, plan_remote=True):
            yield from _drain(ready)
            yield from finishing.add(batch.tag, completions)
        yield from _drain(ready)
        yield from finishing.drain()

    def _prepared(self, stage, sources, cfg_ref, intrinsics, points, ready: deque) -> Iterator[EngineBatch]:
        """First batches of the images, prepared in the workers (a failure becomes the image's record)."""
        import ray

        prep_fn = ray.remote(num_cpus=1, max_retries=0)(_worker_prepare)
        todo, pending = iter(sources), deque()
        while True:
            while len(pending) < 2 * self.n:
                src = next(todo, None)
                if src is None:
                    break
                if stage.admit(src, ready):
                    pending.append((src, time.perf_counter(), prep_fn.remote(cfg_ref, src, intrinsics, points)))
            if not pending:
                return
            src, t0, ref = pending.popleft()
            try:
                task, batch = ray.get(ref)
            except Exception as exc:  # the task's own error: a record for this image
                ready.append(failed(src, getattr(exc, "cause", None) or exc, t0))
                continue
            task.started = t0
            batch.tag = task
            yield batch


class _Finishing:
    """Images being finished in the workers: at most `window` at once, results as they come back."""

    def __init__(self, cfg_ref, root: str | None, keep_maps: bool, window: int):
        import ray

        self.fn = ray.remote(num_cpus=1, max_retries=0)(_worker_finish)
        self.cfg_ref, self.root, self.keep_maps, self.window = cfg_ref, root, keep_maps, window
        self.running: dict = {}

    def add(self, task: DepthTask, completions) -> Iterator[DepthResult]:
        ref = self.fn.remote(self.cfg_ref, self.root, task, completions, self.keep_maps)
        self.running[ref] = (task, len(completions))
        yield from self._collect(block=len(self.running) >= self.window)

    def drain(self) -> Iterator[DepthResult]:
        while self.running:
            yield from self._collect(block=True)

    def _collect(self, block: bool) -> Iterator[DepthResult]:
        import ray

        while self.running:
            done, _ = ray.wait(list(self.running), num_returns=1, timeout=None if block else 0)
            if not done:
                return
            task, n = self.running.pop(done[0])
            try:
                res = ray.get(done[0])
            except Exception as exc:
                exc = getattr(exc, "cause", None) or exc
                if outputs.disk_full(exc):
                    raise exc from None  # no later image could be written either: stop (exit 74)
                res = failed(task.source, exc, task.started, n, "output", f"{type(exc).__name__}: {exc}")
            res.wall_s = time.perf_counter() - task.started
            yield res
            block = False


def _drain(ready: deque) -> Iterator[DepthResult]:
    while ready:
        yield ready.popleft()


# -- in the worker processes

_WORKER_TRANSFORMS: dict = {}


def _worker_transform(cfg: DepthConfig, root: str | None) -> DepthTransform:
    """One transform per settings and output folder in each worker process (profiles load once)."""
    key = (cfg.model_dump_json(), root)
    t = _WORKER_TRANSFORMS.get(key)
    if t is None:
        t = _WORKER_TRANSFORMS[key] = DepthTransform(cfg, layout=RunLayout(root) if root else None)
    return t


def _worker_prepare(cfg: DepthConfig, src: ImageSource, intrinsics, points):
    return _worker_transform(cfg, None).prepare(src, intrinsics=intrinsics, points=points)


def _worker_finish(cfg: DepthConfig, root: str | None, task: DepthTask, completions, keep_maps: bool) -> DepthResult:
    res = _worker_transform(cfg, root).finish(task, completions)
    return res if keep_maps else res.drop_maps()

