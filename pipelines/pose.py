"""`densify pose IMG1 IMG2`: relative pose of two images from correspondence answers (and/or the pose profile).

Writes <out>/pose.json (R, unit t, metric t when image 1 has depth, inliers, verdict and reason, and the
VLM cross-check), <out>/pairs/<id1>__<id2>/ (matches.npz, answers.jsonl, flow.npy: dense flow 1 -> 2)
and, for the metric scale, image 1's depth under <out>/depth/. Same config as `densify reconstruct`.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image

from densify import outputs
from densify.cameras import CameraError, resolve_camera
from densify.images import ImageError, discover
from densify.truth import SidecarTruth
from pipelines.configs_reconstruct import ReconstructJobConfig
from pipelines.reconstruct import ImageInfo, config_from_args, depth_stage, pair_stage, vlm_pose_stage

log = logging.getLogger("densify.pose")


def _camera_info(index: int, src, cfg: ReconstructJobConfig, intrinsics) -> ImageInfo:
    info = ImageInfo(index, src.id, Path(src.path), "ok")
    try:
        if not Path(src.path).is_file():
            raise ImageError(f"{src.path}: no such file; check the path")
        with Image.open(src.path) as im:
            w, h = im.size
        info.camera = resolve_camera(src.path, w, h, intrinsics if intrinsics is not None else src.intrinsics,
                                     cfg.depth.default_hfov_deg)
    except (ImageError, CameraError, OSError) as exc:
        info.status, info.error = "failed", str(exc)
        info.error_kind = "intrinsics" if isinstance(exc, CameraError) else "image"
    return info


def run_pose(image1, image2, cfg: ReconstructJobConfig, out_dir, *, engines=None, truth=None, intrinsics=None,
             progress: bool = True) -> dict:
    """Relative pose of one pair; returns the report (also <out>/pose.json)."""
    out = Path(out_dir)
    t0 = time.perf_counter()
    sources = discover([str(image1), str(image2)])
    if len(sources) != 2:
        raise ValueError(f"densify pose needs exactly two images, got {len(sources)}")
    cfg = cfg.model_copy(update={"corr": cfg.corr.model_copy(update={"save_flow": True, "track_queries": False})})
    truth = truth or SidecarTruth(sources)
    need_depth = cfg.pose.use_depth and cfg.pose.source in ("matches", "both")
    if need_depth:
        infos, _ = depth_stage(sources[:1], cfg, out / "depth", engines=engines, intrinsics=intrinsics,
                               progress=progress)
        infos.append(_camera_info(1, sources[1], cfg, intrinsics))
    else:
        infos = [_camera_info(k, s, cfg, intrinsics) for k, s in enumerate(sources)]
    results = None
    if cfg.pose.source in ("matches", "both"):
        results = pair_stage(infos, [(0, 1)], cfg, out, engines=engines, truth=truth, progress=progress,
                             require_metric=False)
    if cfg.pose.source in ("vlm", "both"):
        results = vlm_pose_stage(infos, [(0, 1)], results, cfg, out, engines=engines, truth=truth, progress=progress,
                                 require_metric=False)
    res = results[0]
    report = {"images": [str(s.path) for s in sources], "status": res.status, "record": res.record(),
              "pose": res.pose.to_dict() if res.pose is not None else None,
              "intrinsics": [i.camera.to_dict() if i.camera else None for i in infos],
              "wall_s": time.perf_counter() - t0}
    outputs.write_json(out / "pose.json", report)
    report["_result"] = res
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image1")
    p.add_argument("image2")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", help="pipeline YAML (default: configs/pipelines/reconstruct.yaml)")
    p.add_argument("--engine", help="simulated | hf | vllm | openai | ray")
    p.add_argument("--pose-source", choices=["matches", "vlm", "both"],
                   help="RANSAC on the correspondence answers, the pose profile's answers, or RANSAC "
                        "cross-checked by the pose profile")
    p.add_argument("--grid", type=int, nargs=2, metavar=("NX", "NY"), help="correspondence queries (default 24 18)")
    p.add_argument("--no-fb", action="store_true", help="skip the forward-backward check")
    p.add_argument("--no-depth", action="store_true", help="no metric scale (skips image 1's depth)")
    p.add_argument("--intrinsics", help="fx,fy,cx,cy for both images (else sidecar JSON, else default FoV)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key")
    p.add_argument("--overwrite", action="store_true", help="redo work whose outputs exist")


def run(args) -> int:
    from densify.cameras import parse_intrinsics_arg

    cfg = config_from_args(args)
    if args.no_depth:
        cfg = cfg.model_copy(update={"pose": cfg.pose.model_copy(update={"use_depth": False})})
    log.info("config: %s", cfg.model_dump_json())
    intr = parse_intrinsics_arg(args.intrinsics) if args.intrinsics else None
    rep = run_pose(args.image1, args.image2, cfg, args.out, intrinsics=intr)
    print_report(rep, args.out)
    return 0 if rep["status"] != "failed" else 1


def print_report(rep: dict, out) -> None:
    from rich.console import Console

    from densify.geometry.rotations import euler_from_matrix, rotation_angle_deg

    c = Console()
    rec, p = rep["record"], rep["pose"]
    c.print(f"[bold]densify pose[/]: {rep['images'][0]} -> {rep['images'][1]}: {rep['status']}"
            + (f" ({rec.get('verdict')}, source {rec.get('source')})" if p else ""))
    if rep["status"] == "failed":
        c.print(f"  [red]{rec.get('error_kind')}[/]: {rec.get('error')}")
    if p and p.get("R") is not None:
        R = np.asarray(p["R"])
        c.print(f"  rotation {rotation_angle_deg(R):.2f} deg (camera-2 yaw/pitch/roll "
                f"{', '.join(f'{v:+.2f}' for v in euler_from_matrix(R.T))} deg)")
        if p.get("t") is not None:
            c.print(f"  t (x2 = R x1 + t) direction {np.round(p['t'], 4).tolist()}"
                    + (f", metric {np.round(p['t_metric'], 4).tolist()} m" if p.get("t_metric") else ""))
        c.print(f"  inliers {p['inliers']} of {p['n_matches']} matches" + (f"; {p['reason']}" if p["reason"] else ""))
    if rec.get("cross_check"):
        cc = rec["cross_check"]
        c.print(f"  VLM cross-check: rotation differs by {cc['rotation_deg']:.2f} deg, direction by "
                f"{cc['direction_deg'] if cc['direction_deg'] is None else round(cc['direction_deg'], 2)} deg")
    c.print(f"outputs in {out} (pose.json, pairs/, depth/)")
