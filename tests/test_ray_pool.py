"""The Ray actor pool engine on CPU actors: same answers as in-process, streaming with backpressure, tags
kept on the driver, actors killed mid-run, and the depth pipeline through the pool."""

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from densify.config.profiles import load_profile  # noqa: E402
from densify.engines import EngineBatch, RayOptions, create_engine  # noqa: E402
from densify.engines.base import Completion, Engine, ImageRef, PromptImage, Query, Sampling  # noqa: E402
from densify.engines.ray_pool import RayPoolEngine  # noqa: E402
from densify.queries.prompts import render_text  # noqa: E402
from densify.sim.engine import SimulatedEngine  # noqa: E402
from densify.sim.truth import Truth  # noqa: E402

PROFILE = load_profile("vlm3-depth")


class SeededTruth(Truth):
    """The depth of test image img<i>: the same random map make_batch's seed gives, in any process."""

    def depth(self, ref):
        rng = np.random.default_rng(int(ref.id[3:]))
        rng.random((48, 64, 3))
        return (1 + rng.random((48, 64)) * 4).astype(np.float32)


TRUTH = SeededTruth()

# Engines defined here run inside Ray workers, which cannot import this test module: ship them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class CrashingEngine(Engine):
    """The simulated engine, except that its worker process dies (os._exit) on its `crash_on`-th batch
    (once per `flag` file, so the restarted actor carries on), on every batch of image `poison_uid`, or
    raises on every batch of image `raise_uid`."""

    name = "crashing"
    simulated = True

    def __init__(self, profile, *, crash_on=None, flag=None, poison_uid=None, raise_uid=None, **options):
        self.inner = SimulatedEngine(profile, **options)
        self.crash_on, self.flag, self.poison_uid, self.raise_uid = crash_on, flag, poison_uid, raise_uid
        self.n = 0

    def generate(self, batch):
        self.n += 1
        if self.poison_uid in batch.images:
            os._exit(1)
        if self.raise_uid in batch.images:
            raise RuntimeError("engine failed on this image")
        if self.n == self.crash_on and self.flag and not os.path.exists(self.flag):
            Path(self.flag).touch()
            os._exit(1)
        return self.inner.generate(batch)

    def close(self):
        pass


class StreamingEngine(Engine):
    """The simulated engine behind a `stream` that takes batches until it holds `hold` of them or its
    source has nothing new (None), then answers the oldest after `delay` seconds. It writes the most
    batches it held at once to the file `record`, and raises when it takes a batch of image `raise_uid`
    (only once when `flag` names a file, which it then creates)."""

    name = "streaming"
    simulated = True

    def __init__(self, profile, *, record=None, hold=3, delay=0.05, raise_uid=None, flag=None, **options):
        self.inner = SimulatedEngine(profile, **options)
        self.record, self.hold, self.delay, self.raise_uid, self.flag = record, hold, delay, raise_uid, flag
        self.most = 0

    def generate(self, batch):
        return self.inner.generate(batch)

    def stream(self, batches):
        it, held, exhausted = iter(batches), [], False
        while True:
            while not exhausted and len(held) < self.hold:
                try:
                    b = next(it)
                except StopIteration:
                    exhausted = True
                    break
                if b is None:
                    if held:
                        break
                    time.sleep(0.001)
                    continue
                if self.raise_uid in b.images and not (self.flag and os.path.exists(self.flag)):
                    if self.flag:
                        Path(self.flag).touch()
                    raise RuntimeError("engine stream failed")
                held.append(b)
                if len(held) > self.most and self.record:
                    self.most = len(held)
                    Path(self.record).write_text(str(self.most))
            if not held:
                return
            time.sleep(self.delay)
            b = held.pop(0)
            yield b, self.inner.generate(b)

    def close(self):
        pass


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool():
    p = RayPoolEngine(PROFILE, engine="simulated", num_actors=2, max_in_flight_per_actor=2, engine_options={"truth": TRUTH})
    yield p
    p.close()


