"""`densify reconstruct`: images -> depth per image -> pairwise matches and poses -> pose graph -> TSDF fusion
-> exports (poses.json, mesh.ply, cloud.ply, COLMAP text model, nerfstudio transforms.json).

Stages (densify.stages), each with one model loaded at a time: depth (<out>/depth/<id>/), pairs
(<out>/pairs/<id1>__<id2>/), optional VLM poses, pose graph, fusion, exports. A missing image or a
failed pair gets a record; reconstruction goes on with what still connects and lists what it dropped.
Exit 1 when fewer than two images end up posed (no scene is written then), or any image or pair failed.
"""

from __future__ import annotations

import argparse

from densify.geometry.clouds import require_open3d
from densify.io.images import discover
from densify.io.layout import RunLayout
from densify.stages.scene import check_stages, reconstruct
from densify.stages.settings import ReconstructConfig
from pipelines import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="Images in sequence order (files, a folder, globs or a .jsonl).")
    p.add_argument("--out", required=True, help="The output folder (created if missing).")
    common.add_pair_args(p)
    p.add_argument("--pairs", choices=["consecutive", "+skip2", "consecutive+skip2"],
                   help="Pairs to relate: (i, i+1) (default), plus (i, i+2) with +skip2.")
    common.add_intrinsics_arg(p)
    p.add_argument("--overwrite", action="store_true", help="Redo images and pairs whose outputs exist.")
    common.add_config_args(p, "reconstruct")


def config_from_args(args) -> ReconstructConfig:
    return common.load(args, ReconstructConfig, "reconstruct", common.pair_overrides(args), shared=False)


def run(args) -> int:
    cfg = config_from_args(args)
    sources = discover(args.inputs, exclude=[args.out])
    layout = RunLayout(args.out)
    layout.check()
    intr = common.intrinsics(args)
    require_open3d()  # the pose graph and fusion need it
    check_stages(cfg)  # every checkpoint before anything is written
    with layout.lock():
        common.write_config(layout, cfg)
        scene = reconstruct(sources, cfg, args.out, intrinsics=intr, progress=common.progress(len(sources)))
    print_summary(scene.summary, args.out)
    s = scene.summary
    return 0 if scene.ok and not s["dropped"] and not s["failed_pairs"] else 1


def print_summary(s: dict, out) -> None:
    c = common.report(s)
    t = s["timings_s"]
    c.print(f"[bold]densify reconstruct[/]: {s['posed']} of {s['images']} images posed "
            f"(reference {common.esc(s['reference'])}); pairs {s['pairs_ok']} ok of {s['pairs']} "
            f"(verdicts {s['verdicts']}); {s['pair_queries']:,} correspondence queries (forward + backward); "
            f"{s['wall_s']:.1f} s (" + ", ".join(f"{k} {v:.1f}" for k, v in t.items()) + ")")
    for f in s["failed_pairs"]:
        c.print(f"  [red]failed pair[/] {common.esc(f['pair'][0])} -> {common.esc(f['pair'][1])} "
                f"({common.esc(f.get('error_kind'))}): {common.esc(f.get('error'))}")
    for d in s["dropped"]:
        c.print(f"  [yellow]dropped[/] {common.esc(d['id'])}: {common.esc(d['reason'])}")
    if "skipped" in s["fusion"]:
        c.print(f"  [red]no scene[/]: {common.esc(s['fusion']['skipped'])}")
    if "colmap" in s["export"]:
        c.print(f"  COLMAP model: {common.esc(s['export']['colmap'])}")
    fu = s["fusion"]
    if fu.get("frames"):
        c.print(f"  fused {fu['frames']} frames: mesh {fu['mesh_vertices']:,} vertices, "
                f"cloud {fu['cloud_points']:,} points")
    c.print(common.written(out, ["poses.json", "mesh.ply", "cloud.ply", "colmap/", "transforms.json", "pairs.jsonl",
                                 "summary.json", "config.yaml", "depth/", "pairs/"]))
