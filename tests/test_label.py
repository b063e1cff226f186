"""`densify label` as a batch job: manifests, the answer store, resume, shards, Ray actors dying mid-job,
and the job killed with SIGKILL at random points and resumed."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from densify.config.loading import dict_overrides
from densify.engines import EngineBatch
from densify.engines.base import Completion, Engine, ImageRef, PromptImage, Query, Sampling
from densify.engines.store import AnswerStore, StoredEngine, store_path
from densify.sim.engine import SimulatedEngine
from densify.sim.truth import ArrayTruth
from densify.stages.label import LabelJob, count_manifest, iter_manifest
from densify.stages.settings import LabelConfig, load_config
from pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]
OUTPUT_FILES = ("depth.npy", "depth.png", "confidence.npy", "camera.json", "result.json")


def write_dataset(folder: Path, n: int, seed: int = 0, size=(160, 120)) -> Path:
    """n textured images with smooth ground-truth depth beside them, and a JSONL manifest with intrinsics."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    lines = []
    for i in range(n):
        img = cv2.resize((rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8), (w, h),
                         interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(folder / f"im{i:02d}.png"), img)
        depth = rng.uniform(1.5, 4) + rng.uniform(-1, 1) * (xx / w - 0.5) + rng.uniform(-1, 1) * (yy / h - 0.5)
        np.save(folder / f"im{i:02d}.depth.npy", depth.astype(np.float32))
        lines.append(json.dumps({"image": f"im{i:02d}.png", "intrinsics": [150.0, 150.0, w / 2, h / 2]}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "manifest.jsonl"


def label_config(**over) -> LabelConfig:
    base = {"engine": {"name": "simulated"}, "plan": {"count": 256}, "ray": {"enabled": False}}
    base.update(over)
    return load_config(LabelConfig, None, dict_overrides(base), default_name="label")


def run_label(inputs, cfg, out, *, progress=False, **kw) -> dict:
    return LabelJob(cfg, out, **kw).run(inputs)


def same_outputs(a: Path, b: Path, ids) -> None:
    for i in ids:
        for f in OUTPUT_FILES:
            assert (a / i / f).read_bytes() == (b / i / f).read_bytes(), f"{i}/{f} differs"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), 6)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """One uninterrupted run (no Ray, fresh store)."""
    out = tmp_path_factory.mktemp("ref")
    summary = run_label(str(dataset), label_config(), out, progress=False)
    return out, summary


def test_label_writes_labels_manifest_and_summary(dataset, tmp_path, capsys):
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    rc = main(["label", str(dataset), "--out", str(out), "--no-ray", "--count", "256", "--engine", "simulated"])
    assert rc == 0
    assert "6 ok" in capsys.readouterr().out
    d = out / "im00"
    depth = np.load(d / "depth.npy")
    assert depth.dtype == np.float32 and depth.shape == (120, 160) and np.isfinite(depth).all()
    png = cv2.imread(str(d / "depth.png"), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint16 and np.abs(png / 1000.0 - depth).max() < 0.001
    conf = np.load(d / "confidence.npy")
    assert conf.shape == depth.shape and conf.max() <= 1.0
    assert not (d / "cloud.ply").exists() and not (d / "preview.png").exists()  # off by default for labels
    gt = np.load(dataset.parent / "im00.depth.npy")
    assert np.mean(np.maximum(depth / gt, gt / depth) < 1.25) > 0.9

    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["id"] for r in rows] == [f"im{i:02d}" for i in range(6)]
    r = rows[0]
    assert r["status"] == "ok" and r["queries"] > 200 and r["store_hits"] == 0 and r["engine_queries"] == r["queries"]
    assert r["depth_npy"] == "im00/depth.npy" and r["depth_png"] == "im00/depth.png" and r["cloud"] is None
    assert r["wall_s"] > 0 and r["error"] is None

    s = json.loads((out / "summary.json").read_text())
    assert s["complete"] and s["ok"] == 6 and s["failed"] == 0 and s["queries"] == sum(x["queries"] for x in rows)
    assert s["engine_queries"] == s["queries"] and s["store"]["asked"] == s["queries"]
    assert store_path(out / "store").is_file()