def make_batch(i: int, n: int = 200, logprobs: bool = False, tag=None) -> EngineBatch:
    rng = np.random.default_rng(i)
    uid = f"img{i}"
    px = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    queries = [Query(render_text(PROFILE, x=int(x), y=int(y)), (uid,)) for x, y in rng.integers(0, 2000, (n, 2))]
    return EngineBatch({uid: PromptImage(uid, px, ImageRef(uid, size=(64, 48)))}, queries, Sampling(logprobs=logprobs),
                       tag if tag is not None else i)


def test_answers_equal_the_in_process_engine(pool):
    batches = [make_batch(i, logprobs=True) for i in range(8)]
    local = SimulatedEngine(PROFILE, truth=TRUTH)
    got = {b.tag: c for b, c in pool.stream(batches)}
    assert sorted(got) == list(range(8))
    for b in batches:
        ref = local.generate(b)
        assert [c.text for c in got[b.tag]] == [c.text for c in ref]
        assert [c.logprob for c in got[b.tag]] == [c.logprob for c in ref]
    assert pool.simulated is True and pool.num_actors == 2
    assert pool.generate(batches[0])[5].text == local.generate(batches[0])[5].text


def test_tags_stay_on_the_driver_and_empty_batches_pass(pool):
    lock = threading.Lock()  # unpicklable: would fail if shipped to an actor
    tagged = make_batch(1, tag=("mine", lock))
    empty = EngineBatch({}, [], Sampling(), tag="empty")
    out = list(pool.stream([tagged, empty]))
    tags = {id(b.tag): c for b, c in out}
    assert tags[id(tagged.tag)] and tags[id(empty.tag)] == []
    assert [b for b, _ in out if b.tag == ("mine", lock)][0] is tagged


def test_streams_with_backpressure(pool):
    """Results come back while the input is still being read, and never more than capacity batches are
    taken from the input and not yet handed back."""
    pulled, received, gaps = [0], [0], []

    def source():
        for i in range(12):
            gaps.append(pulled[0] - received[0])
            pulled[0] += 1
            yield make_batch(100 + i, n=300)

    first_at = None
    for _ in pool.stream(source()):
        received[0] += 1
        if first_at is None:
            first_at = pulled[0]
    assert received[0] == 12
    assert first_at < 12  # the first answer came before the input was exhausted
    assert max(gaps) < pool.capacity == 4  # at the moment of each pull, fewer than capacity were out


def test_actor_dying_mid_run_loses_nothing(tmp_path):
    flag = tmp_path / "crashed"
    batches = [make_batch(200 + i) for i in range(10)]
    with RayPoolEngine(PROFILE, engine=CrashingEngine, engine_options={"truth": TRUTH, "crash_on": 2, "flag": str(flag)},
                       num_actors=2, max_retries=2) as p:
        got = {b.tag: c for b, c in p.stream(batches)}
        stats = dict(p.stats)
    assert flag.exists(), "the actor was supposed to crash"
    # the dead actor's batches went again: charged (one batch on it) or requeued to run alone (several)
    assert stats["actor_failures"] >= 1 and stats["retries"] + stats["requeued"] >= 1 and stats["failed_batches"] == 0
    local = SimulatedEngine(PROFILE, truth=TRUTH)
    for b in batches:
        assert all(c.error is None for c in got[b.tag])
        assert [c.text for c in got[b.tag]] == [c.text for c in local.generate(b)]


