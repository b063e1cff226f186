"""`densify depth`: images -> cameras -> query plan -> prompts -> engine -> answers -> dense depth -> files.

Per image it writes <out>/<id>/: depth.npy (float32 m), depth.png (uint16 mm, 0 = none), preview.png,
confidence.npy, cloud.ply, answers.jsonl, camera.json, and result.json last (it certifies the others);
per run config.yaml, summary.json and failures.jsonl. Images done earlier with the same settings are
skipped; a bad image gets a failure record and the run goes on (exit 1).
"""

from __future__ import annotations

import argparse

from densify.config.profiles import load_profile
from densify.io.images import discover
from densify.io.layout import RunLayout
from densify.stages.summary import run_depth
from densify.stages.engine import build_engine
from densify.stages.settings import DepthConfig
from pipelines import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="Images, folders, globs, or .jsonl / .parquet manifests.")
    p.add_argument("--out", required=True, help="The output folder (created if missing).")
    common.add_engine_args(p)
    common.add_plan_args(p)
    common.add_intrinsics_arg(p)
    p.add_argument("--overwrite", action="store_true", help="Redo images whose outputs exist (default: skip them "
                                                            "when they were made with the same settings).")
    common.add_config_args(p, "depth")


def run(args) -> int:
    cfg = common.load(args, DepthConfig, "depth")
    layout = RunLayout(args.out)
    layout.check()
    intr = common.intrinsics(args)
    sources = discover(args.inputs, exclude=[layout.root])
    with layout.lock():
        engine = build_engine(cfg.engine, load_profile(cfg.profile), model=cfg.model)
        try:
            common.write_config(layout, cfg)
            summary, _ = run_depth(sources, cfg, engine, layout, intrinsics=intr,
                                   progress=common.progress(len(sources)))
        finally:
            engine.close()
    print_summary(summary, layout.root)
    return 1 if summary["failed"] else 0


def print_summary(s: dict, out) -> None:
    c = common.report(s)
    c.print(f"[bold]densify depth[/]: {s['ok']} ok, {s['skipped']} skipped (done earlier), {s['failed']} failed of "
            f"{s['images']} images; {s['queries']:,} queries in {s['wall_s']:.1f} s ({s['queries_per_s']:,.0f} q/s); "
            f"answer failures {common.esc(s['answer_failures'] or 'none')}")
    plan, q = s.get("plan") or {}, (s.get("plan") or {}).get("queries_per_image")
    if q:
        stops = ", ".join(f"{k} {v}" for k, v in plan.get("stops", {}).items())
        c.print(f"{q['mean']:,.0f} queries per image ({q['min']:,}-{q['max']:,}), {plan.get('mode')} rounds "
                f"stopped by: {stops or '-'}")
    t = s.get("timeline")
    if t and t["maps"] > 1:
        c.print(f"first map after {t['first_map_s']:.1f} s, last after {t['last_map_s']:.1f} s")
    f = s.get("forcing")
    if f and (f.get("forced_queries") or f.get("off_reason")):
        c.print(f"answer forcing: {f['forced_queries']:,} forced, {f['agreed']}/{f['audited']} audited agreed"
                + (f"; off: {common.esc(f['off_reason'])}" if f.get("off_reason") else ""))
    common.print_failures(c, s["failed_images"], s["failed"], f"{out}/failures.jsonl")
    c.print(f"outputs in {common.esc(out)}")
