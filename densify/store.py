"""The answer store: every engine answer is committed to a durable store, so a restarted job asks nothing twice.

An answer is keyed by (model, profile, sampling, prompt image, prompt text): a 32-byte key whose first 16
bytes name the image the query is about (so one range scan finds all stored answers of an image) and whose
last 16 bytes name the rest of the query. Prompt-image uids are content hashes of the preprocessed
pixels (`densify.prompts.image_uid`); the part before the first ':' names the source image (marker
profiles draw one image per query, `<uid>:m<i>`).

Storage is SQLite in WAL mode, one file per shard (answers-<i>.sqlite): one writer per file, so shards on
shared storage never contend. With `exclusive=True` (the default) the file is locked by its job for the
job's lifetime: WAL then needs no shared-memory index, which is what makes it safe on network file
systems, and a second job started on the same shard fails at once instead of corrupting it.

`StoredEngine(inner, store, model_key)` wraps any engine: each batch is looked up first, only the misses
go to the inner engine (still one batch per image), and the answers are committed right after the batch
comes back, in one transaction together with a record of how many queries the inner engine answered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from densify.engines.base import Completion, Engine, EngineBatch, Query, Sampling

__all__ = ["AnswerStore", "StoredEngine", "BatchStats", "StoreError", "model_key_for", "store_path"]

log = logging.getLogger("densify.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,
    prefix BLOB NOT NULL,          -- the 16-byte image part of every key in `body`
    image TEXT,                    -- the batch's first prompt-image uid (for people reading the store)
    queries INTEGER NOT NULL,      -- queries in the batch
    hits INTEGER NOT NULL,         -- answered from the store
    asked INTEGER NOT NULL,        -- answered by the inner engine, committed with this row
    stored INTEGER NOT NULL,       -- answers in `body` (asked minus engine errors)
    t REAL NOT NULL,
    body BLOB                      -- the answers: see _pack
);
CREATE INDEX IF NOT EXISTS batches_prefix ON batches (prefix);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT);
"""

_MAGIC = b"DSA1"


def _pack(qparts: list[bytes], answers: list[Completion]) -> bytes:
    """MAGIC, n (4 bytes), n 16-byte query parts, zlib(JSON [texts, logprobs, n_prompt, n_generated])."""
    cols = [[c.text for c in answers], [c.logprob for c in answers], [c.n_prompt_tokens for c in answers],
            [c.n_generated_tokens for c in answers]]
    payload = zlib.compress(json.dumps(cols, separators=(",", ":")).encode(), 1)
    return _MAGIC + len(qparts).to_bytes(4, "little") + b"".join(qparts) + payload


def _unpack(body: bytes, out: dict) -> None:
    if body[:4] != _MAGIC:
        raise StoreError(f"unknown answer-store record format {body[:4]!r}")
    n = int.from_bytes(body[4:8], "little")
    keys = body[8:8 + 16 * n]
    cols = json.loads(zlib.decompress(body[8 + 16 * n:]))
    for i, row in enumerate(zip(*cols)):
        out[keys[16 * i:16 * i + 16]] = row


class StoreError(RuntimeError):
    """The answer store cannot be opened or written (locked by another job, disk full, ...)."""


def store_path(directory: str | Path, shard: int = 0) -> Path:
    return Path(directory) / f"answers-{shard}.sqlite"