def test_batches_that_keep_failing_become_error_records(tmp_path):
    """A batch that kills its actor every time, or whose engine raises, fails after max_retries with one
    error completion per query; the other batches are answered."""
    batches = [make_batch(300 + i, n=50) for i in range(4)]
    with RayPoolEngine(PROFILE, engine=CrashingEngine, engine_options={"truth": TRUTH, "poison_uid": "img301", "raise_uid": "img302"},
                       num_actors=2, max_retries=1) as p:
        got = {b.tag: c for b, c in p.stream(batches)}
        stats = dict(p.stats)
    assert sorted(got) == [300, 301, 302, 303]
    for bad in (301, 302):
        assert len(got[bad]) == 50 and all(c.text == "" and c.error for c in got[bad])
    assert "died" in got[301][0].error and "engine failed" in got[302][0].error
    for good in (300, 303):
        assert all(c.error is None for c in got[good])
    assert stats["failed_batches"] == 2 and stats["retries"] >= 2


def test_unknown_engine_and_broken_engine_fail_early():
    with pytest.raises(KeyError):
        RayPoolEngine(PROFILE, engine="no-such-engine")
    from densify.engines.base import EngineError
    with pytest.raises(EngineError, match="could not start"):
        RayPoolEngine(PROFILE, engine="simulated", engine_options={"truth": TRUTH, "no_such_option": 1}, num_actors=1,
                      actor_max_restarts=0)


def test_a_pool_larger_than_the_cluster_stops_at_once_naming_both_numbers(monkeypatch):
    """Each actor fits, all of them do not: refused before any actor starts, not after the start timeout."""
    from densify.engines.base import EngineStartError

    t0 = time.monotonic()
    with pytest.raises(EngineStartError, match=r"9 Ray actors need 9 CPUs in all but the cluster has 8"):
        RayPoolEngine(PROFILE, engine="simulated", num_actors=9, engine_options={"truth": TRUTH}, startup_timeout_s=30)
    with pytest.raises(EngineStartError, match=r"3 Ray actors need 9 CPUs in all but the cluster has 8"):
        RayPoolEngine(PROFILE, engine="simulated", num_actors=3, num_cpus_per_actor=3, engine_options={"truth": TRUTH},
                      startup_timeout_s=30)
    assert time.monotonic() - t0 < 10
    # GPUs alike (the cluster here has none: pretend it has one)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(EngineStartError, match=r"3 Ray actors need 1.5 GPUs in all but the cluster has 1"):
        RayPoolEngine(PROFILE, engine="simulated", num_actors=3, num_gpus_per_actor=0.5, engines_per_gpu=1)
    with pytest.raises(EngineStartError, match=r"3 Ray actors need 2 GPUs in all but the cluster has 1"):
        RayPoolEngine(PROFILE, engine="vllm", num_actors=3, num_gpus_per_actor=1, engines_per_gpu=2)


def test_close_kills_the_actors():
    p = create_engine(RayOptions.parse({"engine": "simulated", "num_actors": 1}), profile=PROFILE)
    actor = p.actors[0]
    assert ray.get(actor.ping.remote())
    p.close()
    with pytest.raises(ray.exceptions.RayActorError):  # the kill is asynchronous: it lands within seconds
        for _ in range(100):
            ray.get(actor.ping.remote(), timeout=30)
            time.sleep(0.1)
    assert ray.is_initialized()  # the pool did not start Ray, so it leaves it running


