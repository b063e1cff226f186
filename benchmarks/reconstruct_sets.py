"""Image sets that are not a neat sequence, on seeded synthetic scenes: densify (simulated VLM3) vs SIFT.

    python -m benchmarks.reconstruct_sets [--sets unordered,loop,video] [--errors iid,structured] [--seed 0]
        [--short-edges K] [--work DIR]
    (also: python -m benchmarks.reconstruct_bench --sets ...)

Sets (640x480 views of a ray-cast room, densify.synthetic.scenes):

* ``unordered``: 24 views of a walk, saved under shuffled file names. Runs: the same views in order with
  ``consecutive+skip2`` (the sequential reference), the shuffled set with ``exhaustive`` and with
  ``retrieval`` (5 per image).
* ``loop``: 36 views on a closed orbit (10 degrees apart; view 35 sees what view 0 sees). Runs:
  ``consecutive`` (no loop closure), ``consecutive`` + 2 loop candidates per image, and ``retrieval``.
* ``video``: 24 rendered frames of a walk written as an mp4 at 10 fps, read back at ``--fps 5`` (every
  other frame, with timestamps), ``consecutive+skip2``.

Every run is `densify.stages.scene.reconstruct` with the simulated engine answering from the exact truth
under an error preset (``iid`` or ``structured``: models of errors, not measurements of VLM3). The SIFT
baseline (OpenCV SIFT + ratio test) solves the same pairs with the same depth maps, estimator and pose
graph. Metrics: images posed; pose AUC@5/10/30 over every pair of views from the final global poses
(max of rotation and folded direction error; an unposed view's pairs count as misses) and over the
selected pairs' own relative poses; trajectory error; Chamfer accuracy / completeness of the fused mesh;
queries (depth, pairs, and those spent on pairs that did not verify: probe-rejected, and all failed pairs);
the retrieval's recall and precision of truly overlapping pairs (both views see >= 30% of each other);
wall time per stage. Writes benchmarks/results/reconstruct_sets_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from densify.config.loading import dict_overrides
from densify.config.profiles import load_profile
from densify.eval.pose_eval import chamfer, pose_auc, pose_errors, trajectory_error, visible_surface_samples
from densify.io.images import discover, load_rgb
from densify.io.outputs import write_json
from densify.io.video import extract_frames
from densify.pairs.matching import sift_matches
from densify.pairs.solve import PairResult, classify, solve_pair_xy
from densify.sim.engine import ErrorModel, SimulatedEngine
from densify.sim.truth import SceneTruth
from densify.stages.scene import graph_stage, reconstruct
from densify.stages.settings import ReconstructConfig, load_config

log = logging.getLogger("reconstruct_sets")
ROOT = Path(__file__).resolve().parents[1]
OVERLAP = 0.3


def _engines(scene, ids: dict[str, int], seed: int, error: str) -> dict:
    truth = SceneTruth(scene, ids=ids)
    return {st: SimulatedEngine(load_profile(p), seed=seed, error=ErrorModel.from_option(error), truth=truth)
            for st, p in (("depth", "vlm3-depth"), ("corr", "vlm3-corr"), ("pose", "vlm3-pose"))}


def _overlaps(scene) -> np.ndarray:
    n = len(scene.views)
    ov = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                ov[i, j] = np.isfinite(scene.matches(i, j, pixel_size=(160, 120))[..., 0]).mean()
    return np.minimum(ov, ov.T)


def global_auc(cam_to_world: dict, gt: dict) -> dict:
    """Pose AUC over every pair of views from global poses (keys: view index); unposed pairs are misses."""
    errs = []
    keys = sorted(gt)
    for a in keys:
        for b in keys:
            if b <= a:
                continue
            T = np.linalg.inv(gt[b]) @ gt[a]
            if a in cam_to_world and b in cam_to_world:
                E = np.linalg.inv(cam_to_world[b]) @ cam_to_world[a]
                t = E[:3, 3]
                p = SimpleNamespace(R=E[:3, :3], t=t / max(np.linalg.norm(t), 1e-12), t_metric=t, ok=True)
                errs.append(pose_errors(p, T)["max_deg"])
            else:
                errs.append(float("inf"))
    return pose_auc(errs)


def _sift_graph(res, scene, view_of: dict, cfg, out: Path):
    """SIFT matches on the same pairs, the same depth maps and estimator, the same pose graph."""
    from densify.geometry.scale import pair_log_scale, relative_log_scales

    results, rows, t0 = [], [], time.perf_counter()
    depth = lambda info: np.load(out / "depth" / info.id / "depth.npy")  # noqa: E731
    for r in res.pairs:
        a, b = res.infos[r.i], res.infos[r.j]
        if not (a.ok and b.ok):
            continue
        x1, x2 = sift_matches(load_rgb(a.path), load_rgb(b.path), ratio=0.8)
        pose, info = solve_pair_xy(x1, x2, a.camera, b.camera, depth(a), cfg.pose.estimator)
        res_ = classify(PairResult(r.i, r.j, a.id, b.id, "ok", pose, {}, information=info, kind=r.kind))
        results.append(res_)
        if res_.usable and pose.source == "pnp" and cfg.posegraph.scale_pairs:  # the same scale check as ours
            lr = pair_log_scale(x1, x2, depth(a), depth(b), a.camera, pose.R, pose.t_metric)
            if lr is not None:
                rows.append((r.i, r.j, lr))
    scales = relative_log_scales(len(res.infos), rows) if cfg.posegraph.scale_pairs else None
    graph = graph_stage(res.infos, results, cfg, scales)
    return graph, results, time.perf_counter() - t0


def _score(cam_to_world_idx: dict, reference_idx, pair_results, infos, scene, view_of, mesh_pts, gt_pts) -> dict:
    """Metrics of one pose set: cam_to_world by info index (the reference's frame)."""
    gt = {view_of[infos[k].id]: scene.views[view_of[infos[k].id]].cam_to_world for k in range(len(infos))}
    est = {view_of[infos[k].id]: T for k, T in cam_to_world_idx.items()}
    ref_view = view_of[infos[reference_idx].id] if reference_idx is not None else None
    out = {"posed": len(est), "images": len(infos), **{f"global_{k}": v for k, v in global_auc(est, gt).items()},
           "trajectory": trajectory_error(est, gt, ref_view) if ref_view is not None else None}
    pe = []
    for r in pair_results:
        T = scene.relative_pose(view_of[infos[r.i].id], view_of[infos[r.j].id])
        pe.append(pose_errors(r.pose if r.status != "failed" else None, T)["max_deg"])
    out.update({f"pairs_{k}": v for k, v in pose_auc(pe).items()})
    if mesh_pts is not None and ref_view is not None:
        A = scene.views[ref_view].cam_to_world
        out["chamfer"] = chamfer(mesh_pts @ A[:3, :3].T + A[:3, 3], gt_pts, gt_mesh=scene.mesh)
    return out


def _fused_points(out: Path, res, cfg, cam_to_world: dict | None = None):
    """Vertices of the run's mesh, or of the same depth maps fused with other poses (the baseline's)."""
    import open3d as o3d

    if cam_to_world is None:
        p = out / "mesh.ply"
        return np.asarray(o3d.io.read_triangle_mesh(str(p)).vertices) if p.is_file() else None
    from densify.geometry.fusion import FusionFrame, tsdf_fuse

    frames = [FusionFrame(res.infos[k].camera, T, lambda k=k: np.load(out / "depth" / res.infos[k].id / "depth.npy"),
                          res.infos[k].rgb) for k, T in sorted(cam_to_world.items())]
    if len(frames) < 2:
        return None
    mesh, _, _ = tsdf_fuse(frames, cfg.fusion)
    return np.asarray(mesh.vertices)


def run_one(name: str, sources, scene, view_of: dict, pairs: dict, args, work: Path, error: str, gt_pts,
            ov: np.ndarray, depth_from: Path | None = None, video=None) -> dict:
    """One reconstruction of a set (densify and the SIFT baseline on its pairs)."""
    out = work / name
    if depth_from is not None and (depth_from / "depth").is_dir() and not (out / "depth").exists():
        shutil.copytree(depth_from / "depth", out / "depth")  # the same depth settings: the stage skips them
    over = {"engine": {"name": "simulated"}, "pairs": pairs, "corr": {"grid": list(args.grid)}}
    if args.short_edges is not None:
        over["posegraph"] = {"short_edges_per_image": args.short_edges}
    cfg = load_config(ReconstructConfig, None, dict_overrides(over), default_name="reconstruct")
    t0 = time.perf_counter()
    res = reconstruct(sources, cfg, out, engines=_engines(scene, view_of, args.seed, error), video=video)
    wall = time.perf_counter() - t0
    s = res.summary
    row = {"run": name, "pairs_setting": pairs, "wall_s": wall, "timings_s": s["timings_s"],
           "pairs": s["pairs"], "pairs_ok": s["pairs_ok"], "pairs_no_overlap": s["pairs_no_overlap"],
           "depth_queries": s["depth"]["queries"], "depth_skipped": s["depth"]["skipped"],
           "pair_queries": s["pair_queries"], "pair_queries_no_overlap": s["pair_queries_no_overlap"],
           "pair_queries_failed": s["pair_queries_failed"], "pruned_pairs": len(s["pruned_pairs"]),
           "long_pairs_left_out": len(s["long_pairs_left_out"]),
           "selection": s["pair_selection"]}
    sel = {(view_of[res.infos[r.i].id], view_of[res.infos[r.j].id]) for r in res.pairs}
    sel = {(min(a, b), max(a, b)) for a, b in sel}
    true = {(a, b) for a in range(len(ov)) for b in range(a + 1, len(ov)) if ov[a, b] >= OVERLAP}
    row["overlap"] = {"true_pairs": len(true), "selected": len(sel), "recall": len(sel & true) / max(len(true), 1),
                      "precision": len(sel & true) / max(len(sel), 1)}
    row["ours"] = _score(res.graph.cam_to_world, res.graph.reference, res.pairs, res.infos, scene, view_of,
                         _fused_points(out, res, cfg), gt_pts)
    g, sift_pairs, t_sift = _sift_graph(res, scene, view_of, cfg, out)
    row["sift"] = _score(g.cam_to_world, g.reference, sift_pairs, res.infos, scene, view_of,
                         _fused_points(out, res, cfg, g.cam_to_world), gt_pts)
    row["sift"]["pose_s"] = t_sift
    log.warning("%s/%s: posed %d/%d, global AUC@10 %.3f (SIFT %.3f), %d pair queries (%d on pairs that did "
                "not verify), %.0f s", error, name, row["ours"]["posed"], row["ours"]["images"],
                row["ours"]["global_auc@10"], row["sift"]["global_auc@10"], row["pair_queries"],
                row["pair_queries_failed"], wall)
    return row


def _surface(scene, cfg_depth_trunc=8.0):
    return visible_surface_samples(scene.mesh, [(v.depth, v.camera, v.cam_to_world) for v in scene.views],
                                   n=300_000, max_depth=cfg_depth_trunc)


def set_unordered(args, work: Path, error: str) -> list[dict]:
    from densify.synthetic.scenes import SceneSpec, make_scene

    scene = make_scene(SceneSpec(seed=args.seed, n_views=24, width=args.width, height=args.height, step_m=0.15))
    rng = np.random.default_rng(args.seed)
    names = [f"IMG_{k:04d}" for k in rng.choice(10000, len(scene.views), replace=False)]
    ordered = scene.save(work / "ordered")
    scene.save(work / "shuffled", names=names)
    ov, gt_pts = _overlaps(scene), _surface(scene)
    seq_ids = {f"view_{k:03d}": k for k in range(len(scene.views))}
    shuf_ids = {n: k for k, n in enumerate(names)}
    shuffled = discover([str(work / "shuffled")])  # sorted by file name: an order that says nothing
    rows = [run_one("sequential", discover([str(p) for p in ordered]), scene, seq_ids, "consecutive+skip2", args,
                    work, error, gt_pts, ov)]
    rows.append(run_one("exhaustive", shuffled, scene, shuf_ids, "exhaustive", args, work, error, gt_pts, ov))
    rows.append(run_one("retrieval", shuffled, scene, shuf_ids, {"mode": "retrieval", "per_image": 5}, args, work,
                        error, gt_pts, ov, depth_from=work / "exhaustive"))
    return rows


def set_loop(args, work: Path, error: str) -> list[dict]:
    from densify.synthetic.scenes import SceneSpec, make_scene

    scene = make_scene(SceneSpec(seed=args.seed, n_views=36, width=args.width, height=args.height, trajectory="orbit",
                                 step_deg=10.0))
    images = scene.save(work / "loop")
    ov, gt_pts = _overlaps(scene), _surface(scene)
    ids = {f"view_{k:03d}": k for k in range(len(scene.views))}
    src = discover([str(p) for p in images])
    rows = [run_one("consecutive", src, scene, ids, "consecutive", args, work, error, gt_pts, ov)]
    rows.append(run_one("consecutive+loops", src, scene, ids, {"mode": "consecutive", "loops": 2}, args, work, error,
                        gt_pts, ov, depth_from=work / "consecutive"))
    rows.append(run_one("retrieval", src, scene, ids, {"mode": "retrieval", "per_image": 5}, args, work, error, gt_pts,
                        ov, depth_from=work / "consecutive"))
    return rows


def set_video(args, work: Path, error: str) -> list[dict]:
    import cv2

    from densify.synthetic.scenes import SceneSpec, make_scene

    scene = make_scene(SceneSpec(seed=args.seed + 1, n_views=24, width=args.width, height=args.height, step_m=0.1,
                                 step_deg=4.0))
    video = work / "walk.mp4"
    work.mkdir(parents=True, exist_ok=True)
    vw = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (args.width, args.height))
    for v in scene.views:
        vw.write(np.ascontiguousarray(v.rgb[:, :, ::-1]))
    vw.release()
    sources, rec = extract_frames(video, work / "video" / "frames", fps=5.0)
    cam = scene.views[0].camera
    for s in sources:  # a real video takes --intrinsics; these are the renderer's
        s.intrinsics = [cam.fx, cam.fy, cam.cx, cam.cy]
    ids = {s.id: s.extra["frame"] for s in sources}
    keep = sorted(ids.values())
    sub = _Subset(scene, keep)
    ov, gt_pts = _overlaps(sub), _surface(sub)
    row = run_one("video", sources, sub, {k: keep.index(v) for k, v in ids.items()}, "consecutive+skip2", args, work,
                  error, gt_pts, ov, video=rec)
    row["video"] = {"frames_decoded": rec["decoded_frames"], "frames_kept": len(sources), "fps": 5.0,
                    "timestamps_s": [s.extra["timestamp_s"] for s in sources]}
    return [row]


