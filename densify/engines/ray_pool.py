"""A pool of Ray actors, each running one engine; whole images are routed to actors, never single queries.

Each `EngineBatch` (all queries of one image) goes to one actor, except that a batch arriving while
several actors sit idle is split between them (`split_min_queries`), so one image at a time keeps every
engine busy; its answers come back as one batch, in order. Every actor holds a few batches
(`max_in_flight_per_actor`) so it never waits between images; an engine with its own `stream` (vllm,
openai) gets them all at once, so it works on the next image while the last one finishes. `stream` pulls no
more batches from its input than the pool can hold in flight (backpressure), yielding each batch as soon as
its answers are back.

Faults: an actor that dies (segfault, OOM kill, lost node) is restarted by Ray (`actor_max_restarts`);
its unfinished batches are resubmitted, to another actor when there is one, up to `max_retries` times each.
A batch that still fails gets one `Completion(text="", error=...)` per query, so the caller records a
failure for that image and goes on. Batch tags stay on the driver (they may hold large or unpicklable
objects) and are reattached to the results.

    engine = RayPoolEngine("vlm3-depth", engine="vllm", engine_options={"model": "..."}, num_gpus_per_actor=1)
    engine = create_engine(RayOptions(engine="vllm", engine_options=VLLMOptions(model="...")), profile=...)
    for batch, completions in engine.stream(batches):
        ...
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from densify.config.profiles import Profile
from densify.engines.base import Completion, Engine, EngineBatch, EngineError, EngineStartError
from densify.engines.options import EngineOptions, OptionsError, RayOptions
from densify.engines.ray_actor import EngineSpec, actor_class, completions_from_columns, short_error, to_columns
from densify.engines.registry import options_model, pool_default_engine, split_runtime
from densify.engines.vllm_memory import AUTO_ENGINES_PER_GPU, AUTO_ENGINES_PER_GPU_FP8

__all__ = ["RayPoolEngine", "init_ray", "AUTO_ENGINES_PER_GPU", "AUTO_ENGINES_PER_GPU_FP8", "resolve_engines_per_gpu"]

log = logging.getLogger("densify.ray")


def resolve_engines_per_gpu(engines_per_gpu: int | str, engine: EngineSpec, engine_options: dict | EngineOptions,
                            num_gpus_per_actor: float, num_actors: int | None = None) -> int:
    """How many engines share each GPU (RayOptions.engines_per_gpu_for). "auto": what the actors' engine
    says (VLLMOptions.auto_engines_per_gpu: AUTO_ENGINES_PER_GPU, AUTO_ENGINES_PER_GPU_FP8 with fp8 weights,
    on whole GPUs unless the memory is sized by hand or num_actors is given), 1 for a factory; an explicit
    K > 1 needs num_gpus_per_actor=1, and num_actors then counts engines, not GPUs. `engine_options`: typed,
    or the keyword options of the named engine."""
    if not (engines_per_gpu == "auto" or (isinstance(engines_per_gpu, int) and not isinstance(engines_per_gpu, bool))):
        raise ValueError(f"engines_per_gpu must be 'auto' or a whole number, got {engines_per_gpu!r}")
    if isinstance(engine_options, EngineOptions):
        inner = engine_options
    elif isinstance(engine, str):
        inner = options_model(engine).parse(split_runtime(engine, dict(engine_options or {}))[0])
    else:  # a factory: one engine per GPU unless told
        inner = None
    if engines_per_gpu == "auto" and inner is None:
        return 1
    pool = RayOptions.model_construct(engines_per_gpu=engines_per_gpu, num_gpus_per_actor=num_gpus_per_actor,
                                      num_actors=num_actors, engine=inner.engine_name if inner else pool_default_engine(),
                                      engine_options=inner)
    return pool.engines_per_gpu_for()


def init_ray(**kwargs) -> None:
    """`ray.init`, keeping a SIGTERM handler the process installed: ray.init puts in its own (sys.exit(15)) and
    its core worker a crash dump, which would skip the caller's cleanup (the CLI's summary and exit 143)."""
    import signal
    import threading

    import ray

    main = threading.current_thread() is threading.main_thread()
    old = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(**kwargs)
    finally:
        if callable(old):  # a Python handler; the default action (or none set from Python) is left to Ray
            signal.signal(signal.SIGTERM, old)


@dataclass
class _Slot:
    """One actor of the pool and what the driver knows about it."""

    index: int
    handle: Any
    in_flight: int = 0
    state: str = "ok"
    """ok: takes batches; probing: died, waiting for Ray's restart (a ping is out); dead: restarts used up."""
    failures: int = 0
    ping: Any = None
    jobs: list = field(default_factory=list)
    """Batches submitted and not yet back, oldest first. When the actor dies holding one, that one is the
    suspect (charged an attempt); holding several, none is charged and each is resubmitted to run alone
    (`_Job.isolate`)."""
    suspect: Any = None


