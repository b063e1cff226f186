"""`densify label`: pseudo-label a dataset as a resumable batch job (depth maps for every image of a manifest).

    densify label MANIFEST --out DIR [--config configs/pipelines/label.yaml] [--shard i/n] [--ray-address ADDR]

MANIFEST is a folder, a glob, a JSONL file ({"image": path, "intrinsics": [fx, fy, cx, cy(, W, H)]} per line)
or a Parquet file (columns `image`, optional `intrinsics` list, optional `id`, `depth_path`). Images are read
as a stream: never all in memory, at most the engine pool's capacity in flight.

Per image it writes <out>/<id>/: depth.npy (float32 m), depth.png (uint16 mm), confidence.npy, optionally
cloud.ply, camera.json and, last, result.json: the image's done-marker (finished images are skipped on a
rerun). Every engine answer is committed to the answer store (<out>/store/answers-<shard>.sqlite) as soon
as its image's batch is answered, so a killed job resumes without asking the engine anything twice.
<out>/manifest.parquet holds one status row per image (rewritten periodically and at the end);
<out>/summary.json the counts, throughput and failures by kind. Exit status 1 when any image failed.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel, ConfigDict, Field

from densify import outputs
from densify.config import ConfigError
from densify.engines import EngineBatch, create_engine, generate_stream
from densify.images import IMAGE_SUFFIXES, ImageSource, iter_sources, manifest_kind, walk_images
from densify.profiles import load_profile
from densify.progress import Progress
from densify.store import AnswerStore, StoredEngine, model_key_for, store_path
from pipelines.configs import DepthJobConfig, OutputConfig, depth_overrides, load_job_config
from pipelines.depth import DepthTask, adaptive_stream, failure_kind, finish_task, prepare_task

__all__ = ["LabelJobConfig", "RayConfig", "StoreConfig", "iter_manifest", "run_label"]

log = logging.getLogger("densify.label")


# -- config

class StoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="commit every answer to the answer store (resume without re-asking)")
    dir: str | None = Field(None, description="store folder (default <out>/store); one answers-<shard>.sqlite per shard")
    synchronous: str = Field("NORMAL", pattern="^(OFF|NORMAL|FULL|EXTRA)$",
                             description="SQLite synchronous: NORMAL survives a killed job, FULL also a power cut")
    exclusive: bool = Field(True, description="lock the store file for the job's lifetime (WAL without shared "
                                              "memory: safe on network file systems, one job per shard)")


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="run engines in Ray actors; false: in this process (debugging)")
    address: str | None = Field(None, description="existing cluster ('auto' or ray://...); default a local Ray")
    num_actors: int | None = Field(None, ge=1, description="default: one per GPU, else one per CPU")
    num_gpus_per_actor: float = Field(0, ge=0, description="GPUs per actor (1 for a GPU engine)")
    num_cpus_per_actor: float = Field(1, gt=0, description="CPUs per actor")
    max_in_flight_per_actor: int = Field(2, ge=1, description="images queued per actor (the next is ready when "
                                                              "one finishes)")
    max_retries: int = Field(2, ge=0, description="resubmissions of an image after its actor died or failed")
    actor_max_restarts: int = Field(4, ge=0, description="times Ray restarts a dead actor")
    runtime_env: dict | None = Field(None, description="Ray runtime_env for the actors (e.g. working_dir, pip) "
                                                       "when the cluster's workers lack densify")


def _label_outputs() -> OutputConfig:
    return OutputConfig(preview=False, ply=False, answers=False)


class LabelJobConfig(DepthJobConfig):
    """`densify label`: the depth job's settings plus the batch-job machinery (store, Ray, manifests)."""
    model_config = ConfigDict(extra="forbid")
    outputs: OutputConfig = Field(default_factory=_label_outputs,
                                  description="per-image files (labels: depth, 16-bit PNG, confidence)")
    store: StoreConfig = Field(default_factory=StoreConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    manifest_every_s: float = Field(60.0, gt=0, description="rewrite the output manifest this often (seconds)")
    log_every_s: float = Field(30.0, gt=0, description="progress log line interval when not on a terminal")


# -- the input manifest, as a stream (densify.images)

def iter_manifest(inputs: list[str] | str, shard: tuple[int, int] = (0, 1)) -> Iterator[ImageSource]:
    """Image sources of a manifest, in order, streamed; ids made unique; only shard i of n (every n-th)."""
    i, n = shard
    for k, src in enumerate(iter_sources(inputs)):
        if k % n == i:
            yield src


def count_manifest(inputs: list[str] | str, shard: tuple[int, int] = (0, 1)) -> int:
    """Images in the shard (a cheap first pass: Parquet metadata, JSONL lines, a folder walk)."""
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    total = 0
    for item in inputs:
        kind = manifest_kind(str(item))
        if kind == "parquet":
            import pyarrow.parquet as pq
            total += pq.ParquetFile(item).metadata.num_rows
        elif kind == "jsonl":
            with open(item) as f:
                total += sum(1 for line in f if line.strip())
        elif kind == "dir":
            total += sum(1 for _ in walk_images(Path(item)))
        elif kind == "file":
            total += 1
        else:
            total += sum(1 for m in glob.glob(str(item), recursive=True) if Path(m).suffix.lower() in IMAGE_SUFFIXES)
    i, n = shard
    return len(range(i, total, n))


# -- the output manifest

_COLUMNS = ("id", "image", "status", "error_kind", "error", "queries", "store_hits", "engine_queries",
            "dir", "depth_npy", "depth_png", "confidence", "cloud", "wall_s")


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
            self._batches.append(pa.record_batch([pa.array(self._rows[c], type=t) for c, t in _schema_types()],
                                                 schema=_schema()))
            self._rows = {c: [] for c in _COLUMNS}

    def write(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._seal()
        table = pa.Table.from_batches(self._batches, schema=_schema())
        with outputs.atomic_path(self.path) as tmp:
            pq.write_table(table, tmp)
        self._last = time.perf_counter()


def _schema_types():
    import pyarrow as pa

    s, i, f = pa.string(), pa.int64(), pa.float64()
    types = {"queries": i, "store_hits": i, "engine_queries": i, "wall_s": f}
    return [(c, types.get(c, s)) for c in _COLUMNS]


def _schema():
    import pyarrow as pa

    return pa.schema([pa.field(c, t) for c, t in _schema_types()])


def _output_paths(cfg: LabelJobConfig, sid: str) -> dict:
    o = cfg.outputs
    return {"dir": sid, "depth_npy": f"{sid}/depth.npy" if o.npy else None,
            "depth_png": f"{sid}/depth.png" if o.png16 else None,
            "confidence": f"{sid}/confidence.npy" if o.confidence else None,
            "cloud": f"{sid}/cloud.ply" if o.ply else None}


# -- the job

def _remove_temps(folder: Path, prefixes: tuple[str, ...] = (".",)) -> None:
    """Remove half-written temporary files a killed run left (outputs are written to '.<name>.*', then renamed)."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    for e in entries:
        if e.name.startswith(prefixes) and e.is_file():
            try:
                os.unlink(e.path)
            except FileNotFoundError:
                pass


@dataclass
class _Timer:
    prepare: float = 0.0
    finish: float = 0.0
    manifest: float = 0.0


def build_engine(cfg: LabelJobConfig, profile):
    """The configured engine, in a pool of Ray actors unless `ray.enabled` is false."""
    if cfg.engine.name == "ray" or not cfg.ray.enabled:
        return create_engine(cfg.engine.name, profile=profile, **cfg.engine.options)
    try:
        import ray  # noqa: F401
    except ModuleNotFoundError:
        raise ConfigError("ray.enabled: Ray is not installed; pip install 'densify[ray]', or run the engine in "
                          "this process with --no-ray") from None
    from densify.engines.ray_pool import RayPoolEngine

    r = cfg.ray
    return RayPoolEngine(profile, engine=cfg.engine.name, engine_options=cfg.engine.options, num_actors=r.num_actors,
                         num_gpus_per_actor=r.num_gpus_per_actor, num_cpus_per_actor=r.num_cpus_per_actor,
                         ray_address=r.address, max_in_flight_per_actor=r.max_in_flight_per_actor,
                         max_retries=r.max_retries, actor_max_restarts=r.actor_max_restarts,
                         runtime_env=r.runtime_env)


def run_label(inputs: list[str] | str, cfg: LabelJobConfig, out_dir: str | Path, *, shard: tuple[int, int] = (0, 1),
              engine=None, progress: bool = True, model_key: str | None = None) -> dict:
    """Label every image of the manifest (shard i of n); returns the summary (also <out>/summary.json).

    `engine`: a ready engine to use instead of the configured one (it is not closed here); `model_key`
    names its answers in the store (default: from the config's engine name and options).
    """
    i_shard, n_shard = shard
    if not (n_shard >= 1 and 0 <= i_shard < n_shard):
        raise ConfigError(f"--shard: need 0 <= i < n, got {i_shard}/{n_shard}")
    profile = load_profile(cfg.profile)
    if profile.task != "depth":
        raise ConfigError(f"profile: {profile.name!r} is a {profile.task} profile; densify label needs a depth profile")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if n_shard == 1 else f"-{i_shard}"
    _remove_temps(out, (f".manifest{suffix}.", f".summary{suffix}."))
    total = count_manifest(inputs, shard)
    sources = iter_manifest(inputs, shard)
    manifest = ManifestWriter(out / f"manifest{suffix}.parquet", cfg.manifest_every_s)
    t0, cpu0 = time.perf_counter(), time.process_time()

    store = None
    if cfg.store.enabled:
        store = AnswerStore(store_path(cfg.store.dir or out / "store", i_shard), synchronous=cfg.store.synchronous,
                            exclusive=cfg.store.exclusive)
    own_engine = engine is None
    try:
        inner = engine if engine is not None else build_engine(cfg, profile)
    except BaseException:
        if store is not None:
            store.close()
        raise
    # The same answers whether the engine runs in actors or here: the key names the engine and its options.
    key = model_key or model_key_for(cfg.engine.name, cfg.engine.options)
    eng = StoredEngine(inner, store, key, profile=profile.name, track_images=True) if store is not None else inner
    with_truth = bool(getattr(inner, "uses_truth", False))
    t_ready = time.perf_counter()
    log.info("label: %d image(s) in shard %d/%d; engine %s ready in %.1f s; store %s", total, i_shard, n_shard,
             getattr(inner, "name", "?"), t_ready - t0, store.path if store is not None else "off")

    counts = {"ok": 0, "skipped": 0, "failed": 0}
    fail_kinds: dict[str, int] = {}
    failed_images: list[dict] = []
    totals = {"queries": 0, "store_hits": 0, "engine_queries": 0, "answer_failures": 0}
    timer = _Timer()
    started: dict[str, float] = {}
    bar = Progress(total, enabled=progress, every_s=cfg.log_every_s)

    def record(src: ImageSource, status: str, *, kind: str | None = None, error: str | None = None,
               queries: int = 0, hits: int = 0, asked: int = 0, wall: float = 0.0) -> None:
        counts[status] += 1
        if status == "failed":
            fail_kinds[kind] = fail_kinds.get(kind, 0) + 1
            if len(failed_images) < 1000:
                failed_images.append({"id": src.id, "image": str(src.path), "kind": kind, "error": error})
            log.error("%s (%s): %s", src.id, kind, error)
        paths = _output_paths(cfg, src.id) if status != "failed" else {}
        tm = time.perf_counter()
        manifest.add(id=src.id, image=str(src.path), status=status, error_kind=kind, error=error, queries=queries,
                     store_hits=hits, engine_queries=asked, wall_s=wall, **paths)
        timer.manifest += time.perf_counter() - tm
        bar.update(queries=queries if status == "ok" else 0, failed=int(status == "failed"),
                   store_hits=hits if status == "ok" else 0)

    def batches() -> Iterator[EngineBatch]:
        for src in sources:
            ts = time.perf_counter()
            if "manifest_error" in src.extra:
                record(src, "failed", kind="manifest", error=src.extra["manifest_error"])
                continue
            done = out / src.id / "result.json"
            if not cfg.overwrite and done.is_file():
                try:
                    q = int(json.loads(done.read_text()).get("queries", 0))
                except (OSError, ValueError):
                    q = 0
                record(src, "skipped", queries=q)
                continue
            try:
                _, batch = prepare_task(src, profile, cfg, with_truth=with_truth)
            except Exception as exc:  # a bad image never stops the job
                record(src, "failed", kind=failure_kind(exc, src), error=str(exc),
                       wall=time.perf_counter() - ts)
                timer.prepare += time.perf_counter() - ts
                continue
            started[src.id] = ts
            timer.prepare += time.perf_counter() - ts
            yield batch

    if cfg.plan.mode == "adaptive":  # rounds per image, images_in_flight of them in lockstep
        lockstep = cfg.model_copy(update={"images_in_flight": max(cfg.images_in_flight,
                                                                  getattr(inner, "capacity", 1))})
        stream = adaptive_stream(eng, batches(), profile, lockstep)
    else:
        stream = generate_stream(eng, batches())
    interrupted = True
    try:
        for batch, completions in stream:
            task: DepthTask = batch.tag
            src = task.source
            ts = time.perf_counter()
            if store is not None:
                uid = batch.queries[0].image_uids[0].split(":", 1)[0] if batch.queries else ""
                hits, asked = eng.image_stats.pop(uid, (0, 0))
            else:
                hits, asked = 0, len(completions)
            totals["store_hits"] += hits
            totals["engine_queries"] += asked
            errors = [c.error for c in completions if c.error is not None]
            wall = ts - started.pop(src.id, ts)
            if errors:
                record(src, "failed", kind="engine", error=f"{len(errors)} of {len(completions)} answers failed: "
                                                           f"{errors[0]}", queries=len(completions), hits=hits,
                       asked=asked, wall=wall)
                continue
            try:
                _remove_temps(out / src.id)
                res = finish_task(task, completions, profile, cfg, out)
            except Exception as exc:
                record(src, "failed", kind="output", error=f"{type(exc).__name__}: {exc}", queries=len(completions),
                       hits=hits, asked=asked)
                continue
            finally:
                timer.finish += time.perf_counter() - ts
            if res.status == "failed":  # no answer could be parsed: nothing to densify
                record(src, "failed", kind=res.error_kind or "answers", error=res.error, queries=res.queries,
                       hits=hits, asked=asked, wall=time.perf_counter() - ts + wall)
                continue
            totals["queries"] += res.queries
            totals["answer_failures"] += sum(res.failures.values())
            record(src, "ok", queries=res.queries, hits=hits, asked=asked, wall=time.perf_counter() - ts + wall)
        interrupted = False
    finally:
        bar.close()
        if own_engine:
            eng.close()  # before reading the pool's stats: closing adds the actors' CPU time
        pool_stats = dict(getattr(inner, "stats", {}) or {})
        store_totals = None
        if store is not None:
            try:
                store_totals = store.totals()
            except Exception:  # a broken store must not hide the error that stopped the job
                pass
            store.close()
        manifest.write()
        wall = time.perf_counter() - t0
        times = {"startup": t_ready - t0, "prepare": timer.prepare, "finish": timer.finish,
                 "manifest": timer.manifest}
        times.update({f"store_{k}": v for k, v in getattr(eng, "times", {}).items()})
        for k in ("wait_s", "put_s", "engine_s"):
            if k in pool_stats:
                times[{"wait_s": "engine_wait", "put_s": "object_store_put", "engine_s": "actors_in_engine"}[k]] = \
                    pool_stats.pop(k)
        times["driver_cpu"] = time.process_time() - cpu0
        summary = _summary(counts, fail_kinds, failed_images, totals, wall, t_ready - t0, times, pool_stats,
                           store_totals, cfg, profile.name, shard, total, interrupted)
        outputs.write_json(out / f"summary{suffix}.json", summary)
    return summary


def _summary(counts, fail_kinds, failed_images, totals, wall, startup, times, pool_stats, store_totals, cfg,
             profile_name, shard, total, interrupted) -> dict:
    images = sum(counts.values())
    run_s = max(wall - startup, 1e-9)
    processed = counts["ok"]
    return {
        "profile": profile_name, "engine": cfg.engine.name, "ray": cfg.ray.enabled and cfg.engine.name != "ray",
        "shard": f"{shard[0]}/{shard[1]}", "images_in_shard": total, "images": images, **counts,
        "complete": not interrupted and images == total,
        "failed_by_kind": fail_kinds, "failed_images": failed_images,
        "queries": totals["queries"], "store_hits": totals["store_hits"], "engine_queries": totals["engine_queries"],
        "answer_failures": totals["answer_failures"],
        "wall_s": wall, "startup_s": startup,
        "images_per_s": processed / run_s, "queries_per_s": totals["queries"] / run_s,
        "time_s": times,
        "pool": pool_stats, "store": store_totals,
    }


# -- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", nargs="+", help="folder, glob, .jsonl or .parquet manifest (image, intrinsics)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", help="pipeline YAML (default: configs/pipelines/label.yaml)")
    p.add_argument("--profile", help="model profile (vlm3-depth, depthlm, or a YAML path)")
    p.add_argument("--engine", help="engine each actor runs: simulated | hf | vllm | openai")
    p.add_argument("--model", help="checkpoint path or name for the engine (default: the profile's)")
    p.add_argument("--shard", default="0/1", help="i/n: process every n-th image starting at i (own store file)")
    p.add_argument("--ray-address", help="run on an existing Ray cluster ('auto' or ray://host:port)")
    p.add_argument("--no-ray", action="store_true", help="run the engine in this process")
    p.add_argument("--store", help="answer store folder (default <out>/store)")
    p.add_argument("--stride", type=float, help="query every N pixels")
    p.add_argument("--count", type=int, help="about N queries per image")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key")
    p.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist (stored answers are reused)")


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must be i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"--shard must satisfy 0 <= i < n, got {text!r}")
    return i, n


def config_from_args(args) -> LabelJobConfig:
    over = depth_overrides(args)
    if args.ray_address:
        over.setdefault("ray", {})["address"] = args.ray_address
    if args.no_ray:
        over.setdefault("ray", {})["enabled"] = False
    if args.store:
        over.setdefault("store", {})["dir"] = args.store
    return load_job_config(LabelJobConfig, args.config, over, default_name="label")


def run(args) -> int:
    cfg = config_from_args(args)
    shard = parse_shard(args.shard)
    log.info("config: %s", cfg.model_dump_json())
    summary = run_label(args.manifest, cfg, args.out, shard=shard)
    print_summary(summary, args.out)
    return 1 if summary["failed"] else 0


def print_summary(s: dict, out) -> None:
    from rich.console import Console

    c = Console(stderr=False)
    c.print(f"[bold]densify label[/] (shard {s['shard']}): {s['ok']} ok, {s['skipped']} skipped, {s['failed']} failed "
            f"of {s['images']} images; {s['queries']:,} answers ({s['store_hits']:,} from the store, "
            f"{s['engine_queries']:,} asked) in {s['wall_s']:.1f} s ({s['images_per_s']:.2f} images/s, "
            f"{s['queries_per_s']:,.0f} q/s)")
    if s["failed"]:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(s["failed_by_kind"].items()))
        c.print(f"  [red]failed[/] by kind: {kinds}")
        for f in s["failed_images"][:20]:
            c.print(f"  [red]failed[/] {f['id']} ({f['kind']}): {f['error']}")
        if s["failed"] > 20:
            c.print(f"  ... and {s['failed'] - 20} more in {out}/manifest.parquet")
    c.print(f"outputs in {out}")
