"""Poses and fused geometry on seeded synthetic sequences: densify (simulated VLM3 answers) vs SIFT.

    python -m benchmarks.reconstruct_bench [--seeds 0 1] [--views 10] [--pairs consecutive+skip2]
                                           [--errors iid,structured]
    python -m benchmarks.reconstruct_bench --sets unordered,loop,video   (benchmarks/reconstruct_sets.py:
        shuffled names, a closed loop of 36 views, a video; exhaustive vs retrieval, with vs without loops)

Per sequence: a ray-cast room (densify.synthetic.scenes) seen along an arc of `--views` 640x480 views;
`densify reconstruct` runs on it with the simulated engine answering from exact ground truth, once per
error preset of `--errors` (default both, in one run; densify.sim.errors): ``iid`` (depth 12.5 %
log-normal noise, correspondences 4/1000 of the image per axis, 2 % outliers, 1 % unparseable answers) and
``structured`` (per-image depth scale, per-object bias, correlated fields, edge bleeding; per-pair
correspondence offset, smooth end-point field, occlusion errors). Both are models of errors, not
measurements of VLM3. The depth stage reads truth from the saved scene (no object ids there: the
structured model's per-object bias falls back to depth-continuous segments). The classical baseline uses the same pairs, the same depth maps and
the same estimator: OpenCV SIFT + Lowe's ratio test (0.8) -> essential matrix (USAC_MAGSAC) / PnP ->
the same pose graph and TSDF fusion. A third row fuses the same depth maps with the true poses (the
depth-noise floor of the geometry).

Metrics: match end-point error (pixels, against the exact match map; answers before and after the
forward-backward check), rotation and translation-direction error (degrees; direction folded as in
SuperGlue), metric translation error (m), pose AUC@5/10/30 of max(R, t) errors (a failed pair counts as a
miss), the same pose errors without depth (essential matrix alone, in normalised and in pixel units),
trajectory error after the pose
graph, and Chamfer accuracy / completeness (m) of the fused mesh against the scene mesh (accuracy: exact
distance to the mesh; completeness: from mesh samples the cameras saw). An experiment beside the pipeline:
a multi-view per-image depth scale check (`scale_check`: PnP pairs give relative log scales, solved by least
squares) and the same fusion with each depth map divided by its estimated scale ("scale-checked"). Writes
benchmarks/results/reconstruct_<date>.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from densify.config.loading import dict_overrides
from densify.config.profiles import load_profile
from densify.eval.pose_eval import (chamfer, match_epe, pose_auc, pose_errors, trajectory_error,
                                    visible_surface_samples)
from densify.geometry.fusion import FusionFrame
from densify.geometry.fusion import tsdf_fuse
from densify.geometry.pose import estimate_pair_pose
from densify.geometry.posegraph import PoseGraphResult
from densify.io.images import discover, load_rgb
from densify.io.layout import RunLayout
from densify.pairs.matching import Matches, sift_matches
from densify.pairs.solve import PairResult, classify, pair_key, solve_pair_xy
from densify.sim.engine import ErrorModel, SimulatedEngine
from densify.sim.truth import SceneTruth
from densify.stages.scene import graph_stage, reconstruct
from densify.stages.settings import ReconstructConfig, load_config

log = logging.getLogger("reconstruct_bench")
ROOT = Path(__file__).resolve().parents[1]


def _engines(scene, seed: int, error: str = "iid") -> dict:
    return {stage: SimulatedEngine(load_profile(p), seed=seed, error=ErrorModel.from_option(error),
                                   truth=SceneTruth(scene))
            for stage, p in (("depth", "vlm3-depth"), ("corr", "vlm3-corr"), ("pose", "vlm3-pose"))}


def _fuse_and_score(infos, cam_to_world: dict, reference: int, depth_dir: Path, cfg, scene, gt_pts) -> dict:
    depth = RunLayout(depth_dir)
    frames = [FusionFrame(infos[k].camera, cam_to_world[k], lambda f=depth.image(infos[k].id): np.load(f.depth_npy),
                          lambda p=infos[k].path: load_rgb(p),
                          lambda f=depth.image(infos[k].id): np.load(f.confidence) if f.confidence.is_file() else None)
              for k in sorted(cam_to_world)]
    mesh, _, _ = tsdf_fuse(frames, cfg.fusion)
    A = scene.views[reference].cam_to_world  # estimated world = the reference camera -> scene world
    pts = np.asarray(mesh.vertices) @ A[:3, :3].T + A[:3, 3]
    return chamfer(pts, gt_pts, gt_mesh=scene.mesh)


def run_sequence(seed: int, args, work: Path, error: str = "iid") -> dict:
    from densify.synthetic.scenes import SceneSpec, make_scene

    t0 = time.perf_counter()
    scene = make_scene(SceneSpec(seed=seed, n_views=args.views, width=args.width, height=args.height,
                                 trajectory=args.trajectory))
    images = scene.save(work / "scene")
    t_scene = time.perf_counter() - t0
    over = {"engine": {"name": "simulated"}, "pairs": args.pairs, "corr": {"grid": list(args.grid)}}
    cfg = load_config(ReconstructConfig, None, dict_overrides(over), default_name="reconstruct")
    t0 = time.perf_counter()
    res = reconstruct(discover([str(p) for p in images]), cfg, work / "ours", engines=_engines(scene, seed, error))
    t_ours = time.perf_counter() - t0
    s, infos, results, graph = res.summary, res.infos, res.pairs, res.graph
    gt_c2w = {k: v.cam_to_world for k, v in enumerate(scene.views)}
    depth_dir = work / "ours" / "depth"

    rows = {"ours": [], "sift": []}
    px_cfg = cfg.pose.estimator.model_copy(update={"essential_units": "pixels"})
    sift_results, t_sift = [], 0.0
    for r in results:
        i, j = r.i, r.j
        T = scene.relative_pose(i, j)
        gt_map = scene.matches(i, j)
        cam1, cam2 = infos[i].camera, infos[j].camera
        depth1 = np.load(depth_dir / infos[i].id / "depth.npy")
        m = Matches.load(work / "ours" / "pairs" / pair_key(infos[i].id, infos[j].id) / "matches.npz")
        answered = np.all(np.isfinite(m.xy2), 1)
        e_raw = match_epe(m.xy1[answered], m.xy2[answered], gt_map)
        xy1, xy2 = m.pairs()
        e_kept = match_epe(xy1, xy2, gt_map)
        ess = estimate_pair_pose(xy1, xy2, cam1, cam2, cfg=cfg.pose.estimator)
        ess_px = estimate_pair_pose(xy1, xy2, cam1, cam2, cfg=px_cfg)
        rows["ours"].append({"pair": [i, j], "n_matches": int(len(xy1)), "queries": int(len(m)),
                             "epe_answers": _stats(e_raw), "epe_kept": _stats(e_kept),
                             "outliers_kept": int(np.sum(np.nan_to_num(e_kept, nan=1e9) > 20)),
                             "final": pose_errors(r.pose, T), "verdict": r.pose.verdict if r.pose else "failed",
                             "essential_only": pose_errors(ess, T), "essential_pixels": pose_errors(ess_px, T)})
        t1 = time.perf_counter()
        a, b = sift_matches(scene.views[i].rgb, scene.views[j].rgb, ratio=0.8)
        pose, info = solve_pair_xy(a, b, cam1, cam2, depth1, cfg.pose.estimator)
        ess_s = estimate_pair_pose(a, b, cam1, cam2, cfg=cfg.pose.estimator)
        ess_s_px = estimate_pair_pose(a, b, cam1, cam2, cfg=px_cfg)
        t_sift += time.perf_counter() - t1
        sift_results.append(classify(PairResult(i, j, infos[i].id, infos[j].id, "ok", pose, {}, information=info)))
        e_s = match_epe(a, b, gt_map)
        rows["sift"].append({"pair": [i, j], "n_matches": int(len(a)), "epe_kept": _stats(e_s),
                             "outliers_kept": int(np.sum(np.nan_to_num(e_s, nan=1e9) > 20)),
                             "final": pose_errors(pose, T), "verdict": pose.verdict,
                             "essential_only": pose_errors(ess_s, T), "essential_pixels": pose_errors(ess_s_px, T)})
    t0 = time.perf_counter()
    sift_graph = graph_stage(infos, sift_results, cfg)
    t_sift += time.perf_counter() - t0

    gt_pts = visible_surface_samples(scene.mesh, [(v.depth, v.camera, v.cam_to_world) for v in scene.views],
                                     n=300_000, max_depth=cfg.fusion.depth_trunc)
    out = {"seed": seed, "error": error, "views": args.views, "pairs": len(results), "scene_s": t_scene, "ours_s": t_ours,
           "ours_stage_s": s["timings_s"], "sift_pose_s": t_sift, "rows": rows,
           "pair_queries": s["pair_queries"], "depth_queries": s["depth"]["queries"],
           "colmap": s["export"].get("colmap"), "tracks": s["export"].get("tracks")}
    out["trajectory"] = {"ours": trajectory_error(graph.cam_to_world, gt_c2w, graph.reference),
                         "sift": trajectory_error(sift_graph.cam_to_world, gt_c2w, sift_graph.reference),
                         "ours_posed": len(graph.cam_to_world), "sift_posed": len(sift_graph.cam_to_world)}
    out["scale_check"] = scale_check(infos, results, depth_dir, work / "ours", scene)
    sc_dir = _scale_checked_depth(infos, depth_dir, work / "scale_checked", out["scale_check"])
    out["fusion"] = {
        "ours": _fuse_and_score(infos, graph.cam_to_world, graph.reference, depth_dir, cfg, scene, gt_pts),
        "sift": _fuse_and_score(infos, sift_graph.cam_to_world, sift_graph.reference, depth_dir, cfg, scene,
                                gt_pts) if sift_graph.cam_to_world else None,
        "true_poses": _fuse_and_score(infos, {k: np.linalg.inv(gt_c2w[0]) @ gt_c2w[k] for k in gt_c2w}, 0,
                                      depth_dir, cfg, scene, gt_pts),
    }
    if sc_dir is not None:  # the same fusion with each view's depth rescaled by the multi-view scale check
        out["fusion"]["true_poses_scale_checked"] = _fuse_and_score(
            infos, {k: np.linalg.inv(gt_c2w[0]) @ gt_c2w[k] for k in gt_c2w}, 0, sc_dir, cfg, scene, gt_pts)
        out["fusion"]["ours_scale_checked"] = _fuse_and_score(infos, graph.cam_to_world, graph.reference, sc_dir,
                                                              cfg, scene, gt_pts)
    return out


def scale_check(infos, results, depth_dir: Path, work: Path, scene) -> dict:
    """Per-image depth scale from the other views (an experiment, not in the pipeline yet).

    A PnP pose of pair (i, j) carries image i's depth scale; image j's depth at the matched pixels against the
    points of i moved by that pose gives log(s_j / s_i). Least squares over the pairs (mean 0) estimates each
    view's relative log scale; compared with the truth: median log(depth / true depth) of each view's map.
    """
    from densify.geometry.clouds import depth_at_pixels, unproject

    n = len(infos)
    depths = {k: np.load(depth_dir / infos[k].id / "depth.npy") for k in range(n)}
    rows = []
    for r in results:
        if not r.usable or r.pose.source != "pnp" or r.pose.t_metric is None:
            continue
        m = Matches.load(work / "pairs" / pair_key(infos[r.i].id, infos[r.j].id) / "matches.npz")
        xy1, xy2 = m.pairs()
        if len(xy1) < 20:
            continue
        X = unproject(xy1, depth_at_pixels(depths[r.i], xy1), infos[r.i].camera)
        zj = (X @ np.asarray(r.pose.R).T + np.asarray(r.pose.t_metric).reshape(3))[:, 2]
        dj = depth_at_pixels(depths[r.j], xy2)
        ok = np.isfinite(zj) & np.isfinite(dj) & (zj > 0.1) & (dj > 0)
        if ok.sum() >= 20:
            rows.append((r.i, r.j, float(np.median(np.log(dj[ok] / zj[ok])))))
    true = []
    for k in range(n):
        gt, d = scene.views[k].depth, depths[k]
        ok = np.isfinite(d) & (d > 0) & (gt > 0)
        true.append(float(np.median(np.log(d[ok] / gt[ok]))))
    true = np.array(true) - np.mean(true)
    if not rows:
        return {"pairs_used": 0, "true_log_scale": true.tolist()}
    A = np.zeros((len(rows) + 1, n))
    b = np.zeros(len(rows) + 1)
    for q, (i, j, lr) in enumerate(rows):
        A[q, i], A[q, j], b[q] = -1.0, 1.0, lr
    A[-1] = 1.0  # gauge: mean log scale 0
    est = np.linalg.lstsq(A, b, rcond=None)[0]
    resid = true - est
    return {"pairs_used": len(rows), "true_log_scale": true.tolist(), "estimated_log_scale": est.tolist(),
            "spread_before": float(np.std(true)), "spread_after": float(np.std(resid - resid.mean())),
            "corr": float(np.corrcoef(true, est)[0, 1]) if n > 2 else float("nan")}


def _scale_checked_depth(infos, depth_dir: Path, out_dir: Path, sc: dict) -> Path | None:
    """Each view's depth map divided by its estimated relative scale (scale_check), written beside."""
    est = sc.get("estimated_log_scale")
    if not est:
        return None
    import shutil

    for k, info in enumerate(infos):
        src, dst = depth_dir / info.id, out_dir / info.id
        dst.mkdir(parents=True, exist_ok=True)
        np.save(dst / "depth.npy", np.load(src / "depth.npy") * np.float32(np.exp(-est[k])))
        if (src / "confidence.npy").is_file():
            shutil.copy(src / "confidence.npy", dst / "confidence.npy")
    return out_dir