def test_depth_pipeline_through_the_pool(tmp_path):
    import cv2
    from conftest import sidecar_metrics

    from densify.io.images import discover
    from densify.io.layout import RunLayout
    from densify.stages import build_engine
    from densify.stages.summary import run_depth
    from densify.stages.settings import DepthConfig

    rng = np.random.default_rng(5)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        img = cv2.resize((rng.random((30, 40, 3)) * 255).astype(np.uint8), (160, 120), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(src / f"v{i}.png"), img)
        np.save(src / f"v{i}.depth.npy", np.full((120, 160), 1.5 + i, np.float32))
    outputs = {"preview": False, "ply": False, "answers": False}
    cfg_ray = DepthConfig(engine={"name": "ray", "options": {"engine": "simulated", "num_actors": 2}}, plan={"count": 300},
                          outputs=outputs)
    cfg_local = DepthConfig(engine={"name": "simulated"}, plan={"count": 300}, outputs=outputs)
    runs = {}
    for name, cfg in (("ray", cfg_ray), ("local", cfg_local)):
        with build_engine(cfg.engine, PROFILE) as eng:
            runs[name], _ = run_depth(discover([src]), cfg, eng, RunLayout(tmp_path / name), evaluate=sidecar_metrics)
    s_ray, s_local = runs["ray"], runs["local"]
    assert s_ray["ok"] == 3 and s_ray["queries"] == s_local["queries"] and s_ray["simulated"]
    assert s_ray["metrics"]["dense"]["delta1"] > 0.8  # ground truth reached the actors (files beside the images)
    for i in range(3):
        a = (tmp_path / "ray" / f"v{i}" / "depth.npy").read_bytes()
        assert a == (tmp_path / "local" / f"v{i}" / "depth.npy").read_bytes()


def _stream_in_thread(pool, batches, timeout=120):
    """The pool's stream run in a thread: a hang fails the test instead of blocking it."""
    out: dict = {}

    def run():
        out["got"] = {b.tag: c for b, c in pool.stream(batches)}
        out["stats"] = dict(pool.stats)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(timeout)
    assert not th.is_alive(), "the pool's stream hung"
    return out["got"], out["stats"]


def test_actor_feeds_a_streaming_engine_several_batches_at_once(tmp_path):
    record = tmp_path / "most"
    batches = [make_batch(400 + i, n=100) for i in range(12)]
    with RayPoolEngine(PROFILE, engine=StreamingEngine, engine_options={"truth": TRUTH, "record": str(record)}, num_actors=1,
                       max_in_flight_per_actor=3) as p:
        got, stats = _stream_in_thread(p, batches)
        # the actor answers pings while its engine thread works
        assert ray.get(p.actors[0].ping.remote(), timeout=30)
    assert int(record.read_text()) >= 2
    assert sorted(got) == list(range(400, 412)) and stats["failed_batches"] == 0
    local = SimulatedEngine(PROFILE, truth=TRUTH)
    for b in batches:
        assert [c.text for c in got[b.tag]] == [c.text for c in local.generate(b)]
        assert all(c.error is None for c in got[b.tag])


def test_streaming_engine_that_raises_is_retried(tmp_path):
    """The engine's stream raising fails the batches it held; the pool retries them and the actor starts a
    new stream for the batches still queued."""
    batches = [make_batch(500 + i, n=30) for i in range(8)]
    opts = {"raise_uid": "img503", "flag": str(tmp_path / "raised"), "delay": 0.02, "truth": TRUTH}
    with RayPoolEngine(PROFILE, engine=StreamingEngine, engine_options=opts, num_actors=1,
                       max_in_flight_per_actor=3, max_retries=2) as p:
        got, stats = _stream_in_thread(p, batches)
    assert (tmp_path / "raised").exists()
    assert sorted(got) == list(range(500, 508))
    assert stats["retries"] >= 1 and stats["failed_batches"] == 0
    local = SimulatedEngine(PROFILE, truth=TRUTH)
    for b in batches:
        assert [c.text for c in got[b.tag]] == [c.text for c in local.generate(b)]


def test_streaming_engine_that_always_raises_gives_error_records():
    batches = [make_batch(600 + i, n=20) for i in range(6)]
    with RayPoolEngine(PROFILE, engine=StreamingEngine, engine_options={"truth": TRUTH, "raise_uid": "img602", "delay": 0.01},
                       num_actors=2, max_in_flight_per_actor=2, max_retries=1) as p:
        got, stats = _stream_in_thread(p, batches)
    assert sorted(got) == list(range(600, 606))
    assert len(got[602]) == 20 and all(c.text == "" and "engine stream failed" in c.error for c in got[602])
    assert stats["failed_batches"] >= 1 and stats["retries"] >= 1


