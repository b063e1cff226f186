"""`densify label`: pseudo-label a dataset as a resumable batch job (depth maps for every image of a manifest).

    densify label MANIFEST --out DIR [--config FILE] [--shard i/n] [--ray-address ADDR]

MANIFEST is a folder, a glob, a JSONL file ({"image": path, "intrinsics": [fx, fy, cx, cy(, W, H)]} per line)
or a Parquet file (columns `image`, optional `intrinsics`, `id`, `depth_path`), read as a stream. Per image
<out>/<id>/ gets depth.npy, depth.png, confidence.npy, camera.json and, last, result.json; every engine
answer is committed to <out>/store/answers-<shard>.sqlite as its image's batch comes back, so a killed
job resumes without asking anything twice. <out>/manifest.parquet has a status row per image,
<out>/summary.json the counts, throughput and failures by kind. Exit 1 when any image failed.
"""

from __future__ import annotations

import argparse

from densify.config.loading import ConfigError, Override
from densify.stages.label import LabelJob, count_manifest
from densify.stages.settings import LabelConfig
from pipelines import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", nargs="+", help="A folder, glob, .jsonl or .parquet manifest of images.")
    p.add_argument("--out", required=True, help="The output folder (created if missing).")
    common.add_engine_args(p)
    common.add_plan_args(p)
    p.add_argument("--shard", default="0/1", help="Give i/n to label every n-th image starting at i, with its own store, "
                                                   "manifest and summary files (default 0/1: all).")
    p.add_argument("--ray-address", help="Run on an existing Ray cluster ('auto' or ray://host:port; default: a "
                                         "local Ray).")
    p.add_argument("--no-ray", action="store_true", help="Run the engine in this process instead of Ray actors.")
    p.add_argument("--store", help="The answer store folder (default <out>/store).")
    p.add_argument("--rebuild-store", action="store_true",
                   help="Move a damaged answer store aside and start a fresh one (default: stop and say so).")
    p.add_argument("--overwrite", action="store_true",
                   help="Redo finished images (stored answers are still reused).")
    common.add_config_args(p, "label")


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must be i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"--shard must satisfy 0 <= i < n, got {text!r}")
    return i, n


def config_from_args(args) -> LabelConfig:
    extra = []
    if args.ray_address:
        extra.append(Override(("ray", "address"), args.ray_address, f"--ray-address {args.ray_address}"))
    if args.no_ray:
        extra.append(Override(("ray", "enabled"), False, "--no-ray"))
    if args.store:
        extra.append(Override(("store", "dir"), args.store, f"--store {args.store}"))
    if args.rebuild_store:
        extra.append(Override(("store", "rebuild"), True, "--rebuild-store"))
    return common.load(args, LabelConfig, "label", extra)


def run(args) -> int:
    cfg = config_from_args(args)
    shard = parse_shard(args.shard)
    exclude = [args.out] + ([cfg.store.dir] if cfg.store.dir else [])
    job = LabelJob(cfg, args.out, shard=shard,
                   progress=common.progress(count_manifest(args.manifest, shard, exclude=exclude),
                                            every_s=cfg.log_every_s))
    try:
        with job.layout.lock():
            common.write_config(job.layout, cfg)
            summary = job.run(args.manifest)
    finally:
        job.progress.close()
    print_summary(summary, args.out)
    return 1 if summary["failed"] else 0


def print_summary(s: dict, out) -> None:
    c = common.report(s)
    c.print(f"[bold]densify label[/] (shard {s['shard']}): {s['ok']} ok, {s['skipped']} skipped (done earlier), "
            f"{s['failed']} failed of {s['images']} images; {s['queries']:,} answers ({s['store_hits']:,} from the "
            f"store, {s['engine_queries']:,} asked) in {s['wall_s']:.1f} s ({s['images_per_s']:.2f} images/s, "
            f"{s['queries_per_s']:,.0f} q/s)")
    if s["failed"]:
        kinds = common.esc(", ".join(f"{k}: {v}" for k, v in sorted(s["failed_by_kind"].items())))
        c.print(f"  [red]failed[/] by kind: {kinds}")
        common.print_failures(c, s["failed_images"], s["failed"], f"{out}/manifest.parquet")
    c.print(f"outputs in {common.esc(out)}")