def test_manifest_forms_agree(dataset, tmp_path):
    """Folder, glob, JSONL and Parquet manifests name the same images; Parquet carries intrinsics too."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = dataset.parent
    recs = [json.loads(line) for line in dataset.read_text().splitlines()]
    pq.write_table(pa.table({"image": [str(folder / r["image"]) for r in recs],
                             "intrinsics": [r["intrinsics"] for r in recs]}), tmp_path / "m.parquet")
    ids = [s.id for s in iter_manifest(str(dataset))]
    assert ids == [f"im{i:02d}" for i in range(6)]
    assert [s.id for s in iter_manifest(str(folder))] == ids
    assert [s.id for s in iter_manifest(str(folder / "im*.png"))] == ids
    parquet = list(iter_manifest(str(tmp_path / "m.parquet")))
    assert [s.id for s in parquet] == ids and parquet[0].intrinsics == recs[0]["intrinsics"]
    assert [s.id for s in iter_manifest(str(dataset), shard=(1, 4))] == ["im01", "im05"]
    assert count_manifest(str(tmp_path / "m.parquet"), (1, 4)) == 2 and count_manifest(str(folder)) == 6

    cfg = label_config()
    run_label(str(tmp_path / "m.parquet"), cfg, tmp_path / "pq", progress=False)
    run_label(str(dataset), cfg, tmp_path / "jsonl", progress=False)
    same_outputs(tmp_path / "pq", tmp_path / "jsonl", ids)


def test_resume_asks_the_engine_nothing_twice(dataset, reference, tmp_path):
    import shutil

    ref_out, ref = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    for i in ("im01", "im04"):
        (out / i / "result.json").unlink()
        (out / i / "depth.npy").unlink()
    s = run_label(str(dataset), label_config(), out, progress=False)
    assert s["ok"] == 2 and s["skipped"] == 4 and s["engine_queries"] == 0
    assert s["store_hits"] == s["queries"] > 0
    same_outputs(out, ref_out, [f"im{i:02d}" for i in range(6)])
    # overwrite: every image redone, every answer from the store
    s = run_label(str(dataset), label_config(overwrite=True), out, progress=False)
    assert s["ok"] == 6 and s["engine_queries"] == 0 and s["store_hits"] == ref["queries"]
    same_outputs(out, ref_out, [f"im{i:02d}" for i in range(6)])
    with AnswerStore(store_path(out / "store")) as st:
        assert st.totals()["asked"] == ref["engine_queries"] == ref["queries"]


def test_shards_split_the_work_and_their_stores(dataset, reference, tmp_path):
    ref_out, ref = reference
    out = tmp_path / "out"
    s0 = run_label(str(dataset), label_config(), out, shard=(0, 2), progress=False)
    s1 = run_label(str(dataset), label_config(), out, shard=(1, 2), progress=False)
    assert s0["ok"] == s1["ok"] == 3 and s0["queries"] + s1["queries"] == ref["queries"]
    assert (out / "store" / "answers-0.sqlite").is_file() and (out / "store" / "answers-1.sqlite").is_file()
    assert (out / "manifest-0.parquet").is_file() and (out / "summary-1.json").is_file()
    same_outputs(out, ref_out, [f"im{i:02d}" for i in range(6)])
    assert main(["label", str(dataset), "--out", str(out), "--shard", "2/2", "--no-ray", "--engine", "simulated"]) == 2


class CountingEngine(Engine):
    """Simulated answers; counts what it is asked; fails queries whose text contains `fail_text`, and every
    `fail_every`-th query of a batch."""

    name = "counting"
    simulated = True

    def __init__(self, profile="vlm3-depth", fail_text=None, fail_every=None, truth=None):
        self.sim = SimulatedEngine(profile, truth=truth)
        self.asked = 0
        self.calls = 0
        self.fail_text = fail_text
        self.fail_every = fail_every

    def generate(self, batch):
        self.calls += 1
        self.asked += len(batch.queries)
        out = self.sim.generate(batch)
        for i, q in enumerate(batch.queries):
            if (self.fail_text and self.fail_text in q.text) or (self.fail_every and i % self.fail_every == 3):
                out[i] = Completion("", error="timeout")
        return out

    def close(self):
        pass


_FLAT = ArrayTruth({"u1": np.full((20, 30), 2.0, np.float32), "u2": np.full((20, 30), 3.0, np.float32)})


def _batch(uid="u1", n=40, dup=0):
    px = np.zeros((20, 30, 3), np.uint8)
    qs = [Query(f"Given this image, how far is the point at coordinates ({i}, {2 * i}) from the camera?", (uid,))
          for i in range(n)]
    qs += qs[:dup]
    return EngineBatch({uid: PromptImage(uid, px, ImageRef(uid, size=(30, 20)))}, qs, Sampling(), tag="t")


def test_stored_engine_sends_only_misses_and_commits_per_batch(tmp_path):
    inner = CountingEngine(fail_text="(7, 14)", truth=_FLAT)
    with AnswerStore(tmp_path / "a.sqlite") as store:
        eng = StoredEngine(inner, store, "sim", profile="vlm3-depth")
        first = eng.generate(_batch(dup=5))  # 40 distinct queries + 5 repeats
        assert inner.asked == 40 and len(first) == 45 and first[40].text == first[0].text
        assert sum(c.error is not None for c in first) == 1
        assert store.totals() == {"batches": 1, "queries": 45, "hits": 0, "asked": 40, "stored": 39}
        inner.fail_text = None
        again = eng.generate(_batch(dup=5))  # only the failed answer is asked again
        assert inner.asked == 41 and eng.hits == 44
        assert [c.text for c in again[:7]] == [c.text for c in first[:7]] and again[7].error is None
        inner.calls = 0
        assert [c.text for c in eng.generate(_batch())] == [c.text for c in again[:40]]
        assert inner.calls == 0  # all stored: the inner engine is not called at all
        other = eng.generate(_batch(uid="u2"))  # another image: nothing stored for it
        assert inner.asked == 81 and len(other) == 40
        assert len(store) == 80 and store.totals()["asked"] == 81
    # a different model key shares nothing
    with AnswerStore(tmp_path / "a.sqlite") as store:
        eng = StoredEngine(CountingEngine(truth=_FLAT), store, "other-model", profile="vlm3-depth")
        eng.generate(_batch())
        assert eng.hits == 0 and eng.asked == 40


def test_engine_errors_fail_the_image_and_resume_asks_only_those(dataset, tmp_path):
    inner = CountingEngine(fail_every=10)  # some answers of every image fail
    out = tmp_path / "out"
    s = run_label(str(dataset), label_config(), out, engine=inner, model_key="sim", progress=False)
    assert s["failed"] == 6 and s["failed_by_kind"] == {"engine": 6} and s["ok"] == 0
    assert not (out / "im00" / "result.json").exists()
    assert "answers failed" in s["failed_images"][0]["error"]
    first = inner.asked
    inner.fail_every = None
    s2 = run_label(str(dataset), label_config(), out, engine=inner, model_key="sim", progress=False)
    assert s2["ok"] == 6 and s2["store_hits"] > 0
    assert inner.asked - first == s2["engine_queries"] < first / 2  # only the failed ones were asked again


# -- Ray: an actor dies mid-job; the job is killed with SIGKILL and resumed

class CrashingEngine(Engine):
    """Simulated answers; the worker process dies (os._exit) on its 2nd batch, once (flag file)."""

    name = "crashing"
    simulated = True

    def __init__(self, profile, *, flag, **options):
        self.sim = SimulatedEngine(profile, **options)
        self.flag = flag
        self.n = 0

    def generate(self, batch):
        self.n += 1
        if self.n == 2 and not os.path.exists(self.flag):
            Path(self.flag).touch()
            os._exit(1)
        return self.sim.generate(batch)

    def close(self):
        pass


def test_ray_job_survives_an_actor_dying(dataset, reference, tmp_path):
    ray = pytest.importorskip("ray")
    from densify.engines.ray_pool import RayPoolEngine

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ref_out, ref = reference
    flag = tmp_path / "crashed"
    pool = RayPoolEngine("vlm3-depth", engine=CrashingEngine, engine_options={"flag": str(flag)}, num_actors=2,
                         num_cpus_per_actor=0.5)
    try:
        s = run_label(str(dataset), label_config(), tmp_path / "out", engine=pool, progress=False)
    finally:
        pool.close()
    assert flag.exists() and s["pool"]["actor_failures"] >= 1 and s["pool"]["retries"] + s["pool"]["requeued"] >= 1
    assert s["ok"] == 6 and s["failed"] == 0 and s["queries"] == ref["queries"]
    same_outputs(tmp_path / "out", ref_out, [f"im{i:02d}" for i in range(6)])
    assert not ray.is_initialized()  # the pool started Ray, and shut it down


def _job(manifest, out, *, ray_on: bool, count: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipelines", "label", str(manifest), "--out", str(out), "--count", str(count),
           "--engine", "simulated",
           "--set", "log_every_s=0.5", "--set", "manifest_every_s=0.5"] + ([] if ray_on else ["--no-ray"])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # its own process group: SIGKILL takes the driver and the local Ray it started, like a scheduler does
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                            start_new_session=True)


def test_kill_9_at_random_points_and_resume(tmp_path):
    """SIGKILL the job (driver and its local Ray) at random points, several times, resuming each time.

    The final outputs are byte-identical to an uninterrupted run's, and the engine's committed work summed
    over every run equals the uninterrupted run's: each answer is committed once, in the same transaction
    as the count of inner-engine queries that produced it (the `batches` table of the store).

    That is the honest guarantee: answers the engine produced but that were not yet committed when the
    job was killed are lost and asked again after the restart, so the engine may have *computed* more in
    total; what it never does is answer again anything that was committed.
    """
    manifest = write_dataset(tmp_path / "data", 10, seed=3)
    count = 1024
    ref = run_label(str(manifest), label_config(plan={"count": count}), tmp_path / "ref", progress=False)
    ids = [f"im{i:02d}" for i in range(10)]
    out = tmp_path / "out"
    per_image = ref["wall_s"] / 10
    rng = random.Random(20240611)
    killed = interrupted = 0
    for attempt in range(8):
        remaining = sum(not (out / i / "result.json").is_file() for i in ids)
        if not remaining or killed >= 4:
            break
        log = tmp_path / f"run{attempt}.log"
        ray_on = attempt == 1  # one run with a local Ray: killed with its actors mid-batch
        p = _job(manifest, out, ray_on=ray_on, count=count, log=log)
        deadline = time.monotonic() + 120
        while "engine" not in log.read_text() or " ready in " not in log.read_text():  # the job is running
            assert p.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(rng.uniform(0.05, 0.5) * per_image * remaining / (2 if ray_on else 1))  # within what is left
        if p.poll() is not None:  # finished before the kill
            continue
        os.killpg(p.pid, signal.SIGKILL)
        assert p.wait(30) == -signal.SIGKILL
        killed += 1
        interrupted += any(not (out / i / "result.json").is_file() for i in ids)
    assert killed >= 3 and interrupted >= 2, (killed, interrupted)
    import pyarrow.parquet as pq
    if (out / "manifest.parquet").exists():  # written periodically and atomically: readable after a kill
        assert {r["status"] for r in pq.read_table(out / "manifest.parquet").to_pylist()} <= {"ok", "skipped"}
    p = _job(manifest, out, ray_on=False, count=count, log=tmp_path / "final.log")
    assert p.wait(180) == 0, (tmp_path / "final.log").read_text()
    assert "ETA" in (tmp_path / "final.log").read_text()  # progress lines when not on a terminal

    same_outputs(out, tmp_path / "ref", ids)
    assert not [f for f in out.rglob(".*") if f.is_file()], "temporary files left behind"
    s = json.loads((out / "summary.json").read_text())
    assert s["complete"] and s["ok"] + s["skipped"] == 10 and s["failed"] == 0
    with AnswerStore(store_path(out / "store")) as st, AnswerStore(store_path(tmp_path / "ref" / "store")) as rst:
        assert st.totals()["asked"] == rst.totals()["asked"] == ref["engine_queries"] == ref["queries"]
        assert len(st) == len(rst) and st.answers() == rst.answers()


def test_adaptive_plan_rounds_go_through_the_store(dataset, tmp_path):
    """plan.mode=adaptive asks each image in rounds; every round's answers are stored, so a rerun asks
    the engine nothing and reproduces the labels."""
    import pyarrow.parquet as pq

    cfg = label_config(plan={"mode": "adaptive", "count": 1024, "rounds": 2}, densify={"method": "edge"})
    out = tmp_path / "out"
    s = run_label(str(dataset), cfg, out, progress=False)
    assert s["ok"] == 6 and s["engine_queries"] == s["queries"] > 0
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert all(r["engine_queries"] == r["queries"] for r in rows)
    with AnswerStore(store_path(out / "store")) as st:
        assert st.totals()["batches"] > 6  # several rounds per image
    first = {i: (out / i / "depth.npy").read_bytes() for i in ids_of(6)}
    for i in ids_of(6):
        (out / i / "result.json").unlink()
    s2 = run_label(str(dataset), cfg, out, progress=False)
    assert s2["ok"] == 6 and s2["engine_queries"] == 0 and s2["store_hits"] == s["queries"]
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert all(r["store_hits"] == r["queries"] > 0 for r in rows)
    assert first == {i: (out / i / "depth.npy").read_bytes() for i in ids_of(6)}


def ids_of(n: int) -> list[str]:
    return [f"im{i:02d}" for i in range(n)]


class RefusingEngine(Engine):
    """Answers every query with text no parser accepts."""

    name = "refusing"

    def generate(self, batch):
        return [Completion("I cannot determine that from the image.") for _ in batch.queries]

    def close(self):
        pass


def test_images_without_a_usable_answer_fail_as_answers(dataset, tmp_path):
    s = run_label(str(dataset), label_config(), tmp_path / "out", engine=RefusingEngine(), model_key="refusing",
                  progress=False)
    assert s["failed"] == 6 and s["failed_by_kind"] == {"answers": 6}
    assert "could be parsed" in s["failed_images"][0]["error"]
    assert not (tmp_path / "out" / "im00" / "result.json").exists()


def test_cpu_workers_prepare_and_densify_off_the_driver(dataset, reference, tmp_path, monkeypatch):
    """ray.cpu_workers: images are prepared and densified in Ray CPU tasks; the outputs are the same bytes."""
    pytest.importorskip("ray")
    from densify.stages.depth import DepthStage

    def not_here(*a, **k):
        raise AssertionError("the driver prepared or densified an image")

    monkeypatch.setattr(DepthStage, "prepare", not_here)  # the workers are other processes: not patched
    monkeypatch.setattr(DepthStage, "finish", not_here)
    ref_out, ref = reference
    cfg = label_config(ray={"enabled": True, "num_actors": 1, "cpu_workers": 2})
    s = run_label(str(dataset), cfg, tmp_path / "out")
    assert s["ok"] == 6 and s["failed"] == 0 and s["queries"] == ref["queries"]
    same_outputs(tmp_path / "out", ref_out, [f"im{i:02d}" for i in range(6)])
    assert s["time_s"]["driver_cpu"] > 0


def test_cpu_workers_take_adaptive_plans_too(dataset, tmp_path, monkeypatch):
    """An adaptive plan with ray.cpu_workers: images are prepared, planned round by round and densified in
    Ray CPU tasks; the outputs are the bytes of the all-in-driver run."""
    pytest.importorskip("ray")
    from densify.fields.adaptive import AdaptiveDepthImage
    from densify.stages.depth import DepthStage

    adaptive = {"mode": "adaptive", "count": 256, "rounds": 2}
    ref = run_label(str(dataset), label_config(plan=adaptive), tmp_path / "ref")

    def not_here(*a, **k):
        raise AssertionError("the driver prepared or densified an image")

    monkeypatch.setattr(DepthStage, "prepare", not_here)
    monkeypatch.setattr(DepthStage, "finish", not_here)
    monkeypatch.setattr(AdaptiveDepthImage, "receive", not_here)  # rounds are planned in the workers too
    cfg = label_config(plan=adaptive, ray={"enabled": True, "num_actors": 1, "cpu_workers": 2})
    s = run_label(str(dataset), cfg, tmp_path / "out")
    assert s["ok"] == 6 and s["failed"] == 0 and s["queries"] == ref["queries"]
    same_outputs(tmp_path / "out", tmp_path / "ref", [f"im{i:02d}" for i in range(6)])