def test_pool_source_may_yield_none(pool):
    """None from the source ("nothing new yet") neither counts as a batch nor ends the stream."""
    bs = [make_batch(800 + i, n=50) for i in range(3)]

    def source():
        yield None
        for b in bs:
            yield b
            yield None
            yield None

    got = _stream_in_thread(pool, source())[0]
    assert sorted(got) == [800, 801, 802] and all(len(c) == 50 for c in got.values())


class SlowStartEngine(SimulatedEngine):
    """Appends (start, end) of its construction to the file `log` (stands in for vLLM's memory profile)."""

    def __init__(self, profile, *, log, **options):
        t0 = time.time()
        time.sleep(0.8)
        super().__init__(profile, **options)
        with open(log, "a") as f:
            f.write(f"{t0} {time.time()}\n")


def test_actors_sharing_a_gpu_start_one_by_one(tmp_path):
    log = tmp_path / "starts.txt"
    pool = RayPoolEngine(PROFILE, engine=SlowStartEngine, engine_options={"truth": TRUTH, "log": str(log)}, num_actors=3,
                         start_one_by_one=True)
    try:
        spans = sorted(tuple(map(float, line.split())) for line in log.read_text().split("\n") if line)
        assert len(spans) == 3
        assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:])), spans  # no two constructions overlap
        outs = pool.generate(make_batch(1, n=20))
        assert len(outs) == 20 and all(o.error is None for o in outs)
    finally:
        pool.close()


class DyingEngine(SimulatedEngine):
    """Stands in for a vLLM engine whose engine core dies (CUDA OOM): on its first batch, once per `flag`
    file, it marks itself dead and raises; the actor must restart rather than fail every later batch."""

    name = "dying"

    def __init__(self, profile, *, flag, **options):
        super().__init__(profile, **options)
        self.flag, self.dead = flag, False

    def generate(self, batch):
        if self.dead:
            raise RuntimeError("EngineDeadError: the engine core is gone")
        if not os.path.exists(self.flag):
            Path(self.flag).touch()
            self.dead = True
            raise RuntimeError("EngineCore encountered a fatal error: CUDA error: out of memory")
        return super().generate(batch)


def test_a_dead_engine_restarts_its_actor_and_no_query_fails(tmp_path):
    flag = tmp_path / "died"
    batches = [make_batch(900 + i, n=40) for i in range(6)]
    with RayPoolEngine(PROFILE, engine=DyingEngine, engine_options={"truth": TRUTH, "flag": str(flag)}, num_actors=1,
                       max_in_flight_per_actor=2, max_retries=1) as p:
        pid0 = ray.get(p.actors[0].info.remote())["pid"]
        got = {b.tag: c for b, c in p.stream(batches)}
        stats = dict(p.stats)
        pid1 = ray.get(p.actors[0].info.remote())["pid"]
    assert flag.exists() and pid1 != pid0  # the same actor, restarted in a new process with a new engine
    assert stats["actor_failures"] >= 1 and stats["failed_batches"] == 0 and stats["dead_actors"] == 0
    local = SimulatedEngine(PROFILE, truth=TRUTH)
    for b in batches:
        assert all(c.error is None for c in got[b.tag])
        assert [c.text for c in got[b.tag]] == [c.text for c in local.generate(b)]