@dataclass(eq=False)  # jobs are told apart by identity: comparing fields would compare pixel arrays
class _Job:
    batch: EngineBatch
    payload: Any
    """ObjectRef of the batch without its tag, put once and reused by retries."""
    attempts: int = 0
    """Failed attempts charged to this batch (it was running when its actor died, or its engine raised)."""
    requeues: int = 0
    """Resubmissions, not charged, after an actor died holding this batch and others."""
    last_slot: int | None = None
    errors: list[str] = field(default_factory=list)
    isolate: bool = False
    """Run alone on an actor: it was one of several batches on an actor that died, so which of them
    killed it is unknown (a threaded actor runs its calls in no set order)."""
    split: "_Split | None" = None
    part: int = 0
    """This job is part `part` of a batch split between idle actors."""


@dataclass
class _Split:
    """A batch split between idle actors: whole again, queries in their order, once every part is back."""

    batch: EngineBatch
    parts: list  # each part's completions, None until it is back

    def put(self, part: int, completions: list[Completion]) -> list[Completion] | None:
        self.parts[part] = completions
        return None if any(p is None for p in self.parts) else [c for p in self.parts for c in p]


_DEAD_ERRORS: tuple = ()


def _dead_errors() -> tuple:
    global _DEAD_ERRORS
    if not _DEAD_ERRORS:
        import ray.exceptions as rx

        _DEAD_ERRORS = (rx.RayActorError,)
    return _DEAD_ERRORS


def probe_address(address: str | None, timeout_s: float = 3.0) -> None:
    """An EngineStartError within seconds when a cluster address (host:port or ray://host:port) does not
    accept connections: ray.init would otherwise retry for minutes. 'auto' and None are Ray's to resolve."""
    import socket

    if not address or address == "auto" or address.startswith("local"):
        return
    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # Ray's own defaults and forms
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise EngineStartError(f"Ray could not start or connect (ray_address={address!r}): nothing accepts "
                               f"connections at {host}:{port} ({exc.strerror or exc}); start a cluster (`ray start "
                               f"--head`) or leave the address unset for a local one") from None