def _stats(e) -> dict:
    e = np.asarray(e, float)
    e = e[np.isfinite(e)]
    return {"mean": float(e.mean()) if len(e) else float("nan"),
            "median": float(np.median(e)) if len(e) else float("nan"), "n": int(len(e))}


def aggregate(seqs: list[dict]) -> dict:
    agg = {}
    for method in ("ours", "sift"):
        rows = [r for s in seqs for r in s["rows"][method]]
        fin = [r["final"] for r in rows]
        ess = [r["essential_only"] for r in rows]

        def m(vals, fn=np.median):
            v = np.asarray(vals, float)
            v = v[np.isfinite(v)]
            return float(fn(v)) if len(v) else float("nan")

        epe_all = [r["epe_kept"]["median"] for r in rows]
        agg[method] = {
            "pairs": len(rows), "pairs_ok": int(sum(f["ok"] for f in fin)),
            "rot_deg_median": m([f["rot_deg"] for f in fin]), "rot_deg_mean": m([f["rot_deg"] for f in fin], np.mean),
            "trans_deg_median": m([f["trans_deg"] for f in fin]),
            "trans_deg_mean": m([f["trans_deg"] for f in fin], np.mean),
            "trans_m_median": m([f["trans_m"] for f in fin]), "trans_m_mean": m([f["trans_m"] for f in fin], np.mean),
            **pose_auc([f["max_deg"] for f in fin]),
            **{key: {"rot_deg_median": m([f["rot_deg"] for f in ev]),
                     "trans_deg_median": m([f["trans_deg"] for f in ev]),
                     "trans_deg_mean": m([f["trans_deg"] for f in ev], np.mean),
                     **pose_auc([f["max_deg"] for f in ev])}
               for key, ev in (("essential_only", ess), ("essential_pixels", [r["essential_pixels"] for r in rows]))},
            "epe_median_px": m(epe_all), "matches_per_pair": m([r["n_matches"] for r in rows], np.mean),
            "outliers_kept_per_pair": m([r["outliers_kept"] for r in rows], np.mean),
            "ate_rmse_m": m([s["trajectory"][method]["ate_rmse_m"] for s in seqs], np.mean),
            "chamfer_accuracy_m": m([s["fusion"][method]["accuracy"] for s in seqs if s["fusion"][method]], np.mean),
            "chamfer_completeness_m": m([s["fusion"][method]["completeness"] for s in seqs if s["fusion"][method]],
                                        np.mean),
        }
        if method == "ours":
            agg[method]["epe_answers_median_px"] = m([r["epe_answers"]["median"] for r in rows])
    agg["true_poses"] = {k: float(np.mean([s["fusion"]["true_poses"][k] for s in seqs]))
                         for k in ("accuracy", "completeness")}
    for key in ("true_poses_scale_checked", "ours_scale_checked"):
        checked = [s["fusion"][key] for s in seqs if s["fusion"].get(key)]
        if checked:
            agg[key] = {k: float(np.mean([c[k] for c in checked])) for k in ("accuracy", "completeness")}
    sc = [s["scale_check"] for s in seqs if s.get("scale_check", {}).get("pairs_used")]
    if sc:
        agg["scale_check"] = {"spread_before": float(np.mean([c["spread_before"] for c in sc])),
                              "spread_after": float(np.mean([c["spread_after"] for c in sc]))}
    return agg