def test_engines_per_gpu_resolution():
    from densify.engines.ray_pool import resolve_engines_per_gpu as r

    assert r("auto", "vllm", {}, 1) == 2
    assert r("auto", "vllm", {"quantization": "fp8"}, 1) == 3  # fp8: a third engine still adds 6% (H200)
    assert r("auto", "vllm", {"quantization": "fp8", "gpu_memory_utilization": 0.9}, 1) == 1
    assert r("auto", "vllm", {"gpu_memory_utilization": 0.9}, 1) == 1  # sized by hand: one per GPU
    assert r("auto", "vllm", {}, 1, num_actors=8) == 1  # a count written as one actor per GPU stays so
    assert r(2, "vllm", {}, 1, num_actors=8) == 2
    assert r("auto", "vllm", {"tensor_parallel_size": 2}, 2) == 1
    assert r("auto", "vllm", {}, 0.5) == 1 and r("auto", "hf", {}, 1) == 1 and r("auto", "simulated", {}, 0) == 1
    assert r(3, "vllm", {}, 1) == 3 and r(1, "simulated", {}, 0) == 1
    for bad in (0, 1.5, "two"):
        with pytest.raises(ValueError):
            r(bad, "vllm", {}, 1)
    with pytest.raises(ValueError, match="num_gpus_per_actor"):
        r(2, "vllm", {}, 0.5)


def test_engines_per_gpu_shares_each_gpu(monkeypatch):
    seen = {}

    def fake_start(self, engine, runtime, num_actors, num_gpus, num_cpus, runtime_env, timeout_s):
        # the actors' engine arrives as its typed options; the options given are what was set
        seen.update(options=engine.set_values(), num_actors=num_actors, num_gpus=num_gpus, per_gpu=self.engines_per_gpu)
        raise RuntimeError("stop here")

    monkeypatch.setattr(RayPoolEngine, "_start_actors", fake_start)
    with pytest.raises(RuntimeError, match="stop here"):
        RayPoolEngine(PROFILE, engine="vllm", engine_options={"model": "m"}, num_gpus_per_actor=1, engines_per_gpu=3)
    assert seen["num_gpus"] == pytest.approx(1 / 3) and seen["per_gpu"] == 3 and seen["options"] == {"model": "m"}
    with pytest.raises(RuntimeError, match="stop here"):
        RayPoolEngine(PROFILE, engine="vllm", engine_options={"model": "m", "gpu_memory_utilization": 0.5},
                      num_gpus_per_actor=1)
    assert seen["num_gpus"] == 1 and seen["per_gpu"] == 1


class PidEngine(Engine):
    """Answers every query with its worker's pid (which actor answered what), or raises on image `raise_uid`."""

    name = "pid"
    simulated = True

    def __init__(self, profile, *, raise_uid=None):
        self.raise_uid = raise_uid

    def generate(self, batch):
        if self.raise_uid in batch.images:
            raise RuntimeError("engine failed on this image")
        return [Completion(text=f"{os.getpid()} {q.text}") for q in batch.queries]

    def close(self):
        pass


def _answered_by(completions) -> list[str]:
    """The pids that answered, in query order, each run of equal pids once."""
    pids = [c.text.split(" ", 1)[0] for c in completions]
    return [p for i, p in enumerate(pids) if i == 0 or p != pids[i - 1]]


def test_one_large_batch_is_split_between_idle_actors():
    """A batch of at least 2 x split_min_queries arriving while actors are idle runs in contiguous parts on
    every idle actor and comes back whole: the caller's own batch, its queries' answers in order. A small one
    or split_min_queries=0 stays on one actor."""
    big, small = make_batch(1000, n=601, tag="big"), make_batch(1001, n=255, tag="small")
    with RayPoolEngine(PROFILE, engine=PidEngine, num_actors=3, split_min_queries=128) as p:
        [(b, got)] = list(p.stream([big]))
        assert b is big and [c.text.split(" ", 1)[1] for c in got] == [q.text for q in big.queries]
        assert len(_answered_by(got)) == 3 and len(set(_answered_by(got))) == 3
        assert len(_answered_by(p.generate(small))) == 1  # 255 < 2 x 128
        assert p.stats["split_batches"] == 1 and p.stats["batches"] == 2
    with RayPoolEngine(PROFILE, engine=PidEngine, num_actors=2, split_min_queries=0) as p:
        assert len(_answered_by(p.generate(big))) == 1


