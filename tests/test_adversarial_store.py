"""The answer store under damage and contention: garbage and truncated files, one damaged record, a second
job on the same file, a full disk, and a store key that must not change with transport options."""

from __future__ import annotations

import inspect
import sqlite3
import zlib

import numpy as np
import pytest
from conftest import bounded

from densify.engines.base import Completion, Engine, EngineBatch, PromptImage, Query, Sampling
from densify.engines.store import (ANSWER_OPTIONS, TRANSPORT_OPTIONS, AnswerStore, StoreDamagedError, StoredEngine,
                                   StoreError, StoreFullError, StoreLockedError, model_key_for)


class Counting(Engine):
    name = "counting"

    def __init__(self):
        self.asked: list[str] = []

    def generate(self, batch):
        self.asked += [q.text for q in batch.queries]
        return [Completion(f"<answer>{len(q.text) % 7}.5</answer>", n_prompt_tokens=10, n_generated_tokens=3)
                for q in batch.queries]

    def close(self):
        pass


def _batch(uid: str, n: int = 30) -> EngineBatch:
    img = PromptImage(uid, np.zeros((4, 4, 3), np.uint8))
    return EngineBatch({uid: img}, [Query(f"how far is point {i} of {uid}?", (uid,)) for i in range(n)],
                       Sampling(max_tokens=16))


def _fill(path, uids=("img-a", "img-b"), n=30):
    inner = Counting()
    with AnswerStore(path) as store:
        eng = StoredEngine(inner, store, "k", profile="vlm3-depth")
        for u in uids:
            eng.generate(_batch(u, n))
    return inner


_bounded = bounded


# -- damage to the whole file

def test_garbage_file_is_refused_at_open_naming_the_file_and_the_fix(tmp_path):
    p = tmp_path / "answers-0.sqlite"
    p.write_bytes(b"this is not a database\n" * 500)
    with pytest.raises(StoreDamagedError) as info:
        AnswerStore(p)
    msg = str(info.value)
    assert str(p) in msg and "--rebuild-store" in msg and "on_damage='rebuild'" in msg
    assert p.read_bytes().startswith(b"this is not")  # nothing was changed without being asked


