"""The Ray actor side of the pool (`ray_pool.RayPoolEngine` is the driver side): one engine per actor
process, batches in and answers out as columns, one engine thread feeding the engine's stream.

An engine that reports itself dead (`engine.dead`, set by the vllm engine when its engine core process
died, e.g. of CUDA OOM) cannot answer again in this process: the actor then exits its process, so Ray
restarts it with a fresh engine and the driver resubmits the batches it held (see `ray_pool`).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import queue
import threading
import time
from typing import Any, Callable

from densify.engines.base import Completion, Engine, EngineBatch, EngineError, Query, generate_stream
from densify.engines.options import EngineOptions
from densify.engines.registry import create_engine, split_runtime, validate_engine_options
from densify.engines.vllm_memory import ASSUMED_GPU_GIB, visible_gpu_total_gib

log = logging.getLogger("densify.ray")

EngineSpec = str | EngineOptions | Callable[..., Engine]
"""An engine's typed options, a registered engine name (with a dict of options), or a factory called as
factory(profile=..., **engine_options)."""


_STOP = object()  # on an actor's queue: the engine thread finishes what it holds and ends


class _EngineActor:
    """One engine in one Ray worker process (a threaded Ray actor: `actor_class`, `_start_actors`).

    `generate` is called concurrently (up to the pool's batches in flight per actor). Every batch goes
    through one background engine thread that feeds `generate_stream(engine, ...)` from a queue, so an
    engine with its own `stream` holds several batches at once (the next image is submitted while the last
    one's answers finish decoding) and any other engine answers them one at a time, in queue order; each
    `generate` call waits on its batch's future. `ping`, `info` and `cpu_seconds` answer while batches run.
    """

    def __init__(self, engine: EngineSpec, profile, options: dict | None = None, engines_per_gpu: int = 1):
        """engine: typed options (`options` then holds the engine's Python-only arguments, e.g. `truth`), a
        registered name (`options`: its keyword options, checked here) or a factory (`options`: its keywords)."""
        self.memory_plan = None
        options = dict(options or {})
        if callable(engine) and not isinstance(engine, (str, EngineOptions)):
            self.engine = engine(profile=profile, **options)
        else:
            opts, runtime = (engine, options) if isinstance(engine, EngineOptions) else _typed(engine, options)
            if engines_per_gpu > 1:  # sized here, where the GPU is visible: the driver may have none
                total = visible_gpu_total_gib() or ASSUMED_GPU_GIB
                opts, self.memory_plan = opts.for_shared_gpu(engines_per_gpu, total)
                if self.memory_plan is not None:
                    log.info("%s engine %d per GPU on a %.0f GiB card: %s", opts.engine_name, engines_per_gpu,
                             total, opts.set_values())
            self.engine = create_engine(opts, profile=profile, **runtime)
        self.batches = 0
        self._lock = threading.Lock()  # guards the queue/thread hand-over
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def info(self) -> dict:
        import ray

        return {"name": getattr(self.engine, "name", type(self.engine).__name__),
                "simulated": bool(getattr(self.engine, "simulated", False)), "pid": os.getpid(),
                "cpu_s": time.process_time(), "memory_plan": self.memory_plan,
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []}  # never init Ray

    def ping(self) -> bool:
        return True

    def profile(self, start: bool, prefix: str | None = None) -> bool:
        """Start or stop the engine's profiler (benchmarks); False when the engine has none."""
        fn = getattr(self.engine, "start_profile" if start else "stop_profile", None)
        if fn is None:
            return False
        fn(prefix) if start else fn()
        return True

    def engine_stats(self) -> dict:
        """The engine's own counters (e.g. a paced simulated engine's busy seconds)."""
        return dict(getattr(self.engine, "stats", {}) or {})

    def cpu_seconds(self) -> float:
        """CPU time this actor's process has used (engine and transfers)."""
        return time.process_time()

    def generate(self, payload: tuple) -> tuple:
        """A batch as columns in (see `to_columns`), answers as columns out: ~20x cheaper to move between
        processes than lists of dataclasses. The last element is the batch's seconds in this actor (queued
        and in the engine; batches overlap when the engine streams)."""
        batch = from_columns(payload)
        fut: cf.Future = cf.Future()
        batch.tag = fut  # engines pass tags through: the engine thread answers this future
        t0 = time.perf_counter()
        with self._lock:
            self.batches += 1
            self._queue.put(batch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="densify-engine", daemon=True)
                self._thread.start()
        out = self._wait(fut)
        if out is None:
            return ()
        if len(out) != len(batch.queries):
            raise EngineError(f"engine returned {len(out)} answers for {len(batch.queries)} queries")
        return ([c.text for c in out], [c.logprob for c in out], [c.n_prompt_tokens for c in out],
                [c.n_generated_tokens for c in out], [c.cached_prompt_tokens for c in out],
                [c.error for c in out], time.perf_counter() - t0)

    @staticmethod
    def _wait(fut: cf.Future) -> list[Completion] | None:
        import ray

        while True:
            try:
                return fut.result(timeout=0.2)
            except cf.TimeoutError:
                pass
            # ray.cancel only flags a running call of a threaded actor: drop the batch if still queued.
            # None, not an exception: the driver has dropped this call, and Ray would log the error.
            if ray.get_runtime_context().is_canceled():
                fut.cancel()
                return None

    def _run(self) -> None:
        """The engine thread. When the engine raises, the batches it holds get the exception (the driver
        retries them) and a new stream takes the queued ones, which the engine never saw. An engine without
        `stream` holds one batch at a time, so the source never answers it with None."""
        while True:
            held: set = set()  # futures of batches handed to the engine and not yet answered
            state = {"stop": False, "pulled": 0}

            def feed():
                while True:
                    if held:  # the engine is busy: never block it
                        try:
                            b = self._queue.get_nowait()
                        except queue.Empty:
                            yield None
                            continue
                    else:
                        b = self._queue.get()
                    if b is _STOP:
                        state["stop"] = True
                        return
                    if not b.tag.set_running_or_notify_cancel():  # cancelled while queued
                        continue
                    held.add(b.tag)
                    state["pulled"] += 1
                    yield b

            err: BaseException | None = None
            try:
                for b, outs in generate_stream(self.engine, feed()):
                    held.discard(b.tag)
                    _settle(b.tag, outs)
                if held:
                    err = EngineError(f"the engine's stream ended with {len(held)} batch(es) unanswered")
            except BaseException as exc:  # noqa: BLE001 - every waiting call must hear of it
                err = exc
                log.error("engine stream failed with %d batch(es) in it: %s", len(held), short_error(exc))
                if getattr(self.engine, "dead", False):
                    self._restart()
            for f in held:
                _settle(f, exc=err)
            if state["stop"] or state["pulled"] == 0:  # closing, or a stream that fails before taking any
                with self._lock:
                    self._thread = None
                    rest = []
                    while not self._queue.empty():
                        rest.append(self._queue.get_nowait())
                why = err or EngineError("the actor is closing" if state["stop"] else
                                         "the engine's stream ended without taking a batch")
                for b in rest:
                    if b is not _STOP:
                        _settle(b.tag, exc=why)
                return

    def _restart(self) -> None:
        """End this process so that Ray restarts the actor with a new engine (its engine cannot answer
        again). No call is answered first: the driver sees the actor die and resubmits every batch it
        held, none charged an attempt when it held several (an engine core that runs out of memory is
        seldom the fault of one batch)."""
        log.error("the engine is dead; exiting so that Ray restarts this actor with a new engine")
        closer = threading.Thread(target=self._close_engine, daemon=True)  # free the GPU, end the engine core
        closer.start()
        closer.join(timeout=30)
        os._exit(1)

    def _close_engine(self) -> None:
        try:
            self.engine.close()
        except BaseException as exc:  # noqa: BLE001 - exiting anyway
            log.warning("closing the dead engine: %s", short_error(exc))

    def close(self) -> None:
        with self._lock:
            thread = self._thread
            if thread is not None:
                self._queue.put(_STOP)
        if thread is not None:
            thread.join(timeout=60)
        self.engine.close()


def _settle(fut: cf.Future, result: Any = None, exc: BaseException | None = None) -> None:
    """Answer a batch's future unless it is already done (cancelled by its caller)."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except cf.InvalidStateError:
        pass


def to_columns(batch: EngineBatch) -> tuple:
    """A batch without its tag, queries as columns."""
    qs = batch.queries
    return (batch.images, [q.text for q in qs], [q.image_uids for q in qs], [q.question for q in qs],
            batch.sampling)


def from_columns(payload: tuple) -> EngineBatch:
    images, texts, uids, questions, sampling = payload
    return EngineBatch(images, [Query(t, u, qn) for t, u, qn in zip(texts, uids, questions)], sampling)


def completions_from_columns(cols: tuple) -> list[Completion]:
    return [Completion(t, lp, npt, ngt, cpt, err) for t, lp, npt, ngt, cpt, err in zip(*cols[:6])]


_ACTOR_CLASS = None


def _typed(name: str, options: dict) -> tuple[EngineOptions, dict]:
    """A registered engine's keyword options as its typed options and its Python-only arguments."""
    config, runtime = split_runtime(name, options)
    return validate_engine_options(name, config), runtime


def actor_class():
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        import ray

        _ACTOR_CLASS = ray.remote(_EngineActor)
    return _ACTOR_CLASS


def short_error(exc: BaseException, limit: int = 300) -> str:
    cause = getattr(exc, "cause", None)  # RayTaskError: the exception the engine raised
    if isinstance(cause, BaseException) and cause is not exc:
        exc = cause
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"
