"""The answer store: every engine answer is committed to a durable store, so a restarted job asks nothing twice.

An answer is keyed by (model, profile, sampling, prompt image, prompt text): a 32-byte key whose first 16
bytes name the image the query is about (so one range scan finds all stored answers of an image) and whose
last 16 bytes name the rest of the query. Prompt-image uids are content hashes of the preprocessed
pixels (`densify.queries.prompts.image_uid`); the part before the first ':' names the source image (marker
profiles draw one image per query, `<uid>:m<i>`).

Storage is SQLite in WAL mode, one file per shard (answers-<i>.sqlite): one writer per file, so shards on
shared storage never contend. With `exclusive=True` (the default) the file is locked by its job for the
job's lifetime: WAL then needs no shared-memory index, which is what makes it safe on network file
systems, and a second job started on the same shard fails at once instead of corrupting it.

Damage: a file that is not a whole SQLite database (garbage, truncated) is found when the store opens and
raises `StoreDamagedError` naming the file and the fix; `AnswerStore(path, on_damage="rebuild")` (or
`AnswerStore.rebuild(path)`) moves it aside as `<name>.damaged-<time>` and starts a fresh one. One damaged
answer record (bad magic, zlib or JSON) is moved to the `quarantine` table when it is read: its queries are
simply not found and get asked again. A store held by another job is refused at once (`StoreLockedError`);
a full disk on commit is one `StoreFullError`.

`StoredEngine(inner, store, model_key)` wraps any engine: each batch is looked up first, only the misses
go to the inner engine (still one batch per image), and the answers are committed right after the batch
comes back, in one transaction together with a record of how many queries the inner engine answered.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from densify.engines.base import Completion, Engine, EngineBatch, Query, Sampling
from densify.engines.options import EngineOptions, identity
from densify.engines.registry import engine_names, options_model

__all__ = ["AnswerStore", "StoredEngine", "BatchStats", "StoreError", "StoreDamagedError", "StoreLockedError",
           "StoreFullError", "ANSWER_OPTIONS", "TRANSPORT_OPTIONS", "model_key_for", "store_path"]

log = logging.getLogger("densify.engines.store")

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
CREATE TABLE IF NOT EXISTS quarantine (   -- damaged answer records, moved out of `batches` when read
    id INTEGER PRIMARY KEY,
    batch_id INTEGER,              -- the row of `batches` it came from (kept there with body NULL)
    prefix BLOB,
    image TEXT,
    t REAL,
    reason TEXT,
    body BLOB
);
"""

_MAGIC = b"DSA1"


def _pack(qparts: list[bytes], answers: list[Completion]) -> bytes:
    """MAGIC, n (4 bytes), n 16-byte query parts, zlib(JSON [texts, logprobs, n_prompt, n_generated])."""
    cols = [[c.text for c in answers], [c.logprob for c in answers], [c.n_prompt_tokens for c in answers],
            [c.n_generated_tokens for c in answers]]
    payload = zlib.compress(json.dumps(cols, separators=(",", ":")).encode(), 1)
    return _MAGIC + len(qparts).to_bytes(4, "little") + b"".join(qparts) + payload


def _unpack(body: bytes, out: dict) -> None:
    """Adds a record's answers to `out`; all or nothing. A damaged record raises _RecordDamaged."""
    try:
        if not isinstance(body, bytes) or body[:4] != _MAGIC:
            raise ValueError(f"unknown record format {bytes(body[:4]) if isinstance(body, bytes) else type(body)!r}")
        n = int.from_bytes(body[4:8], "little")
        keys = body[8:8 + 16 * n]
        if len(keys) != 16 * n:
            raise ValueError(f"{n} keys announced, {len(keys) // 16} present")
        cols = json.loads(zlib.decompress(body[8 + 16 * n:]))
        if not (isinstance(cols, list) and len(cols) == 4 and all(isinstance(c, list) and len(c) == n for c in cols)):
            raise ValueError("answer columns do not match the keys")
        texts, lps, n_prompt, n_gen = cols
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("an answer is not text")
        if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in lps):
            raise ValueError("a log-probability is not a number")
        if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in n_prompt + n_gen):
            raise ValueError("a token count is not an integer")
    except (ValueError, TypeError, zlib.error, OverflowError, RecursionError) as exc:
        raise _RecordDamaged(f"{type(exc).__name__}: {exc}"[:200]) from None
    for i, row in enumerate(zip(*cols)):
        out[keys[16 * i:16 * i + 16]] = row


class _RecordDamaged(Exception):
    """One answer record cannot be read (it is quarantined and its queries asked again)."""