@pytest.mark.parametrize("cut", ["half", "page", "header"])
def test_truncated_file_is_refused_at_open(tmp_path, cut):
    p = tmp_path / "answers-0.sqlite"
    _fill(p, uids=[f"img-{i}" for i in range(40)], n=60)
    data = p.read_bytes()
    page = int.from_bytes(data[16:18], "big")
    keep = {"half": len(data) // 2 + 123, "page": (len(data) // page // 2) * page, "header": 50}[cut]
    p.write_bytes(data[:keep])
    with pytest.raises(StoreDamagedError, match="damaged"):
        AnswerStore(p)


def test_damaged_page_is_refused_at_open(tmp_path):
    p = tmp_path / "answers-0.sqlite"
    _fill(p, uids=[f"img-{i}" for i in range(40)], n=60)
    data = bytearray(p.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page: 2 * page] = b"\xff" * page  # the root page of a table
    p.write_bytes(bytes(data))
    with pytest.raises(StoreDamagedError):
        AnswerStore(p)


def test_rebuild_moves_the_damaged_file_aside_and_starts_fresh(tmp_path):
    p = tmp_path / "answers-0.sqlite"
    p.write_bytes(b"garbage" * 100)
    store = AnswerStore(p, on_damage="rebuild")
    try:
        assert store.moved_aside is not None and store.moved_aside.read_bytes() == b"garbage" * 100
        assert store.moved_aside.parent == p.parent and store.moved_aside.name.startswith("answers-0.sqlite.damaged-")
        assert len(store) == 0
        eng = StoredEngine(Counting(), store, "k", profile="vlm3-depth")
        eng.generate(_batch("img-a", 5))
        assert len(store) == 5
    finally:
        store.close()
    with AnswerStore(p) as again:  # the fresh store is a good one
        assert len(again) == 5
    p.write_bytes(b"garbage again")
    moved = AnswerStore.rebuild(p)
    assert moved is not None and moved.read_bytes() == b"garbage again" and not p.exists()
    assert AnswerStore.rebuild(p) is None


# -- damage to one record

@pytest.mark.parametrize("damage", ["zlib", "json", "magic", "short", "not-text"])
def test_one_damaged_record_is_quarantined_and_its_queries_asked_again(tmp_path, damage, caplog):
    p = tmp_path / "answers-0.sqlite"
    _fill(p)
    db = sqlite3.connect(p)
    rid, body = db.execute("SELECT id, body FROM batches WHERE image = 'img-a'").fetchone()
    n = int.from_bytes(body[4:8], "little")
    head = body[:8 + 16 * n]
    bad = {"zlib": head + b"\x78\x9cnot zlib at all",
           "json": head + zlib.compress(b"[[\"a\",  oops"),
           "magic": b"XXXX" + body[4:],
           "short": body[:8 + 16 * n - 5],
           "not-text": head + zlib.compress(("[" + ",".join(["[" + ",".join(["1"] * n) + "]"] * 4) + "]").encode()),
           }[damage]
    db.execute("UPDATE batches SET body = ? WHERE id = ?", (bad, rid))
    db.commit()
    db.close()

    for run in range(2):  # the job goes on, and a rerun does not stop on the same record
        inner = Counting()
        with AnswerStore(p) as store:
            eng = StoredEngine(inner, store, "k", profile="vlm3-depth")
            a = eng.generate(_batch("img-a"))
            b = eng.generate(_batch("img-b"))
            assert all(c.error is None and c.text for c in a + b)
            assert inner.asked == ([q.text for q in _batch("img-a").queries] if run == 0 else [])
            assert store.quarantined == (1 if run == 0 else 0)
    assert "damaged" in caplog.text and str(rid) in caplog.text
    db = sqlite3.connect(p)
    assert db.execute("SELECT batch_id, body FROM quarantine").fetchall() == [(rid, bad)]
    db.close()


# -- two jobs on one store

def test_a_store_held_by_another_job_is_refused_at_once(tmp_path):
    p = tmp_path / "answers-0.sqlite"
    first = AnswerStore(p)
    try:
        res = _bounded(lambda: AnswerStore(p, busy_timeout_s=60), 5)
        assert isinstance(res.get("error"), StoreLockedError), res
        assert "another job" in str(res["error"]) and str(p) in str(res["error"])
    finally:
        first.close()
    with AnswerStore(p) as again:  # free once the first job is gone
        assert len(again) == 0


# -- full disk

def test_disk_full_on_commit_is_one_clear_error_and_the_store_stays_usable(tmp_path):
    p = tmp_path / "answers-0.sqlite"
    inner = Counting()
    with AnswerStore(p) as store:
        eng = StoredEngine(inner, store, "k", profile="vlm3-depth")
        eng.generate(_batch("img-a", 10))
        pages = store.db.execute("PRAGMA page_count").fetchone()[0]
        store.db.execute(f"PRAGMA max_page_count={pages}")  # SQLite's own "disk full" (SQLITE_FULL)
        big = _batch("img-b", 3000)
        with pytest.raises(StoreFullError) as info:
            eng.generate(big)
        assert "disk full" in str(info.value) and str(p) in str(info.value)
        assert "rollback" not in str(info.value)
        assert len(store) == 10  # what was committed before is intact
        store.db.execute("PRAGMA max_page_count=1073741823")
        eng.generate(big)
        assert len(store) == 3010
    assert issubclass(StoreFullError, StoreError)
    from pipelines.cli import EXIT_IO, EXIT_STORE, exit_code

    # a full disk is a full disk, under the store or any other output; a damaged or held store is not
    assert exit_code(info.value) == EXIT_IO == 74 and exit_code(StoreLockedError("held")) == EXIT_STORE == 4


# -- the store key

def test_transport_options_do_not_change_the_store_key():
    base = {"model": "m"}
    for extra in ({"base_url": "http://other:9000/v1"}, {"timeout_s": 5}, {"timeout": 5}, {"concurrency": 3},
                  {"retries": 9}, {"max_retries": 9}, {"api_key_env": "X"}, {"batches_in_flight": 8}):
        assert model_key_for("openai", {**base, **extra}) == model_key_for("openai", base), extra
    for extra in ({"gpu_memory_utilization": 0.5}, {"max_num_seqs": 8}, {"max_num_batched_tokens": 4096},
                  {"queries_in_flight": 64}, {"batches_in_flight": 2}, {"tensor_parallel_size": 2}):
        assert model_key_for("vllm", {**base, **extra}) == model_key_for("vllm", base), extra
    pool = {"engine": "vllm", "engine_options": {"model": "m", "max_num_seqs": 4}, "num_actors": 8,
            "num_gpus_per_actor": 1, "max_in_flight_per_actor": 4}
    assert model_key_for("ray", pool) == model_key_for("vllm", base)
    assert model_key_for("hf", {"model": "m", "device": "cpu", "batch_size": 2}) == model_key_for("hf", base)


def test_answer_options_change_the_store_key():
    assert model_key_for("openai", {"model": "a"}) != model_key_for("openai", {"model": "b"})
    assert model_key_for("openai", {"extra_body": {"top_k": 5}}) != model_key_for("openai", {})
    assert model_key_for("vllm", {"dtype": "float16"}) != model_key_for("vllm", {"dtype": "bfloat16"})
    assert model_key_for("vllm", {"quantization": "fp8"}) != model_key_for("vllm", {})
    assert model_key_for("simulated", {"seed": 1}) != model_key_for("simulated", {"seed": 2})
    assert model_key_for("simulated", {"error": {"sigma": 0.1}}) != model_key_for("simulated", {})
    assert model_key_for("openai", {"model": "a"}) != model_key_for("hf", {"model": "a"})
    assert model_key_for("openai", {"unknown_new_option": 1}) != model_key_for("openai", {})  # kept: safe side
    # the served model fills in an unset model option: two servers' answers never share a key
    assert model_key_for("openai", {}, model="a") != model_key_for("openai", {}, model="b")
    assert model_key_for("openai", {"model": "a"}, model="a") == model_key_for("openai", {"model": "a"})


def test_every_engine_option_is_classified_once():
    from densify.engines.hf import HFEngine
    from densify.engines.openai import OpenAIEngine
    from densify.engines.registry import options_model
    from densify.engines.ray_pool import RayPoolEngine
    from densify.engines.vllm import VLLMEngine
    from densify.sim.engine import SimulatedEngine

    for name, cls in (("simulated", SimulatedEngine), ("hf", HFEngine), ("vllm", VLLMEngine),
                      ("openai", OpenAIEngine), ("ray", RayPoolEngine)):
        # every option (the constructor takes them typed, or as keywords) and every Python-only argument
        params = inspect.signature(cls.__init__).parameters
        model = options_model(name)
        opts = set(model.model_fields) | {k for k, p in params.items() if p.kind == p.KEYWORD_ONLY}
        keep, drop = ANSWER_OPTIONS[name], TRANSPORT_OPTIONS[name]
        assert not keep & drop, name
        assert opts <= keep | drop, (name, sorted(opts - keep - drop))
