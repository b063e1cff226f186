"""`densify reconstruct`: images or a video -> depth per image -> pair selection -> pairwise matches and
poses -> pose graph -> TSDF fusion -> exports (poses.json, mesh.ply, cloud.ply, scene.glb, COLMAP text and
binary models, nerfstudio transforms.json).

Stages (densify.stages), each with one model loaded at a time: video frames (<out>/frames/), depth
(<out>/depth/<id>/), pair selection, pairs (<out>/pairs/<id1>__<id2>/), optional VLM poses, pose graph,
fusion, exports. A missing image or a failed pair gets a record; reconstruction goes on with what still
connects and lists what it dropped. Exit 1 when fewer than two images end up posed (no scene is written
then), or any image or pair failed (a candidate pair found not to overlap is not a failure of the run).
"""

from __future__ import annotations

import argparse

from densify.config.loading import ConfigError, Override
from densify.geometry.clouds import require_open3d
from densify.io.images import discover
from densify.io.layout import RunLayout
from densify.io.video import extract_frames, is_video
from densify.stages.scene import check_stages, reconstruct
from densify.stages.settings import ReconstructConfig
from pipelines import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="Images (files, a folder, globs or a .jsonl; in sequence order for the "
                                             "sequential pair modes), or one video file.")
    p.add_argument("--out", required=True, help="The output folder (created if missing).")
    common.add_pair_args(p)
    p.add_argument("--pairs", choices=["consecutive", "+skip2", "consecutive+skip2", "exhaustive", "retrieval"],
                   help="Pairs to relate: (i, i+1) (default), plus (i, i+2) with +skip2; every pair (exhaustive); "
                        "or each image with its most similar ones by a global image descriptor (retrieval).")
    p.add_argument("--pairs-per-image", type=int, metavar="K", help="Retrieval: pairs per image (default 5).")
    p.add_argument("--pairs-file", metavar="FILE", help="The pairs of an hloc-style file, one 'name1 name2' per line.")
    p.add_argument("--loops", type=int, metavar="K",
                   help="Sequential modes: add K loop-closure candidates per image (its most similar images "
                        "further along the sequence); each is probed with a few queries first.")
    p.add_argument("--fps", type=float, help="Video input: frames per second of video to reconstruct from.")
    p.add_argument("--every", type=int, metavar="N", help="Video input: every N-th frame.")
    common.add_intrinsics_arg(p)
    p.add_argument("--overwrite", action="store_true", help="Redo images and pairs whose outputs exist.")
    common.add_config_args(p, "reconstruct")


def pair_selection_overrides(args) -> list[Override]:
    out = []
    if args.pairs:
        mode = "consecutive+skip2" if args.pairs == "+skip2" else args.pairs
        out.append(Override(("pairs", "mode"), mode, f"--pairs {args.pairs}"))
    if args.pairs_file:
        if args.pairs:
            raise ConfigError("--pairs and --pairs-file: give one of them")
        out += [Override(("pairs", "mode"), "file", f"--pairs-file {args.pairs_file}"),
                Override(("pairs", "file"), args.pairs_file, f"--pairs-file {args.pairs_file}")]
    if args.pairs_per_image is not None:
        out.append(Override(("pairs", "per_image"), args.pairs_per_image, f"--pairs-per-image {args.pairs_per_image}"))
    if args.loops is not None:
        out.append(Override(("pairs", "loops"), args.loops, f"--loops {args.loops}"))
    return out


def config_from_args(args) -> ReconstructConfig:
    return common.load(args, ReconstructConfig, "reconstruct",
                       common.pair_overrides(args) + pair_selection_overrides(args), shared=False)


def _video_input(args) -> bool:
    """One video file as input (its frames are extracted under the lock); --fps/--every need one."""
    if len(args.inputs) == 1 and is_video(args.inputs[0]):
        if args.fps is not None and args.fps <= 0 or args.every is not None and args.every < 1:
            raise ConfigError("--fps must be > 0 and --every >= 1")
        return True
    if args.fps is not None or args.every is not None:
        raise ConfigError(f"--fps/--every sample a video, but the inputs are not one video file ({args.inputs[0]}"
                          f"{' ...' if len(args.inputs) > 1 else ''}); give one .mp4/.mov/.avi/.mkv file or drop them")
    return False


def run(args) -> int:
    cfg = config_from_args(args)
    video_input = _video_input(args)
    sources = None if video_input else discover(args.inputs, exclude=[args.out])
    layout = RunLayout(args.out)
    layout.check()
    intr = common.intrinsics(args)
    require_open3d()  # the pose graph and fusion need it
    check_stages(cfg)  # every checkpoint before anything is written
    video = None
    with layout.lock():
        if video_input:  # the frames go to <out>/frames/, so only once the folder is ours
            sources, video = extract_frames(args.inputs[0], layout.frames, fps=args.fps, every=args.every)
        common.write_config(layout, cfg)
        scene = reconstruct(sources, cfg, args.out, intrinsics=intr, progress=common.progress(len(sources)),
                            video=video)
    print_summary(scene.summary, args.out)
    s = scene.summary
    real_failures = [f for f in s["failed_pairs"] if f.get("error_kind") != "no_overlap"]
    return 0 if scene.ok and not s["dropped"] and not real_failures else 1


def print_summary(s: dict, out) -> None:
    c = common.report(s)
    t = s["timings_s"]
    c.print(f"[bold]densify reconstruct[/]: {s['posed']} of {s['images']} images posed "
            f"(reference {common.esc(s['reference'])}); pairs {s['pairs_ok']} ok of {s['pairs']} "
            f"({s['pair_selection']['mode']}; verdicts {s['verdicts']}); {s['pair_queries']:,} correspondence "
            f"queries (forward + backward), {s['pair_queries_no_overlap']:,} of them on {s['pairs_no_overlap']} "
            f"pair(s) whose probe found no overlap; "
            f"{s['wall_s']:.1f} s (" + ", ".join(f"{k} {v:.1f}" for k, v in t.items()) + ")")
    for f in s["failed_pairs"]:
        if f.get("error_kind") != "no_overlap":
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
    if "video" in s:
        c.print(f"  video {common.esc(s['video']['video'])}: {len(s['video']['frames'])} of "
                f"{s['video']['decoded_frames']} frames (timestamps in poses.json)")
    c.print(common.written(out, ["poses.json", "mesh.ply", "cloud.ply", "scene.glb", "colmap/", "colmap/bin/",
                                 "transforms.json", "pairs.jsonl", "summary.json", "config.yaml", "depth/", "pairs/",
                                 "frames/"]))