class StoreError(RuntimeError):
    """The answer store cannot be opened or written (locked by another job, disk full, ...)."""


class StoreDamagedError(StoreError):
    """The store file as a whole is damaged (not SQLite, truncated, malformed pages). Fix: rebuild it."""


class StoreLockedError(StoreError):
    """Another job holds the store."""


class StoreFullError(StoreError):
    """The disk (or the store's size limit) is full; nothing of the failed batch was stored."""


_SQLITE_MAGIC = b"SQLite format 3\x00"
QUICK_CHECK_MAX_BYTES = 256 << 20
"""Stores up to this size get SQLite's full page check (`PRAGMA quick_check`) when they open; larger ones
(seconds per GB) only the header and size check, their page damage is found when a page is read."""


def _file_damage(path: Path) -> str | None:
    """Why the file cannot be a whole SQLite database (None: no sign of damage, or no file)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None  # SQLite's own empty database
    with open(path, "rb") as f:
        head = f.read(100)
    if len(head) < 100 or not head.startswith(_SQLITE_MAGIC):
        return "not an SQLite database (garbage, or truncated to its first bytes)"
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        return f"bad page size {page_size} in the header"
    if size % page_size:
        return f"truncated: {size} bytes is not a whole number of {page_size}-byte pages"
    wal = Path(f"{path}-wal")
    if wal.exists() and wal.stat().st_size > 0:
        return None  # an interrupted checkpoint may leave the file short of its header: SQLite recovers it
    n_pages = int.from_bytes(head[28:32], "big")
    if n_pages and head[24:28] == head[92:96] and n_pages * page_size > size:
        return f"truncated: the header counts {n_pages} pages, the file holds {size // page_size}"
    return None


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
                 busy_timeout_s: float = 10.0, readonly: bool = False, on_damage: str = "error"):
        """on_damage: "error" (raise StoreDamagedError naming the fix) or "rebuild" (move the damaged file
        aside, see `rebuild`, and start a fresh store). A store held by another job is refused at once;
        busy_timeout_s applies to later statements of a non-exclusive store."""
        if on_damage not in ("error", "rebuild"):
            raise ValueError(f"on_damage must be 'error' or 'rebuild', got {on_damage!r}")
        self.path = Path(path)
        self.readonly = readonly
        self.quarantined = 0
        """Damaged answer records found (and quarantined) since the store opened."""
        self.moved_aside: Path | None = None
        """Where a damaged store was moved by on_damage="rebuild"."""
        self._write_lock = threading.Lock()  # commits and quarantine moves may come from two threads
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif not self.path.is_file():
            raise StoreError(f"{self.path}: no such answer store")
        try:
            self._open(synchronous, exclusive, busy_timeout_s)
        except StoreDamagedError:
            if on_damage != "rebuild" or readonly:
                raise
            self.moved_aside = self.rebuild(self.path)
            log.warning("%s: the answer store was damaged; moved it aside to %s and started a fresh one "
                        "(its answers will be asked again)", self.path, self.moved_aside)
            self._open(synchronous, exclusive, busy_timeout_s)

    def _damaged(self, why: object) -> StoreDamagedError:
        return StoreDamagedError(
            f"{self.path}: the answer store is damaged ({why}). Move it aside and start a fresh one with "
            f"--rebuild-store (AnswerStore(path, on_damage='rebuild')); its answers will be asked again")

    def _open(self, synchronous: str, exclusive: bool, busy_timeout_s: float) -> None:
        why = _file_damage(self.path)
        if why is not None:
            raise self._damaged(why)
        uri = f"file:{self.path}?mode=ro" if self.readonly else f"file:{self.path}"
        db = None
        try:
            # an exclusive store held by another job is refused at once, not after the busy timeout
            wait = 0 if exclusive and not self.readonly else busy_timeout_s
            db = sqlite3.connect(uri, uri=True, timeout=wait, isolation_level=None, check_same_thread=False)
            if exclusive and not self.readonly:
                db.execute("PRAGMA locking_mode=EXCLUSIVE")
            if not self.readonly:
                mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode.lower() != "wal":
                    log.warning("%s: SQLite would not switch to WAL (journal_mode=%s)", self.path, mode)
                db.execute(f"PRAGMA synchronous={synchronous}")
                db.executescript(_SCHEMA)
                db.execute("BEGIN IMMEDIATE")  # takes the write lock now (kept for the job when exclusive)
                db.execute("COMMIT")
            db.execute("SELECT count(*) FROM meta").fetchone()
            if self.path.stat().st_size <= QUICK_CHECK_MAX_BYTES:
                res = [r[0] for r in db.execute("PRAGMA quick_check(3)")]
                if res != ["ok"]:
                    raise self._damaged("; ".join(map(str, res))[:300])
            db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        except StoreError:
            if db is not None:
                db.close()
            raise
        except sqlite3.Error as exc:
            if db is not None:
                db.close()
            if getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) \
                    or "locked" in str(exc):
                raise StoreLockedError(
                    f"{self.path}: the answer store is in use by another job ({exc}); wait for that job to end, "
                    f"or give this one its own store (another --shard or store folder)") from None
            if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError) \
                    or "malformed" in str(exc) or "not a database" in str(exc):
                raise self._damaged(exc) from None
            raise StoreError(f"{self.path}: cannot open the answer store: {exc}") from None
        self.db = db

    @staticmethod
    def rebuild(path: str | Path) -> Path | None:
        """Move a damaged store (with its -wal and -shm files) aside as `<name>.damaged-<UTC time>` so a
        fresh one can start at `path`; returns the new name (None when there was no file). Only for a store
        no job has open."""
        path = Path(path)
        if not path.exists():
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = path.with_name(f"{path.name}.damaged-{stamp}")
        n = 1
        while dest.exists():
            n += 1
            dest = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
        os.replace(path, dest)
        for suffix in ("-wal", "-shm"):
            side = Path(f"{path}{suffix}")
            if side.exists():
                os.replace(side, Path(f"{dest}{suffix}"))
        return dest

    # -- keys
    @staticmethod
    def image_part(model_key: str, profile: str, sampling: Sampling, image_uid: str) -> bytes:
        """16 bytes naming (model, profile, sampling, source image)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps([model_key, profile, _sampling_tuple(sampling), image_uid.split(":", 1)[0]]).encode())
        return h.digest()

    @staticmethod
    def query_part(q: Query) -> bytes:
        """16 bytes naming (prompt images, prompt text) within an image part (a marked image's uid names
        its marked pixel, so the two say everything the model is asked)."""
        text = "\x1f".join(q.image_uids) + "\x1e" + q.text
        return hashlib.blake2b(text.encode(), digest_size=16).digest()

    # -- reads
    def _read(self, sql: str, args=()) -> list:
        """Rows of a query; page damage found while reading is one StoreDamagedError."""
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "malformed" not in str(exc):
                raise StoreError(f"{self.path}: cannot read the answer store: {exc}") from None
            raise self._damaged(exc) from None

    def _unpack_rows(self, rows, out_for) -> None:
        """Unpack (id, prefix, body) rows; damaged ones are quarantined (their answers count as not stored)."""
        bad = []
        for rid, prefix, body in rows:
            try:
                _unpack(body, out_for(prefix))
            except _RecordDamaged as exc:
                bad.append((rid, str(exc)))
        if bad:
            self._quarantine(bad)

    def _quarantine(self, bad: list[tuple[int, str]]) -> None:
        self.quarantined += len(bad)
        for rid, why in bad:
            log.warning("%s: answer record %d is damaged (%s); %s, its queries will be asked again", self.path,
                        rid, why, "skipped (read-only store)" if self.readonly else "moved to the quarantine table")
        if self.readonly:
            return
        try:
            with self._write_lock:
                self._quarantine_rows(bad)
        except sqlite3.Error as exc:
            # the damaged records stay where they are and are skipped again next time
            log.warning("%s: could not quarantine damaged records: %s", self.path, exc)

    def _quarantine_rows(self, bad: list[tuple[int, str]]) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for rid, why in bad:
                self.db.execute("INSERT INTO quarantine (batch_id, prefix, image, t, reason, body) "
                                "SELECT id, prefix, image, t, ?, body FROM batches WHERE id = ?", (why, rid))
                self.db.execute("UPDATE batches SET body = NULL, stored = 0 WHERE id = ?", (rid,))
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    def lookup(self, prefix: bytes) -> dict[bytes, tuple]:
        """Every answer stored under an image part: query part -> (text, logprob, n_prompt, n_generated)."""
        out: dict[bytes, tuple] = {}
        rows = self._read("SELECT id, prefix, body FROM batches WHERE prefix = ? AND stored > 0 ORDER BY id",
                          (prefix,))
        self._unpack_rows(rows, lambda _p: out)
        return out

    def __len__(self) -> int:
        """Answers stored."""
        return self._read("SELECT coalesce(sum(stored), 0) FROM batches")[0][0]

    def totals(self) -> dict:
        """Sums over committed batches: the inner engine's work is `asked` (committed queries only)."""
        row = self._read("SELECT count(*), coalesce(sum(queries), 0), coalesce(sum(hits), 0), "
                         "coalesce(sum(asked), 0), coalesce(sum(stored), 0) FROM batches")[0]
        return dict(zip(("batches", "queries", "hits", "asked", "stored"), row))

    def answers(self) -> dict[bytes, tuple]:
        """Every stored answer, keyed by image part + query part (for checks and exports)."""
        parts: dict[bytes, dict] = {}
        rows = self._read("SELECT id, prefix, body FROM batches WHERE stored > 0 ORDER BY id")
        self._unpack_rows(rows, lambda p: parts.setdefault(p, {}))
        return {p + k: v for p, part in parts.items() for k, v in part.items()}

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
            with self._write_lock:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    self.db.executemany("INSERT INTO batches (prefix, image, queries, hits, asked, stored, t, body) "
                                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                    self.db.execute("COMMIT")
                except BaseException:
                    # SQLite may have rolled back already (a full disk does): a second ROLLBACK would hide the cause
                    if self.db.in_transaction:
                        try:
                            self.db.execute("ROLLBACK")
                        except sqlite3.Error:
                            pass
                    raise
        except (sqlite3.Error, OSError) as exc:
            raise self._write_error(exc) from None

    def _write_error(self, exc: Exception) -> StoreError:
        full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc) \
            or getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        if full:
            return StoreFullError(f"{self.path}: disk full, the answers of this batch were not stored ({exc}); "
                                  f"free space there or put the store elsewhere; everything committed before "
                                  f"is safe and a rerun resumes from it")
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            return self._damaged(exc)
        return StoreError(f"{self.path}: cannot commit answers: {exc}")

    def set_meta(self, key: str, value) -> None:
        try:
            with self._write_lock:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))
        except (sqlite3.Error, OSError) as exc:
            raise self._write_error(exc) from None

    def close(self) -> None:
        db = getattr(self, "db", None)
        if db is None:
            return
        try:
            db.close()
        except sqlite3.Error:
            pass

    def __enter__(self) -> "AnswerStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sampling_tuple(s: Sampling) -> list:
    # stop strings only when set: keys of answers stored before they existed stay the same
    return [s.max_tokens, s.system_prompt, s.prefill, s.structured_regex, s.logprobs] + ([list(s.stop)] if s.stop else [])