class _Subset:
    """The views of a scene that a video sampling kept, indexed 0..n-1 (truth and metrics by kept index)."""

    def __init__(self, scene, keep):
        self._scene, self.keep = scene, keep
        self.views, self.mesh, self.objects = [scene.views[k] for k in keep], scene.mesh, scene.objects

    def matches(self, i, j, **kw):
        return self._scene.matches(self.keep[i], self.keep[j], **kw)

    def relative_pose(self, i, j):
        return self._scene.relative_pose(self.keep[i], self.keep[j])

    def raycaster(self):
        return self._scene.raycaster()


SETS = {"unordered": set_unordered, "loop": set_loop, "video": set_video}


def print_rows(error: str, name: str, rows: list[dict]) -> None:
    print(f"\n=== {name}, {error} errors ===")
    print(f"{'run':20s}{'posed':>8s}{'AUC@5/10/30 (all pairs)':>26s}{'SIFT AUC@10':>12s}{'ATE m':>8s}"
          f"{'Chamfer acc/comp':>18s}{'pairs':>7s}{'pair q':>9s}{'unverified q':>13s}{'recall':>8s}{'wall s':>8s}")
    for r in rows:
        o, s = r["ours"], r["sift"]
        ch = o.get("chamfer") or {}
        print(f"{r['run']:20s}{o['posed']:>4d}/{o['images']:<3d}"
              f"{o['global_auc@5']:>10.3f}/{o['global_auc@10']:.3f}/{o['global_auc@30']:.3f}"
              f"{s['global_auc@10']:>12.3f}{(o['trajectory'] or {}).get('ate_rmse_m', float('nan')):>8.3f}"
              f"{ch.get('accuracy', float('nan')):>10.3f}/{ch.get('completeness', float('nan')):.3f}"
              f"{r['pairs']:>7d}{r['pair_queries']:>9,d}{r['pair_queries_failed']:>13,d}"
              f"{r['overlap']['recall']:>8.2f}{r['wall_s']:>8.0f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default="unordered,loop,video")
    p.add_argument("--errors", default="iid,structured", help="comma-separated error presets (simulated engine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--grid", type=int, nargs=2, default=[24, 18])
    p.add_argument("--short-edges", type=int, help="posegraph.short_edges_per_image of every run (default: the "
                   "configuration's; 0: every pair enters the pose graph, as before it existed)")
    p.add_argument("--work", help="keep the outputs here (default: a temporary folder; a rerun into the same "
                   "folder reuses its depth maps and pairs)")
    p.add_argument("--json", help="result file (default: benchmarks/results/reconstruct_sets_<date>.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sets = [s for s in args.sets.split(",") if s]
    errors = [e for e in args.errors.split(",") if e]
    t0 = time.perf_counter()
    result = {"benchmark": "reconstruct_sets", "date": dt.datetime.now().isoformat(timespec="seconds"),
              "command": "python -m benchmarks.reconstruct_sets " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": vars(args), "machine": platform.machine(), "simulated": True, "results": {}}
    path = Path(args.json) if args.json else ROOT / "benchmarks" / "results" / f"reconstruct_sets_{dt.date.today():%Y%m%d}.json"
    with tempfile.TemporaryDirectory(prefix="reconstruct-sets-") as tmp:
        base = Path(args.work) if args.work else Path(tmp)
        for error in errors:
            for name in sets:
                rows = SETS[name](args, base / error / name, error)
                result["results"].setdefault(error, {})[name] = rows
                print_rows(error, name, rows)
                result["wall_s"] = time.perf_counter() - t0
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json(path, result)  # after every set: nothing lost
    print(f"total {result['wall_s']:.0f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