def test_a_split_batch_whose_parts_fail_comes_back_as_one_batch_of_errors():
    batches = [make_batch(1100, n=400, tag="bad"), make_batch(1101, n=400, tag="good")]
    with RayPoolEngine(PROFILE, engine=PidEngine, engine_options={"raise_uid": "img1100"}, num_actors=2,
                       max_retries=1, split_min_queries=100) as p:
        got = {b.tag: c for b, c in p.stream(batches)}
        stats = dict(p.stats)
    assert len(got["bad"]) == 400 and all(c.text == "" and "engine failed" in c.error for c in got["bad"])
    assert len(got["good"]) == 400 and all(c.error is None for c in got["good"])
    assert stats["split_batches"] >= 1 and stats["failed_batches"] == 2  # the bad batch's two parts


def test_an_actor_dying_on_its_part_of_a_split_batch_loses_nothing(tmp_path):
    flag = tmp_path / "crashed"
    big = make_batch(1200, n=600, tag="big")
    with RayPoolEngine(PROFILE, engine=CrashingEngine, engine_options={"truth": TRUTH, "crash_on": 1, "flag": str(flag)},
                       num_actors=2, max_retries=2, split_min_queries=128) as p:
        [(b, got)] = list(p.stream([big]))
        stats = dict(p.stats)
    assert flag.exists(), "an actor was supposed to crash on its part"
    assert b is big and stats["split_batches"] == 1 and stats["actor_failures"] >= 1 and stats["failed_batches"] == 0
    assert [c.text for c in got] == [c.text for c in SimulatedEngine(PROFILE, truth=TRUTH).generate(big)]


class LastFirstEngine(Engine):
    """The simulated engine behind a `stream` that holds up to `hold` batches (waiting up to `wait_s` for
    them) and answers the batch whose first query is `last_text` last, half a second after the others, as
    vLLM may finish a later image before an earlier one."""

    name = "last-first"
    simulated = True

    def __init__(self, profile, *, last_text=None, hold=2, wait_s=30.0, **options):
        self.inner = SimulatedEngine(profile, **options)
        self.last_text, self.hold, self.wait_s = last_text, hold, wait_s

    def generate(self, batch):
        return self.inner.generate(batch)

    def stream(self, batches):
        it, held, t0 = iter(batches), [], time.monotonic()
        for b in it:
            if b is not None:
                held.append(b)
            elif time.monotonic() - t0 > self.wait_s:
                break
            else:
                time.sleep(0.01)
            if len(held) >= self.hold:
                break
        for b in sorted(held, key=lambda b: b.queries[0].text == self.last_text):
            if b.queries[0].text == self.last_text:
                time.sleep(0.5)  # the driver sees the other batch back first
            yield b, self.inner.generate(b)
        for b in it:
            if b is not None:
                yield b, self.inner.generate(b)

    def close(self):
        pass


def test_duplicate_images_finishing_out_of_order_on_one_actor():
    """The same image twice (two batches whose PromptImages share the uid but not the array object) on one
    actor, the second finishing first: each comes back with its answers (the pool forgets a finished batch
    by identity, never by comparing pixel arrays)."""
    first = make_batch(1300, n=50, tag="first")
    second = EngineBatch({u: PromptImage(u, im.pixels.copy(), im.ref) for u, im in first.images.items()},
                         first.queries[10:], first.sampling, "second")
    with RayPoolEngine(PROFILE, engine=LastFirstEngine, num_actors=1, max_in_flight_per_actor=2,
                       split_min_queries=0, engine_options={"truth": TRUTH, "last_text": first.queries[0].text}) as p:
        got = list(p.stream([first, second]))
        stats = dict(p.stats)
    assert [b.tag for b, _ in got] == ["second", "first"]
    assert stats["failed_batches"] == 0 and stats["retries"] == 0
    want = SimulatedEngine(PROFILE, truth=TRUTH)
    for b, comps in got:
        assert [c.text for c in comps] == [c.text for c in want.generate(b)]
