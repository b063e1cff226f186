"""The label job: the depth stage over a whole manifest as a resumable batch job.

    job = LabelJob(cfg, out, shard=(0, 4))
    summary = job.run(inputs)            # also <out>/summary[-i].json

Around the depth stage it adds the answer store (every answer committed as its image's batch comes back,
so a killed job re-asks nothing), the output manifest (one Parquet row per image, rewritten periodically
and at the end), shards (every n-th image, own store, manifest and summary files) and the Ray pool.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator

from densify.config.loading import ConfigError
from densify.config.profiles import load_profile
from densify.engines import Engine
from densify.engines.store import AnswerStore, StoredEngine, store_path
from densify.io import outputs
from densify.io.images import (ImageSource, read_json_list, glob_images, iter_sources, manifest_kind, open_parquet,
                               walk_images)
from densify.io.layout import RunLayout, check_folder
from densify.stages.depth import DepthResult, DepthStage
from densify.stages.engine import build_engine
from densify.stages.settings import LabelConfig

log = logging.getLogger("densify.label")

__all__ = ["LabelJob", "iter_manifest", "count_manifest", "ManifestWriter"]


def iter_manifest(inputs: list[str] | str, shard: tuple[int, int] = (0, 1), *, exclude=()) -> Iterator[ImageSource]:
    """Image sources of a manifest, in order, streamed; ids safe and unique; only shard i of n (every n-th).
    Folder walks and globs leave out `exclude` (the job's output folders; see densify.io.images)."""
    i, n = shard
    for k, src in enumerate(iter_sources(inputs, exclude=exclude)):
        if k % n == i:
            yield src


def count_manifest(inputs: list[str] | str, shard: tuple[int, int] = (0, 1), *, exclude=()) -> int:
    """Images in the shard (a cheap first pass: Parquet metadata, JSONL lines, a folder walk)."""
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    total = 0
    for item in inputs:
        kind = manifest_kind(str(item))
        if kind == "parquet":
            total += open_parquet(Path(item)).metadata.num_rows
        elif kind == "jsonl":
            records = read_json_list(Path(item))
            if records is not None:
                total += len(records)
            else:
                with open(item) as f:
                    total += sum(1 for line in f if line.strip())
        elif kind == "dir":
            total += sum(1 for _ in walk_images(Path(item), exclude=exclude))
        elif kind == "file":
            total += 1
        else:
            total += len(glob_images(str(item), exclude=exclude))  # one matching nothing: an error now, not later
    i, n = shard
    return len(range(i, total, n))


_COLUMNS = ("id", "image", "status", "error_kind", "error", "queries", "store_hits", "engine_queries",
            "dir", "depth_npy", "depth_png", "confidence", "cloud", "wall_s")


def _schema():
    import pyarrow as pa

    s, i, f = pa.string(), pa.int64(), pa.float64()
    types = {"queries": i, "store_hits": i, "engine_queries": i, "wall_s": f}
    return pa.schema([pa.field(c, types.get(c, s)) for c in _COLUMNS])


class ManifestWriter:
    """One status row per image, kept as Arrow record batches; written atomically as Parquet."""

    def __init__(self, path: Path, every_s: float):
        self.path = path
        self.every_s = every_s
        self._rows: dict[str, list] = {c: [] for c in _COLUMNS}
        self._batches: list = []
        self._last = time.perf_counter()

    def add(self, **row) -> None:
        for c in _COLUMNS:
            self._rows[c].append(row.get(c))
        if len(self._rows["id"]) >= 1024:
            self._seal()
        if time.perf_counter() - self._last >= self.every_s:
            self.write()

    def _seal(self) -> None:
        import pyarrow as pa

        if self._rows["id"]:
            schema = _schema()
            self._batches.append(pa.record_batch([pa.array(self._rows[f.name], type=f.type) for f in schema],
                                                 schema=schema))
            self._rows = {c: [] for c in _COLUMNS}

    def write(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._seal()
        table = pa.Table.from_batches(self._batches, schema=_schema())
        with outputs.atomic_path(self.path) as tmp:
            pq.write_table(table, tmp)
        self._last = time.perf_counter()


class LabelJob:
    """One shard of a labelling job (see the module docstring).

    engine: a ready engine to use instead of the configured one (not closed here; its answers are keyed in
    the store by `model_key`, default from the config). progress: a `densify.io.progress.Progress` or None.
    """

    def __init__(self, cfg: LabelConfig, out: str | Path, *, shard: tuple[int, int] = (0, 1),
                 engine: Engine | None = None, model_key: str | None = None, progress=None):
        i, n = shard
        if not (n >= 1 and 0 <= i < n):
            raise ConfigError(f"--shard: need 0 <= i < n, got {i}/{n}")
        if cfg.ray.cpu_workers and not (cfg.ray.enabled or engine is not None):
            raise ConfigError("ray.cpu_workers: CPU workers run in Ray; drop --no-ray, or set ray.cpu_workers=0")
        self.cfg, self.shard = cfg, shard
        self.profile = load_profile(cfg.profile)
        self.layout = RunLayout(out, shard=shard)
        self.layout.check()
        if cfg.store.dir:
            check_folder(cfg.store.dir, "--store")
        self.engine = engine
        self.model_key = model_key
        self.progress = progress

    def run(self, inputs: list[str] | str) -> dict:
        cfg, layout = self.cfg, self.layout
        t0, cpu0 = time.perf_counter(), time.process_time()
        exclude = [layout.root] + ([cfg.store.dir] if cfg.store.dir else [])
        total = count_manifest(inputs, self.shard, exclude=exclude)
        own = self.engine is None
        inner = self.engine if self.engine is not None else build_engine(cfg.engine, self.profile, model=cfg.model,
                                                                          ray=cfg.ray)
        store = self._open_store(inner, own)
        layout.root.mkdir(parents=True, exist_ok=True)
        outputs.sweep_temp_files(layout.root, [layout.manifest.name, layout.summary.name])  # this shard's only
        key = self.model_key or _model_key(cfg)
        eng = StoredEngine(inner, store, key, profile=self.profile.name, track_images=True) \
            if store is not None else inner
        t_ready = time.perf_counter()
        log.info("label: %d image(s) in shard %d/%d; engine %s ready in %.1f s; store %s", total, *self.shard,
                 inner.name, t_ready - t0, store.path if store is not None else "off")
        stage = DepthStage(cfg, eng, layout=layout, cpu_workers=cfg.ray.cpu_workers)
        tally = _Tally(ManifestWriter(layout.manifest, cfg.manifest_every_s))
        interrupted, error = False, None
        results = stage.run(iter_manifest(inputs, self.shard, exclude=exclude))
        try:
            for res in results:
                hits, asked = eng.image_stats.pop(res.uid, (0, 0)) if store is not None and res.uid else \
                    (0, res.queries if res.status != "skipped" else 0)
                self._record(res, hits, asked, tally)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the only way a job is interrupted
            interrupted = True
            raise
        except BaseException as exc:  # the job stopped on an error: the summary says which
            error = f"{type(exc).__name__}: {exc}"[:500]
            raise
        finally:
            results.close()  # in-flight work is cancelled while the engine is still up
            if own:
                eng.close()  # before reading the pool's stats: closing adds the actors' CPU time
            pool_stats = dict(inner.stats)
            store_totals = _close_store(store)
            _write_unless_interrupted(tally.manifest.write, "the manifest", interrupted)
            times = {"startup": t_ready - t0, "driver_cpu": time.process_time() - cpu0}
            times.update({f"store_{k}": v for k, v in getattr(eng, "times", {}).items()})
            summary = self._summary(tally, total, inner.simulated, interrupted, error, time.perf_counter() - t0,
                                    t_ready - t0, times, pool_stats, store_totals)
            _write_unless_interrupted(lambda: outputs.write_json(layout.summary, summary), "the summary", interrupted)
        return summary

    def _open_store(self, inner: Engine, own: bool) -> AnswerStore | None:
        """The shard's answer store (None when off); the engine is closed here if opening it fails."""
        cfg = self.cfg
        try:
            if cfg.store.enabled:
                return AnswerStore(store_path(cfg.store.dir or self.layout.store_dir, self.shard[0]),
                                   synchronous=cfg.store.synchronous, exclusive=cfg.store.exclusive,
                                   on_damage="rebuild" if cfg.store.rebuild else "error")
        except BaseException:
            if own:
                inner.close()
            raise
        return None

    def _summary(self, tally: "_Tally", total: int, simulated: bool, interrupted: bool, error: str | None,
                 wall: float, startup: float, times: dict, pool_stats: dict, store_totals) -> dict:
        cfg, counts = self.cfg, tally.counts
        images = sum(counts.values())
        run_s = max(wall - startup, 1e-9)
        return {
            "profile": self.profile.name, "engine": cfg.engine.name,
            "model": None if simulated else cfg.model or self.profile.model,
            "simulated": simulated, "ray": cfg.ray.wraps(cfg.engine.options),
            "shard": f"{self.shard[0]}/{self.shard[1]}", "images_in_shard": total, "images": images, **counts,
            "complete": error is None and not interrupted and images == total, "interrupted": interrupted,
            **({"error": error} if error else {}),
            "failed_by_kind": tally.kinds, "failed_images": tally.failed, **tally.totals,
            "wall_s": wall, "startup_s": startup, "images_per_s": counts["ok"] / run_s,
            "queries_per_s": tally.totals["queries"] / run_s, "time_s": times, "pool": pool_stats,
            "store": store_totals,
        }

    def _record(self, res: DepthResult, hits: int, asked: int, tally: "_Tally") -> None:
        tally.add(res, hits, asked)
        o = self.cfg.outputs
        paths = {}
        if res.status != "failed":
            f = self.layout.image(res.id)
            rel = lambda p, on: str(p.relative_to(self.layout.root)) if on else None  # noqa: E731
            paths = {"dir": rel(f.dir, True), "depth_npy": rel(f.depth_npy, o.npy), "depth_png": rel(f.depth_png, o.png16),
                     "confidence": rel(f.confidence, o.confidence), "cloud": rel(f.cloud, o.ply)}
        tally.manifest.add(id=res.id, image=res.image, status=res.status, error_kind=res.error_kind, error=res.error,
                           queries=res.queries, store_hits=hits, engine_queries=asked, wall_s=res.wall_s, **paths)
        if self.progress is not None:
            self.progress.update(queries=res.queries if res.status == "ok" else 0,
                                 failed=int(res.status == "failed"), store_hits=hits if res.status == "ok" else 0)


class _Tally:
    """A shard's running counts and its output manifest."""

    def __init__(self, manifest: ManifestWriter):
        self.manifest = manifest
        self.counts = {"ok": 0, "skipped": 0, "failed": 0}
        self.kinds: dict[str, int] = {}
        self.failed: list[dict] = []
        self.totals = {"queries": 0, "store_hits": 0, "engine_queries": 0, "answer_failures": 0}

    def add(self, res: DepthResult, hits: int, asked: int) -> None:
        self.counts[res.status] += 1
        if res.status == "failed":
            self.kinds[res.error_kind] = self.kinds.get(res.error_kind, 0) + 1
            if len(self.failed) < 1000:
                self.failed.append({"id": res.id, "image": res.image, "kind": res.error_kind, "error": res.error})
            log.error("%s (%s): %s", res.id, res.error_kind, res.error)
        elif res.status == "ok":
            self.totals["queries"] += res.queries
            self.totals["answer_failures"] += sum(res.failures.values())
        self.totals["store_hits"] += hits
        self.totals["engine_queries"] += asked


def _write_unless_interrupted(write, what: str, interrupted: bool) -> None:
    """Write; when the job was interrupted, a failed write is logged (the interruption is what the user sees)."""
    try:
        write()
    except OSError as exc:
        if not interrupted:
            raise
        log.error("could not write %s: %s", what, exc)


def _close_store(store: AnswerStore | None):
    """The store's totals (None when off or unreadable), and the store closed."""
    if store is None:
        return None
    totals = None
    try:
        totals = store.totals()
    except Exception:  # a broken store must not hide the error that stopped the job
        pass
    store.close()
    return totals


def _model_key(cfg: LabelConfig) -> str:
    """The store key of the configured model: the answering engine and its answer-changing options."""
    return cfg.engine.answer_identity(cfg.model)
