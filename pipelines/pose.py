"""`densify pose IMG1 IMG2`: relative pose of two images from correspondence answers (and/or the pose profile).

Writes <out>/pose.json (R, unit t, metric t when image 1 has depth, inliers, verdict and reason, and the
VLM cross-check), <out>/pairs/<id1>__<id2>/ (matches.npz, answers.jsonl, flow.npy: dense flow 1 -> 2)
and, for the metric scale, image 1's depth under <out>/depth/. Same settings as `densify reconstruct`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from densify.config.loading import ConfigError
from densify.io import outputs
from densify.io.images import ImageError, discover, image_size
from densify.io.layout import RunLayout
from densify.stages.scene import check_stages, relative_pose
from densify.stages.settings import ReconstructConfig
from pipelines import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image1", help="The first image (the reference camera).")
    p.add_argument("image2", help="The second image.")
    p.add_argument("--out", required=True, help="The output folder (created if missing).")
    common.add_pair_args(p)
    p.add_argument("--no-depth", action="store_true", help="No metric scale (skips image 1's depth).")
    common.add_intrinsics_arg(p, "both images")
    common.add_config_args(p, "reconstruct")


def run(args) -> int:
    cfg = common.load(args, ReconstructConfig, "reconstruct", common.pair_overrides(args), shared=False)
    layout = RunLayout(args.out)
    layout.check()
    sources = discover([args.image1, args.image2])
    if len(sources) != 2:
        raise ConfigError(f"densify pose needs exactly two images, got {len(sources)}")
    for what, src in zip(("image1", "image2"), sources):
        try:  # both images are needed: a missing or unreadable one is found before any engine starts
            image_size(src.path)
        except ImageError as exc:
            raise ImageError(f"{what} {exc}", exc.kind) from None
    intr = common.intrinsics(args)
    check_stages(cfg, pose=True)  # every checkpoint before anything is written
    t0 = time.perf_counter()
    with layout.lock():
        common.write_config(layout, cfg)
        res, infos = relative_pose(sources, cfg, layout.root, intrinsics=intr, progress=True)
        rep = {"images": [str(s.path) for s in sources], "status": res.status, "record": res.record(),
               "pose": res.pose.to_dict() if res.pose is not None else None,
               "intrinsics": [i.camera.to_dict() if i.camera else None for i in infos],
               "engine": cfg.engine.name, "simulated": cfg.engine.simulated,
               "wall_s": time.perf_counter() - t0}
        layout.sweep(layout.pose_report)
        outputs.write_json(layout.pose_report, rep)
    print_report(rep, args.out)
    return 0 if rep["status"] != "failed" else 1


def print_report(rep: dict, out) -> None:
    from densify.geometry.rotations import euler_from_matrix, rotation_angle_deg

    c = common.report(rep)
    rec, p = rep["record"], rep["pose"]
    c.print(f"[bold]densify pose[/]: {common.esc(rep['images'][0])} -> {common.esc(rep['images'][1])}: {rep['status']}"
            + (f" ({rec.get('verdict')}, source {rec.get('source')})" if p else ""))
    if rep["status"] == "failed":
        c.print(f"  [red]{common.esc(rec.get('error_kind'))}[/]: {common.esc(rec.get('error'))}")
    if p and p.get("R") is not None:
        R = np.asarray(p["R"])
        c.print(f"  rotation {rotation_angle_deg(R):.2f} deg (camera-2 yaw/pitch/roll "
                f"{', '.join(f'{v:+.2f}' for v in euler_from_matrix(R.T))} deg)")
        if p.get("t") is not None:
            c.print(f"  t (x2 = R x1 + t) direction {np.round(p['t'], 4).tolist()}"
                    + (f", metric {np.round(p['t_metric'], 4).tolist()} m" if p.get("t_metric") else ""))
        c.print(f"  inliers {p['inliers']} of {p['n_matches']} matches" + (f"; {common.esc(p['reason'])}" if p["reason"] else ""))
    if rec.get("cross_check"):
        cc = rec["cross_check"]
        c.print(f"  VLM cross-check: rotation differs by {cc['rotation_deg']:.2f} deg, direction by "
                f"{cc['direction_deg'] if cc['direction_deg'] is None else round(cc['direction_deg'], 2)} deg")
    c.print(common.written(out, ["pose.json", "config.yaml", "pairs/", "depth/"]))