class RayPoolEngine(Engine):
    """Run an engine in `num_actors` Ray actors (one per GPU when GPUs are requested).

    Options: densify.engines.options.RayOptions, typed (as a config holds them: `engine_options` are then
    the actors' engine's typed options), or in Python as keywords: `engine` (a registered name, or a
    factory called as factory(profile=..., **engine_options)) and `engine_options` (that engine's options
    and its Python-only arguments such as `truth`), checked here. A fractional `num_gpus_per_actor` (e.g.
    0.5) runs several engines on one GPU (give each a matching gpu_memory_utilization); such actors start one
    by one (`start_one_by_one`, default: when fractional). `engines_per_gpu` (K, default "auto": see
    `resolve_engines_per_gpu`) does that for you: actors ask for 1/K GPU each, `num_actors` defaults to GPUs
    x K, and each actor sizes its engine's memory, steps and CUDA graphs to fit K on its card
    (`EngineOptions.for_shared_gpu`; options given win). A batch of at least 2 x `split_min_queries` queries
    that arrives while several actors are idle is split between them (0: never split). `cpu_workers`: CPUs
    that the default actor count of a CPU-only pool leaves free (for the stage's CPU workers).
    """

    name = RayOptions.engine_name

    def __init__(self, profile: Profile | str, options: RayOptions | None = None, *, engine: EngineSpec | None = None,
                 engine_options: dict | None = None, **kwargs):
        import ray

        runtime: dict = {}
        if options is not None:
            if engine is not None or engine_options is not None or kwargs:
                raise TypeError("the Ray pool takes typed options or keyword options, not both")
            opts = RayOptions.given(options, {})
            spec: EngineSpec = opts.inner
        elif engine is not None and not isinstance(engine, str):  # a factory (tests, benchmarks)
            opts = RayOptions.parse(kwargs)
            spec, runtime = engine, dict(engine_options or {})
        else:
            name = engine if engine is not None else pool_default_engine()
            inner, runtime = split_runtime(name, dict(engine_options or {}))  # KeyError: no such engine
            try:
                opts = RayOptions.parse({**kwargs, "engine": name, "engine_options": inner})
            except OptionsError as exc:
                if ".engine_options." not in str(exc):
                    raise
                raise EngineStartError(f"the {name} engine could not start: {exc}") from None
            spec = opts.inner
        self.options = opts
        self.profile = profile
        self.engine_spec = spec
        self.max_in_flight = int(opts.max_in_flight_per_actor)
        self.split_min_queries = int(opts.split_min_queries)
        self.spare_cpus = int(opts.cpu_workers)
        self.max_retries = int(opts.max_retries)
        self.actor_max_restarts = int(opts.actor_max_restarts)
        self.start_one_by_one = opts.start_one_by_one
        num_gpus_per_actor = opts.num_gpus_per_actor
        if isinstance(spec, EngineOptions):
            self.engines_per_gpu = opts.engines_per_gpu_for()
        else:
            self.engines_per_gpu = resolve_engines_per_gpu(opts.engines_per_gpu, spec, {}, num_gpus_per_actor,
                                                           opts.num_actors)
        self.memory_plan: dict | None = None  # what each actor's engine was given, when they share GPUs
        if self.engines_per_gpu > 1:
            num_gpus_per_actor = 1.0 / self.engines_per_gpu
        # Counters, and seconds: engine_s actors spent in the engine, wait_s the driver waited on actors,
        # put_s putting batches into the object store; actor_cpu_s (set by close) the actors' CPU time.
        # failed_batches counts the parts of a split batch one by one.
        self.stats = {"batches": 0, "retries": 0, "requeued": 0, "actor_failures": 0, "failed_batches": 0,
                      "dead_actors": 0, "split_batches": 0, "engine_s": 0.0, "wait_s": 0.0, "put_s": 0.0}
        self._started_ray = False
        self._slots: list[_Slot] = []
        self._pg = None  # the placement group of K engines per GPU on several GPUs
        self._cpu0 = 0.0
        runtime_env = opts.runtime_env
        if not ray.is_initialized():
            # A local Ray by default (or the cluster RAY_ADDRESS names); `address` for an existing cluster.
            # close() shuts down what this call started: the local Ray, or this driver's connection.
            probe_address(opts.address)
            try:
                init_ray(address=opts.address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                         configure_logging=False, runtime_env=runtime_env)
            except Exception as exc:  # no cluster at that address, a bad address, ...
                raise EngineStartError(f"Ray could not start or connect (ray_address={opts.address!r}): "
                                       f"{short_error(exc)}; start a cluster (`ray start --head`) or leave the "
                                       f"address unset for a local one") from None
            self._started_ray = True
            runtime_env = None  # the job's runtime_env now applies to every actor
        try:
            self._start_actors(spec, runtime, opts.num_actors, num_gpus_per_actor, opts.num_cpus_per_actor,
                               runtime_env, opts.startup_timeout_s)
        except BaseException:
            self.close()
            raise

    # -- setup
    def _start_actors(self, engine, options, num_actors, num_gpus, num_cpus, runtime_env, timeout_s) -> None:
        """engine: the actors' engine (typed options, or a factory); options: its Python-only arguments
        (a factory's keywords)."""
        import ray

        res = ray.cluster_resources()
        for what, per_actor in (("GPU", num_gpus), ("CPU", num_cpus)):
            if per_actor > res.get(what, 0):  # could never be placed: say so now, not after the startup timeout
                raise EngineStartError(f"each Ray actor asks for {per_actor:g} {what} but the cluster has "
                                       f"{res.get(what, 0):g} (resources: {dict(res)}); lower "
                                       f"num_{what.lower()}s_per_actor or use a cluster with {what}s")
        if num_actors is None:
            if self.engines_per_gpu > 1:
                num_actors = int(res.get("GPU", 0)) * self.engines_per_gpu
            elif num_gpus > 0:
                num_actors = int(res.get("GPU", 0) // num_gpus)
            else:
                num_actors = int((res.get("CPU", 1) - self.spare_cpus) // max(num_cpus, 1e-9))
        num_actors = max(1, int(num_actors))
        # K engines per GPU get whole GPUs (a placement-group bundle each); else each actor its share
        gpus = -(-num_actors // self.engines_per_gpu) if self.engines_per_gpu > 1 else num_actors * num_gpus
        for what, total in (("GPU", gpus), ("CPU", num_actors * num_cpus)):
            if total > res.get(what, 0) + 1e-9:  # some actors could never start: say so now, not after the timeout
                raise EngineStartError(f"{num_actors} Ray actors need {total:g} {what}s in all but the cluster has "
                                       f"{res.get(what, 0):g}; lower num_actors or num_{what.lower()}s_per_actor, "
                                       f"or use a larger cluster")
        # threaded: all batches in flight reach a streaming engine at once, and pings answer meanwhile
        opts: dict = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_restarts": self.actor_max_restarts,
                      "max_task_retries": 0, "max_concurrency": self.max_in_flight + 4}
        if runtime_env is not None:
            opts["runtime_env"] = runtime_env
        cls = actor_class().options(**opts)
        # Actors that share a GPU start one after another: vLLM sizes its KV cache from a memory profile that
        # fails (or comes out wrong) when another process allocates on the GPU meanwhile. With K engines on
        # each of G GPUs, a placement group gives every GPU its bundle and the actors start in K rounds of G,
        # one per GPU in each round (so a start takes K engine starts, not K x G).
        one_by_one = self.start_one_by_one if self.start_one_by_one is not None else 0 < num_gpus < 1
        classes = [cls] * num_actors
        groups = [[i] for i in range(num_actors)] if one_by_one else [list(range(num_actors))]
        if one_by_one and self.engines_per_gpu > 1 and num_actors > self.engines_per_gpu:
            classes, groups = self._per_gpu_rounds(opts, num_actors, num_cpus, timeout_s)
        infos, deadline = [], time.monotonic() + timeout_s
        for group in groups:
            slots = [_Slot(i, classes[i].remote(engine, self.profile, options, self.engines_per_gpu)) for i in group]
            self._slots.extend(slots)
            refs = [s.handle.info.remote() for s in slots]
            ready, not_ready = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))
            if not_ready:
                raise EngineStartError(f"{len(not_ready)} of {num_actors} Ray actors did not start within {timeout_s:.0f} "
                                  f"s; the cluster has {res}; each actor asks for {num_cpus} CPU and {num_gpus} GPU "
                                  f"(lower num_actors or the per-actor resources)")
            try:
                infos += ray.get(refs)
            except Exception as exc:  # an engine that cannot be built: say why, once
                raise EngineStartError(f"the engine could not start in a Ray actor: {short_error(exc)}") from None
        self._cpu0 = sum(i["cpu_s"] for i in infos)
        self.inner_name = infos[0]["name"]
        self.simulated = infos[0]["simulated"]
        self.memory_plan = infos[0].get("memory_plan")
        log.info("Ray pool: %d actor(s) running %s (%s CPU, %s GPU each, %d per GPU, %d batches in flight each)",
                 num_actors, self.inner_name, num_cpus, num_gpus, self.engines_per_gpu, self.max_in_flight)

    def _per_gpu_rounds(self, opts: dict, num_actors: int, num_cpus: float, timeout_s: float) -> tuple[list, list]:
        """Actor classes bound to one placement-group bundle per GPU, and the start rounds (one actor per GPU
        each): actor i shares GPU i % G with the actors i +- G, 2G, ..."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        k = self.engines_per_gpu
        n_gpus = -(-num_actors // k)
        self._pg = placement_group([{"GPU": 1, "CPU": k * num_cpus}] * n_gpus, strategy="PACK")
        ready, _ = ray.wait([self._pg.ready()], timeout=timeout_s)
        if not ready:
            raise EngineStartError(f"Ray could not reserve {n_gpus} whole GPU(s) with {k * num_cpus:g} CPU each for "
                                   f"{num_actors} engines ({k} per GPU) within {timeout_s:.0f} s; the cluster has "
                                   f"{ray.cluster_resources()}")
        classes = [actor_class().options(**opts, scheduling_strategy=PlacementGroupSchedulingStrategy(
            self._pg, placement_group_bundle_index=i % n_gpus)) for i in range(num_actors)]
        rounds = [list(range(r, min(r + n_gpus, num_actors))) for r in range(0, num_actors, n_gpus)]
        return classes, rounds

    @property
    def num_actors(self) -> int:
        return sum(s.state != "dead" for s in self._slots)

    @property
    def actors(self) -> list:
        """The actor handles (for tests and diagnostics)."""
        return [s.handle for s in self._slots]

    def engine_stats(self) -> list[dict]:
        """Each live actor's engine counters (e.g. paced simulated engines' busy seconds)."""
        import ray

        refs = [s.handle.engine_stats.remote() for s in self._slots if s.state == "ok"]
        try:
            return list(ray.get(refs, timeout=30))
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            log.warning("engine counters of the actors: %s", exc)
            return []

    @property
    def capacity(self) -> int:
        """Batches the pool holds at once: live actors x batches in flight per actor."""
        return max(1, self.num_actors) * self.max_in_flight

    # -- the protocol
    def generate(self, batch: EngineBatch) -> list[Completion]:
        for _, completions in self.stream([batch]):
            return completions
        raise EngineError("the Ray pool returned no answers")  # not reached

    def stream(self, batches: Iterable[EngineBatch]) -> Iterator[tuple[EngineBatch, list[Completion]]]:
        """Yield (batch, completions) as batches finish, in completion order; never more than `capacity`
        batches are taken from `batches` and not yet yielded. A None from `batches` means "nothing new yet":
        the pool waits a few milliseconds for answers, then asks again."""
        import ray

        it = iter(batches)
        exhausted = False
        pending: dict = {}            # ObjectRef -> (_Job, _Slot) for generate calls
        pings: dict = {}              # ObjectRef -> _Slot
        retry: deque[_Job] = deque()
        done: deque[tuple[EngineBatch, list[Completion]]] = deque()
        outstanding = 0               # taken from `it` and not yet yielded

        def submit(job: _Job) -> bool:
            slot = self._pick(job.last_slot, alone=job.isolate)
            if slot is None:
                return False
            ref = slot.handle.generate.remote(job.payload)
            slot.in_flight += 1
            slot.jobs.append(job)
            job.last_slot = slot.index
            pending[ref] = (job, slot)
            return True

        def deliver(job: _Job, completions: list[Completion]) -> None:
            if job.split is None:
                done.append((job.batch, completions))
            elif (whole := job.split.put(job.part, completions)) is not None:
                done.append((job.split.batch, whole))

        def fail(job: _Job, reason: str) -> None:
            self.stats["failed_batches"] += 1
            msg = f"Ray pool: batch failed after {job.attempts} attempt(s): {reason}"
            log.error("%s", msg)
            deliver(job, [Completion(text="", error=msg) for _ in job.batch.queries])

        try:
            while True:
                idle = False  # the source said it has nothing new right now
                if self.num_actors == 0:  # every actor used up its restarts: fail what is left, keep going
                    for job in list(retry) + [j for j, _ in pending.values()]:
                        fail(job, "no live actors left (all used up their restarts); " + "; ".join(job.errors[-1:]))
                    retry.clear()
                    pending.clear()
                while retry and submit(retry[0]):
                    retry.popleft()
                while not exhausted and outstanding < self.capacity and not retry:
                    try:
                        batch = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    if batch is None:
                        idle = True
                        break
                    outstanding += 1
                    self.stats["batches"] += 1
                    if not batch.queries:
                        done.append((batch, []))
                        continue
                    if self.num_actors == 0:
                        fail(_Job(batch, None), "no live actors left")
                        continue
                    for job in self._split(batch):
                        tp = time.perf_counter()
                        job.payload = ray.put(to_columns(job.batch))
                        self.stats["put_s"] += time.perf_counter() - tp
                        if retry or not submit(job):
                            retry.append(job)
                    if retry:
                        break
                while done:
                    outstanding -= 1
                    yield done.popleft()
                if not pending and not pings:
                    if exhausted and not retry:
                        return
                    if not retry:
                        if idle:
                            time.sleep(0.001)
                        continue  # input left and room to pull
                waiting = list(pending) + list(pings)
                if not waiting:
                    # retries waiting for a slot but no call out: nothing will free one
                    for job in retry:
                        fail(job, "no actor available")
                    retry.clear()
                    continue
                tw = time.perf_counter()
                ready, _ = ray.wait(waiting, num_returns=1, timeout=0.005 if idle else None)
                self.stats["wait_s"] += time.perf_counter() - tw
                for ref in ready:
                    if ref in pings:
                        self._on_ping(pings.pop(ref), ref, pings)
                        continue
                    job, slot = pending.pop(ref)
                    try:
                        cols = ray.get(ref)
                    except _dead_errors() as exc:
                        self.stats["actor_failures"] += 1
                        self._on_actor_error(slot, pings)
                        charged = job is slot.suspect or job.requeues >= 4 * (self.max_retries + 1)
                        self._forget(slot, job)
                        self._retry_or_fail(job, f"actor {slot.index} died: {short_error(exc)}", retry, fail,
                                            charge=charged)
                        continue
                    except Exception as exc:  # the engine raised, or the batch's object was lost
                        self._forget(slot, job)
                        self._retry_or_fail(job, f"actor {slot.index}: {short_error(exc)}", retry, fail)
                        continue
                    self._forget(slot, job)
                    if slot.state == "ok":
                        slot.failures = 0
                    job.payload = None
                    self.stats["engine_s"] += cols[6]
                    deliver(job, completions_from_columns(cols))
                while done:
                    outstanding -= 1
                    yield done.popleft()
        finally:
            if ray.is_initialized():  # never after close(): ray.cancel would start a new local Ray
                for ref in pending:
                    ray.cancel(ref, force=False)

    # -- internals
    def _split(self, batch: EngineBatch) -> list[_Job]:
        """One job for the batch, or one per idle actor (contiguous runs of its queries) when several are
        idle and the batch is large enough to keep them all busy."""
        idle = sum(s.state == "ok" and s.in_flight == 0 for s in self._slots)
        k = min(idle, len(batch.queries) // self.split_min_queries) if self.split_min_queries > 0 else 0
        if k < 2:
            return [_Job(batch, None)]
        self.stats["split_batches"] += 1
        cuts = [len(batch.queries) * i // k for i in range(k + 1)]
        split = _Split(batch, [None] * k)
        return [_Job(dataclasses.replace(batch, queries=batch.queries[a:b], tag=None), None, split=split, part=i)
                for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]

    def _pick(self, avoid: int | None, alone: bool = False) -> _Slot | None:
        if alone:  # an idle actor, which takes nothing else meanwhile
            free = [s for s in self._slots if s.state == "ok" and s.in_flight == 0]
        else:
            free = [s for s in self._slots if s.state == "ok" and s.in_flight < self.max_in_flight
                    and not any(j.isolate for j in s.jobs)]
        if not free:
            return None
        others = [s for s in free if s.index != avoid]
        return min(others or free, key=lambda s: (s.in_flight, s.index))

    @staticmethod
    def _forget(slot: _Slot, job: _Job) -> None:
        slot.in_flight -= 1
        # by identity: two jobs of one image (a split batch, an image listed twice) are distinct jobs
        slot.jobs[:] = [j for j in slot.jobs if j is not job]

    def _retry_or_fail(self, job: _Job, reason: str, retry: deque, fail, *, charge: bool = True) -> None:
        job.errors.append(reason)
        if not charge:  # one of several batches on an actor that died: resubmit, no attempt used
            job.requeues += 1
            self.stats["requeued"] += 1
            retry.append(job)
            return
        job.attempts += 1
        if job.attempts > self.max_retries:
            fail(job, reason)
        else:
            self.stats["retries"] += 1
            log.warning("Ray pool: retrying a batch (attempt %d of %d): %s", job.attempts + 1,
                        self.max_retries + 1, reason)
            retry.append(job)

    def _on_actor_error(self, slot: _Slot, pings: dict) -> None:
        """Stop routing to a failed actor and ping it: the ping answers once Ray has restarted it."""
        if slot.state != "ok":
            return
        # One batch on it: that one is charged an attempt. Several: none is charged, and each runs alone
        # next time, so the one that kills its actor again is the one charged.
        slot.suspect = slot.jobs[0] if len(slot.jobs) == 1 else None
        if len(slot.jobs) > 1:
            for j in slot.jobs:
                j.isolate = True
        slot.failures += 1
        slot.state = "probing"
        log.warning("Ray pool: actor %d died; waiting for Ray to restart it", slot.index)
        pings[slot.handle.ping.remote()] = slot

    def _on_ping(self, slot: _Slot, ref, pings: dict) -> None:
        import ray

        try:
            ray.get(ref)
        except Exception as exc:
            slot.failures += 1
            if slot.failures > self.actor_max_restarts + 1:
                slot.state = "dead"
                self.stats["dead_actors"] += 1
                log.error("Ray pool: actor %d is gone (restarts used up): %s", slot.index, short_error(exc))
                ray.kill(slot.handle, no_restart=True)
            else:
                pings[slot.handle.ping.remote()] = slot
            return
        slot.state = "ok"
        slot.suspect = None
        log.info("Ray pool: actor %d is back", slot.index)

    def close(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        live = [s.handle.cpu_seconds.remote() for s in self._slots if s.state == "ok"]
        if live:
            ready, _ = ray.wait(live, num_returns=len(live), timeout=5)
            try:
                # CPU time the actors used after their engines were built (approximate after a restart)
                self.stats["actor_cpu_s"] = float(sum(ray.get(ready))) - self._cpu0
            except Exception:  # an actor died on the way out: no total
                pass
        for s in self._slots:
            try:
                ray.kill(s.handle, no_restart=True)
            except Exception:  # already gone
                pass
        self._slots = []
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self._pg)
            except Exception:  # the cluster is gone
                pass
            self._pg = None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> "RayPoolEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