# The store key names what changes an answer: the engine's answer identity (its options' `answer_identity`:
# the engine and the options that change answers), the profile, the sampling, the prompt image and text.
# Transport options change where, how fast or how reliably answers come (servers, timeouts, retries,
# memory, batching, parallelism, devices, kernels, pool sizes), never what they say, and are left out:
# changing one replays the stored answers. Each options model marks its own (`transport`); any other option
# stays in the key (a new option re-asks rather than replays answers it may have changed); tests check that
# every option of every engine is in exactly one of the lists below.
def _option_lists() -> tuple[dict, dict]:
    """Per engine: the options (and Python-only arguments) that change answers, and the transport ones."""
    answer, transport = {}, {}
    for name in engine_names():
        model = options_model(name)
        transport[name] = model.transport
        answer[name] = frozenset(set(model.model_fields) - model.transport) | model.runtime
    return answer, transport


ANSWER_OPTIONS, TRANSPORT_OPTIONS = _option_lists()


def model_key_for(engine: str | EngineOptions, options: dict | None = None, *, model: str | None = None) -> str:
    """What identifies a model's answers (`EngineOptions.answer_identity`, also behind result fingerprints),
    from typed options, or from an engine name and a dict of its options as given (not checked: an unknown
    option stays in the key, on the safe side).

    model: the model the started engine actually serves (e.g. `OpenAIEngine.model`, resolved from the
    server when the option is unset); it fills in an unset `model` option, so two servers' answers never
    share a key. For a Ray pool the key is the one of the engine its actors run, with that engine's options.
    """
    if isinstance(engine, EngineOptions):
        return engine.answer_identity(model)
    if isinstance(options, EngineOptions):  # typed options already name their engine
        return options.answer_identity(model)
    if engine not in engine_names():  # an engine this process does not know: nothing is transport
        return identity(engine, dict(options or {}), frozenset(), model)
    return options_model(engine).identity_of(dict(options or {}), model)


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

    def _feed(self, batches: Iterable[EngineBatch | None]) -> Iterator[EngineBatch | None]:
        for batch in batches:
            if batch is None:  # the source has nothing new yet: the inner engine goes on with what it holds
                yield None
                continue
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