class AnswerStore:
    """One SQLite file of answers. Use it from one thread at a time.

    Answers are stored one row per committed batch, packed (keys, texts, log-probabilities): one row
    insert per image instead of thousands, which keeps the store's cost near 1 us per answer. They are
    looked up by key: `lookup(prefix)` returns {query part: (text, logprob, n_prompt, n_generated)} for
    every answer stored under an image part.
    """

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL", exclusive: bool = True,
                 busy_timeout_s: float = 10.0, readonly: bool = False):
        self.path = Path(path)
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif not self.path.is_file():
            raise StoreError(f"{self.path}: no such answer store")
        uri = f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
        try:
            self.db = sqlite3.connect(uri, uri=True, timeout=busy_timeout_s, isolation_level=None,
                                      check_same_thread=False)
            if exclusive and not readonly:
                self.db.execute("PRAGMA locking_mode=EXCLUSIVE")
            if not readonly:
                mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode.lower() != "wal":
                    log.warning("%s: SQLite would not switch to WAL (journal_mode=%s)", self.path, mode)
                self.db.execute(f"PRAGMA synchronous={synchronous}")
                self.db.executescript(_SCHEMA)
            self.db.execute("SELECT count(*) FROM meta").fetchone()  # takes the lock now, fails fast
        except sqlite3.OperationalError as exc:
            hint = " (another job holds this shard's store: give each job its own --shard)" \
                if "locked" in str(exc) else ""
            raise StoreError(f"{self.path}: cannot open the answer store: {exc}{hint}") from None

    # -- keys
    @staticmethod
    def image_part(model_key: str, profile: str, sampling: Sampling, image_uid: str) -> bytes:
        """16 bytes naming (model, profile, sampling, source image)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps([model_key, profile, _sampling_tuple(sampling), image_uid.split(":", 1)[0]]).encode())
        return h.digest()

    @staticmethod
    def query_part(q: Query) -> bytes:
        """16 bytes naming (prompt images, prompt text, hint) within an image part."""
        text = "\x1f".join(q.image_uids) + "\x1e" + q.text
        if q.hint:
            text += "\x1e" + repr(sorted(q.hint.items()))
        return hashlib.blake2b(text.encode(), digest_size=16).digest()

    # -- reads
    def lookup(self, prefix: bytes) -> dict[bytes, tuple]:
        """Every answer stored under an image part: query part -> (text, logprob, n_prompt, n_generated)."""
        out: dict[bytes, tuple] = {}
        for (body,) in self.db.execute("SELECT body FROM batches WHERE prefix = ? AND stored > 0 ORDER BY id",
                                       (prefix,)):
            _unpack(body, out)
        return out

    def __len__(self) -> int:
        """Answers stored."""
        return self.db.execute("SELECT coalesce(sum(stored), 0) FROM batches").fetchone()[0]

    def totals(self) -> dict:
        """Sums over committed batches: the inner engine's work is `asked` (committed queries only)."""
        row = self.db.execute("SELECT count(*), coalesce(sum(queries), 0), coalesce(sum(hits), 0), "
                              "coalesce(sum(asked), 0), coalesce(sum(stored), 0) FROM batches").fetchone()
        return dict(zip(("batches", "queries", "hits", "asked", "stored"), row))

    def answers(self) -> dict[bytes, tuple]:
        """Every stored answer, keyed by image part + query part (for checks and exports)."""
        out: dict[bytes, tuple] = {}
        for prefix, body in self.db.execute("SELECT prefix, body FROM batches WHERE stored > 0 ORDER BY id"):
            part: dict[bytes, tuple] = {}
            _unpack(body, part)
            out.update((prefix + k, v) for k, v in part.items())
        return out

    # -- writes
    def commit(self, groups: list[tuple[bytes, list[bytes], list[Completion]]], *, image: str, queries: int,
               hits: int, asked: int) -> None:
        """Store a batch's new answers, atomically with its record.

        groups: (image part, query parts, their answers) for each image part
        the batch's queries are under (one for a depth batch). The first row carries the batch's counts.
        """
        rows, t = [], time.time()
        for i, (prefix, qparts, answers) in enumerate(groups or [(b"", [], [])]):
            c = (queries, hits, asked) if i == 0 else (0, 0, 0)
            rows.append((prefix, image, *c, len(answers), t, _pack(qparts, answers) if answers else None))
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.executemany("INSERT INTO batches (prefix, image, queries, hits, asked, stored, t, body) "
                                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot commit answers: {exc}") from None

    def set_meta(self, key: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass

    def __enter__(self) -> "AnswerStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sampling_tuple(s: Sampling) -> list:
    return [s.max_tokens, s.system_prompt, s.prefill, s.structured_regex, s.logprobs]


def model_key_for(engine_name: str, options: dict | None) -> str:
    """What identifies a model's answers: the engine and the options that change them.

    For the Ray pool, that is the engine its actors run and that engine's options (the pool's own
    options — actors, GPUs, retries — do not change answers).
    """
    options = dict(options or {})
    if engine_name == "ray":
        inner = options.get("engine", "simulated")
        return model_key_for(inner if isinstance(inner, str) else getattr(inner, "__qualname__", repr(inner)),
                             options.get("engine_options") or {})
    return json.dumps([engine_name, options], sort_keys=True, default=str)


@dataclass
class BatchStats:
    queries: int
    hits: int
    asked: int
    errors: int


@dataclass
class _Pending:
    batch: EngineBatch
    keys: list[bytes]
    prefixes: list[bytes]
    found: dict[bytes, tuple]
    ask_keys: list[bytes]


class StoredEngine(Engine):
    """An engine wrapper that answers from the store first and commits every new answer.

    Only the misses of a batch reach the inner engine, as one smaller batch of the same image. A batch
    with no misses is passed on with no queries (stream engines answer it with []), so results keep
    flowing in the inner engine's order and memory stays bounded.
    """

    def __init__(self, inner, store: AnswerStore, model_key: str, *, profile: str = "", track_images: bool = False):
        self.inner = inner
        self.store = store
        self.model_key = model_key
        self.profile = profile
        self.name = f"stored({inner.name})"
        self.simulated = inner.simulated
        self.hits = 0
        self.asked = 0
        self.times = {"keys": 0.0, "lookup": 0.0, "commit": 0.0}
        """Seconds spent hashing query keys, looking answers up and committing them."""
        self.image_stats: dict[str, list[int]] | None = {} if track_images else None
        """With track_images: source image uid -> [store hits, inner-engine queries], summed over its batches
        (an image asked in several rounds); the caller pops an image's entry when it is done with it."""

    @property
    def capacity(self) -> int:
        return self.inner.capacity

    @property
    def stats(self):
        return self.inner.stats

    def close(self) -> None:
        self.inner.close()

    def generate(self, batch: EngineBatch) -> list[Completion]:
        for _, completions, _ in self.stream_stats([batch]):
            return completions
        return []

    def stream(self, batches: Iterable[EngineBatch]) -> Iterator[tuple[EngineBatch, list[Completion]]]:
        for batch, completions, _ in self.stream_stats(batches):
            yield batch, completions

    def stream_stats(self, batches: Iterable[EngineBatch]) -> Iterator[tuple[EngineBatch, list[Completion], BatchStats]]:
        """Like `stream`, with each batch's store hits and inner-engine queries."""
        for sub, answers in self.inner.stream(self._feed(batches)):
            yield self._finish(sub, answers)

    # -- internals
    def keys(self, batch: EngineBatch) -> tuple[list[bytes], list[bytes]]:
        """32-byte keys (image part + query part) of a batch's queries, and the distinct image parts."""
        prefix_of: dict[str, bytes] = {}
        keys = []
        qpart = AnswerStore.query_part
        for q in batch.queries:
            base = q.image_uids[0].split(":", 1)[0] if q.image_uids else ""
            p = prefix_of.get(base)
            if p is None:
                p = prefix_of[base] = AnswerStore.image_part(self.model_key, self.profile, batch.sampling, base)
            keys.append(p + qpart(q))
        return keys, list(prefix_of.values())

    def _feed(self, batches: Iterable[EngineBatch]) -> Iterator[EngineBatch]:
        for batch in batches:
            t0 = time.perf_counter()
            keys, prefixes = self.keys(batch)
            t1 = time.perf_counter()
            found: dict[bytes, tuple] = {}
            for p in prefixes:
                found.update((p + q, row) for q, row in self.store.lookup(p).items())
            self.times["keys"] += t1 - t0
            self.times["lookup"] += time.perf_counter() - t1
            if not found:
                ask_keys, ask_queries = list(dict.fromkeys(keys)), batch.queries
                if len(ask_keys) != len(keys):
                    ask_queries = list({k: q for k, q in zip(keys, batch.queries)}.values())
            else:
                ask = {k: q for k, q in zip(keys, batch.queries) if k not in found}
                ask_keys, ask_queries = list(ask), list(ask.values())
            if len(ask_queries) == len(batch.queries):
                images = batch.images
            else:
                uids = {u for q in ask_queries for u in q.image_uids}
                images = {u: im for u, im in batch.images.items() if u in uids}
            yield EngineBatch(images, ask_queries, batch.sampling, _Pending(batch, keys, prefixes, found, ask_keys))

    def _finish(self, sub: EngineBatch, answers: list[Completion]):
        pend: _Pending = sub.tag
        batch = pend.batch
        if len(answers) != len(pend.ask_keys):
            raise RuntimeError(f"inner engine returned {len(answers)} answers for {len(pend.ask_keys)} queries")
        hits = sum(k in pend.found for k in pend.keys) if pend.found else 0
        t0 = time.perf_counter()
        errors = sum(c.error is not None for c in answers)
        if pend.ask_keys:
            if not errors and len(pend.prefixes) == 1:  # the common case: one image, every answer good
                groups = [(pend.prefixes[0], [k[16:] for k in pend.ask_keys], answers)]
            else:
                by_prefix: dict[bytes, tuple[list, list]] = {}
                for k, c in zip(pend.ask_keys, answers):
                    if c.error is None:
                        g = by_prefix.setdefault(k[:16], ([], []))
                        g[0].append(k[16:])
                        g[1].append(c)
                groups = [(p, qs, cs) for p, (qs, cs) in by_prefix.items()]
            first = batch.queries[0].image_uids[0] if batch.queries and batch.queries[0].image_uids else ""
            self.store.commit(groups, image=first, queries=len(batch.queries), hits=hits, asked=len(pend.ask_keys))
        self.times["commit"] += time.perf_counter() - t0
        if not pend.found and len(pend.ask_keys) == len(pend.keys):
            out = answers
        else:
            new = dict(zip(pend.ask_keys, answers))
            out = []
            for k in pend.keys:
                row = pend.found.get(k)
                out.append(Completion(row[0], row[1], row[2], row[3]) if row is not None else new[k])
        self.hits += hits
        self.asked += len(pend.ask_keys)
        if self.image_stats is not None and batch.queries:
            uids = batch.queries[0].image_uids
            st = self.image_stats.setdefault(uids[0].split(":", 1)[0] if uids else "", [0, 0])
            st[0] += hits
            st[1] += len(pend.ask_keys)
        return batch, out, BatchStats(len(batch.queries), hits, len(pend.ask_keys), errors)