def print_table(agg: dict, seqs: list[dict]) -> None:
    o, s = agg["ours"], agg["sift"]
    lines = [
        f"{'':34s}{'densify (sim. VLM3)':>22s}{'SIFT + ratio':>16s}",
        f"{'pairs posed / total':34s}{o['pairs_ok']:>17d} / {o['pairs']:<3d}{s['pairs_ok']:>11d} / {s['pairs']:<3d}",
        f"{'matches per pair (kept)':34s}{o['matches_per_pair']:>22.0f}{s['matches_per_pair']:>16.0f}",
        f"{'match EPE median (px)':34s}{o['epe_median_px']:>22.2f}{s['epe_median_px']:>16.2f}",
        f"{'  answers before FB check':34s}{o['epe_answers_median_px']:>22.2f}{'':>16s}",
        f"{'outliers > 20 px kept per pair':34s}{o['outliers_kept_per_pair']:>22.1f}"
        f"{s['outliers_kept_per_pair']:>16.1f}",
        f"{'rotation error median / mean (deg)':34s}{o['rot_deg_median']:>14.2f} / {o['rot_deg_mean']:<5.2f}"
        f"{s['rot_deg_median']:>9.2f} / {s['rot_deg_mean']:<5.2f}",
        f"{'t-direction error med / mean (deg)':34s}{o['trans_deg_median']:>14.2f} / {o['trans_deg_mean']:<5.2f}"
        f"{s['trans_deg_median']:>9.2f} / {s['trans_deg_mean']:<5.2f}",
        f"{'metric t error median / mean (m)':34s}{o['trans_m_median']:>14.3f} / {o['trans_m_mean']:<5.3f}"
        f"{s['trans_m_median']:>9.3f} / {s['trans_m_mean']:<5.3f}",
        f"{'pose AUC @5 / @10 / @30':34s}{o['auc@5']:>10.3f} {o['auc@10']:.3f} {o['auc@30']:.3f}"
        f"{s['auc@5']:>8.3f} {s['auc@10']:.3f} {s['auc@30']:.3f}",
    ]
    for key, title in (("essential_only", "no depth, essential (normalised):"),
                       ("essential_pixels", "no depth, essential (pixel units):")):
        oe, se = o[key], s[key]
        lines += [
            f"{title:34s}",
            f"{'  R / t-dir median (deg)':34s}{oe['rot_deg_median']:>14.2f} / {oe['trans_deg_median']:<5.2f}"
            f"{se['rot_deg_median']:>9.2f} / {se['trans_deg_median']:<5.2f}",
            f"{'  pose AUC @5 / @10 / @30':34s}{oe['auc@5']:>10.3f} {oe['auc@10']:.3f} {oe['auc@30']:.3f}"
            f"{se['auc@5']:>8.3f} {se['auc@10']:.3f} {se['auc@30']:.3f}",
        ]
    lines += [
        f"{'trajectory RMSE after pose graph (m)':34s}{o['ate_rmse_m']:>22.3f}{s['ate_rmse_m']:>16.3f}",
        f"{'Chamfer accuracy (m)':34s}{o['chamfer_accuracy_m']:>22.3f}{s['chamfer_accuracy_m']:>16.3f}"
        f"   true poses: {agg['true_poses']['accuracy']:.3f}",
        f"{'Chamfer completeness (m)':34s}{o['chamfer_completeness_m']:>22.3f}{s['chamfer_completeness_m']:>16.3f}"
        f"   true poses: {agg['true_poses']['completeness']:.3f}",
    ]
    for key, title in (("ours_scale_checked", "depth scale-checked, our poses"),
                       ("true_poses_scale_checked", "depth scale-checked, true poses")):
        if key in agg:
            t = agg[key]
            lines.append(f"{title:34s}   Chamfer accuracy {t['accuracy']:.3f}, completeness {t['completeness']:.3f}")
    print("\n".join(lines))
    for q in seqs:
        sc = q.get("scale_check") or {}
        if sc.get("pairs_used"):
            print(f"seed {q['seed']}: per-view depth log-scale spread {sc['spread_before']:.3f}; after the "
                  f"multi-view scale check {sc['spread_after']:.3f} ({sc['pairs_used']} PnP pairs, "
                  f"corr {sc['corr']:.2f})")
    for q in seqs:
        c = q["colmap"] or {}
        print(f"seed {q['seed']}: {q['views']} views, {q['pairs']} pairs, {q['pair_queries']:,} correspondence "
              f"(forward + backward) + {q['depth_queries']:,} depth queries; densify {q['ours_s']:.1f} s "
              f"({', '.join(f'{k} {v:.1f}' for k, v in q['ours_stage_s'].items())}); "
              f"SIFT poses {q['sift_pose_s']:.1f} s;"
              f" COLMAP {c.get('points3D')} points, {c.get('tracks_ge3')} tracks >= 3 views "
              f"(max {c.get('max_track_length')}), "
              f"reprojection {c.get('mean_reprojection_error', float('nan')):.2f} px")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--sets" or a.startswith("--sets=") for a in argv):
        from benchmarks import reconstruct_sets

        return reconstruct_sets.main(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--trajectory", default="arc", choices=["arc", "orbit"])
    p.add_argument("--pairs", default="consecutive+skip2", choices=["consecutive", "consecutive+skip2"])
    p.add_argument("--grid", type=int, nargs=2, default=[24, 18])
    p.add_argument("--errors", default="iid,structured", help="comma-separated error presets (simulated engine)")
    p.add_argument("--work", help="keep the outputs here (default: a temporary folder)")
    p.add_argument("--json", help="result file (default: benchmarks/results/reconstruct_<date>.json)")
    p.add_argument("--plot", help="figure (default docs/reconstruct_presets.png)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.views < 8:
        log.warning("fewer than 8 views: numbers are not comparable to the reported ones")
    presets = [e.strip() for e in args.errors.split(",") if e.strip()]
    t0 = time.perf_counter()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="reconstruct-bench-") as tmp:
        base = Path(args.work) if args.work else Path(tmp)
        for error in presets:
            t1 = time.perf_counter()
            seqs = [run_sequence(seed, args, base / error / f"seed{seed}", error) for seed in args.seeds]
            runs[error] = {"error_model": ErrorModel.from_option(error).__dict__, "summary": aggregate(seqs),
                           "sequences": seqs, "wall_s": time.perf_counter() - t1}
    wall = time.perf_counter() - t0
    for error, run in runs.items():
        print(f"\n=== error preset: {error} ===")
        print_table(run["summary"], run["sequences"])
    print(f"total {wall:.1f} s on {platform.machine()} ({platform.processor() or 'cpu'})")
    default = ROOT / "benchmarks" / "results" / f"reconstruct_{dt.date.today():%Y%m%d}.json"
    path = Path(args.json) if args.json else default
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "reconstruct", "date": dt.datetime.now().isoformat(timespec="seconds"),
              "command": "python -m benchmarks.reconstruct_bench " + " ".join(argv),
              "settings": vars(args), "errors": presets, "presets": runs, "wall_s": wall}
    path.write_text(json.dumps(result, indent=1, default=_json))
    print(f"wrote {path}")
    if not args.no_plot:
        plot_presets(json.loads(path.read_text()), Path(args.plot) if args.plot else ROOT / "docs" / "reconstruct_presets.png")
    return 0


def plot_presets(result: dict, path: Path) -> None:
    """Pose AUC and Chamfer per error preset, densify vs SIFT (docs/reconstruct_presets.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(result["presets"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    w = 0.8 / (2 * len(presets))
    for k, e in enumerate(presets):
        a = result["presets"][e]["summary"]
        for m, (method, hatch) in enumerate((("ours", ""), ("sift", "//"))):
            x = np.arange(3) + (2 * k + m - len(presets) + 0.5) * w
            axes[0].bar(x, [a[method][f"auc@{t}"] for t in (5, 10, 30)], w, hatch=hatch, color=f"C{k}",
                        label=f"{'densify' if method == 'ours' else 'SIFT'}, {e}")
        rows = [("ours", a["ours"]["chamfer_accuracy_m"], a["ours"]["chamfer_completeness_m"]),
                ("SIFT", a["sift"]["chamfer_accuracy_m"], a["sift"]["chamfer_completeness_m"]),
                ("true poses", a["true_poses"]["accuracy"], a["true_poses"]["completeness"])]
        if "ours_scale_checked" in a:
            rows.append(("ours, scale-checked", a["ours_scale_checked"]["accuracy"],
                         a["ours_scale_checked"]["completeness"]))
        for j, (name, acc, comp) in enumerate(rows):
            axes[1].bar(j + (k - (len(presets) - 1) / 2) * 0.35, acc, 0.35, color=f"C{k}",
                        label=f"accuracy, {e}" if j == 0 else None)
            axes[1].plot(j + (k - (len(presets) - 1) / 2) * 0.35, comp, "k_", ms=14,
                         label="completeness" if j == 0 and k == 0 else None)
        axes[1].set_xticks(range(len(rows)))
        axes[1].set_xticklabels([r[0] for r in rows], rotation=15)
    axes[0].set_xticks(range(3))
    axes[0].set_xticklabels(["AUC@5", "AUC@10", "AUC@30"])
    axes[0].set_ylim(0, 1)
    axes[0].set_title("pose AUC (max of R, t error)")
    axes[0].legend(fontsize=8)
    axes[1].set_title("Chamfer of the fused mesh (m)")
    axes[1].legend(fontsize=8)
    n = len(result["presets"][presets[0]]["sequences"])
    fig.suptitle(f"Reconstruction, {n} synthetic sequences x {result['settings']['views']} views, simulated VLM3 "
                 f"under each error preset")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _json(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (PoseGraphResult, Path)):
        return str(o)
    raise TypeError(type(o))


if __name__ == "__main__":
    sys.exit(main())
