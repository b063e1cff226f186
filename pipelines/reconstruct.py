"""`densify reconstruct`: images -> depth per image -> pairwise matches and poses -> pose graph -> TSDF fusion
-> exports (poses.json, mesh.ply, cloud.ply, COLMAP text model, nerfstudio transforms.json).

Stages, each with one engine model loaded at a time:
  1. depth      every image through the depth pipeline (<out>/depth/<id>/, resumable)
  2. pairs      correspondence questions per pair (i, i+1) [+ (i, i+2)], essential matrix + PnP on depth
                (<out>/pairs/<id1>__<id2>/: matches.npz, answers.jsonl, pose.json)
  3. vlm pose   (pose.source vlm | both) the pose profile's answers per pair
  4. graph      Open3D pose-graph optimisation over the largest connected component -> poses.json
  5. fusion     TSDF of the written depth maps (loaded one at a time) -> mesh.ply, cloud.ply
  6. export     multi-view tracks -> colmap/{cameras,images,points3D}.txt (read back with pycolmap),
                transforms.json
A missing image or a failed pair gets a failure record (pairs.jsonl, summary.json); reconstruction goes on
with what still connects and lists what it dropped.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from densify import outputs
from densify.cameras import Camera, CameraError
from densify.config import ConfigError, parse_set_options
from densify.engines import create_engine
from densify.engines.base import Engine, EngineError
from densify.geometry.export import (build_tracks, read_colmap_check, triangulate_tracks, write_colmap_text,
                                     write_nerfstudio)
from densify.geometry.fusion import frames_from_outputs, tsdf_fuse
from densify.geometry.pose import PairPose
from densify.geometry.posegraph import PoseEdge, PoseGraphResult, optimize_poses
from densify.images import ImageError, ImageSource, discover, load_rgb
from densify.matching import Matches, PairRequest, corr_view, dense_flow, match_pairs, pair_truth, track_points
from densify.pairs import PairResult, classify, failed_pair, pair_key, pair_list, solve_pair
from densify.profiles import Profile, load_profile
from densify.progress import Progress
from densify.truth import SidecarTruth, TruthProvider
from densify.vlm_pose import ask_pose, compare_poses, pose_view
from pipelines.configs_reconstruct import ReconstructJobConfig, load_reconstruct_config
from pipelines.depth import run_depth

log = logging.getLogger("densify.reconstruct")


@dataclass
class ImageInfo:
    index: int
    id: str
    path: Path
    status: str  # "ok" | "skipped" (done earlier) | "failed"
    camera: Camera | None = None
    error: str | None = None
    error_kind: str | None = None

    @property
    def ok(self) -> bool:
        return self.status != "failed" and self.camera is not None


# -- engines

def _engine(stage: str, profile: Profile, cfg: ReconstructJobConfig, given: dict | None) -> tuple[Engine, bool]:
    """(engine, owned): a caller's engine for this stage, else a new one from the config."""
    if given and stage in given:
        return given[stage], False
    ec = cfg.stage_engine(stage)
    return create_engine(ec.name, profile=profile, **ec.options), True


def _uses_truth(engine) -> bool:
    return bool(getattr(engine, "uses_truth", False))


# -- 1. depth

def depth_stage(sources: list[ImageSource], cfg: ReconstructJobConfig, depth_dir: Path, *, engines=None,
                intrinsics=None, progress: bool = True) -> tuple[list[ImageInfo], dict]:
    """The depth pipeline (pipelines.depth.run_depth) over the sequence; per image only a light record
    stays in memory, the camera read back from the camera.json the depth stage wrote."""
    import json

    dcfg = cfg.depth_job()
    profile = load_profile(dcfg.profile)
    if profile.task != "depth":
        raise ConfigError(f"depth.profile: {profile.name!r} is a {profile.task} profile, not a depth profile")
    engine, owned = _engine("depth", profile, cfg, engines)
    try:
        summary = run_depth(sources, dcfg, depth_dir, engine=engine, progress=progress, intrinsics=intrinsics)
    except EngineError as exc:
        raise EngineError(f"depth stage: {exc}") from exc
    finally:
        if owned:
            engine.close()
    by_id = {r.id: r for r in summary.pop("_results")}
    infos = []
    for k, src in enumerate(sources):
        r = by_id[src.id]
        info = ImageInfo(k, src.id, Path(src.path), r.status, error=r.error, error_kind=r.error_kind)
        cam_file = depth_dir / src.id / "camera.json"
        if r.status != "failed" and cam_file.is_file():
            info.camera = Camera(**json.loads(cam_file.read_text())["intrinsics"])
        infos.append(info)
    return infos, summary


# -- 2. pairs

class _Views:
    """The last few prepared images (a pair sequence revisits each image for a few pairs only)."""

    def __init__(self, make, size: int = 3):
        self.make, self.size, self.items = make, size, OrderedDict()

    def get(self, info: ImageInfo):
        if info.index not in self.items:
            self.items[info.index] = self.make(info)
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        self.items.move_to_end(info.index)
        return self.items[info.index]


def _pair_dir(out: Path, a: ImageInfo, b: ImageInfo) -> Path:
    return out / "pairs" / pair_key(a.id, b.id)


def _load_depth(out: Path, info: ImageInfo) -> np.ndarray | None:
    p = out / "depth" / info.id / "depth.npy"
    return np.load(p) if p.is_file() else None


def _write_pair(d: Path, res: PairResult, m: Matches | None, cfg: ReconstructJobConfig, rgb1=None) -> None:
    if m is not None:
        inl = np.zeros(len(m), bool)
        if res.pose is not None and res.pose.inlier_mask is not None:
            inl[np.flatnonzero(m.valid)[res.pose.inlier_mask]] = True
        m.save(d / "matches.npz", inliers=inl)
        outputs.write_jsonl(d / "answers.jsonl", m.records())
        if cfg.corr.save_flow and m.n_valid:
            method = cfg.corr.flow_method if rgb1 is not None else "linear"
            outputs.write_npy(d / "flow.npy", dense_flow(m, method=method, rgb1=rgb1).values)
    outputs.write_json(d / "pose.json", {"record": res.record(),
                                         "pose": res.pose.to_dict() if res.pose is not None else None,
                                         "information": res.information})


def _load_pair(d: Path, a: ImageInfo, b: ImageInfo) -> tuple[PairResult, Matches | None]:
    import json

    data = json.loads((d / "pose.json").read_text())
    rec = data["record"]
    pose = PairPose.from_dict(data["pose"]) if data.get("pose") else None
    info = np.asarray(data["information"], float) if data.get("information") is not None else None
    res = PairResult(a.index, b.index, a.id, b.id, rec["status"], pose, rec.get("matches", {}), rec.get("error"),
                     rec.get("error_kind"), info, rec.get("vlm"), rec.get("cross_check"))
    m = Matches.load(d / "matches.npz") if (d / "matches.npz").is_file() else None
    return res, m


def _unusable(i, j, a: ImageInfo, b: ImageInfo) -> PairResult:
    bad = a if not a.ok else b
    return failed_pair(i, j, a.id, b.id, f"image {bad.id} unusable ({bad.error_kind}): {bad.error}", "image")


def pair_stage(infos: list[ImageInfo], pairs: list[tuple[int, int]], cfg: ReconstructJobConfig, out: Path, *,
               engines=None, truth: TruthProvider | None = None, progress: bool = True,
               require_metric: bool = True) -> list[PairResult]:
    """Correspondences and RANSAC/PnP poses for every pair, one pair at a time (resumable).

    require_metric: a pose without metric scale counts as failed (it cannot join a pose graph)."""
    profile = load_profile(cfg.corr.profile)
    if profile.task != "corr":
        raise ConfigError(f"corr.profile: {profile.name!r} is a {profile.task} profile, not a correspondence profile")
    results: list[PairResult] = []
    carried: dict[int, list[np.ndarray]] = {}
    grid = tuple(cfg.corr.grid)
    engine, owned = None, False
    views = _Views(lambda info: corr_view(info.id, load_rgb(info.path), info.camera, profile))
    bar = Progress(len(pairs), enabled=progress, label="pairs")
    try:
        for i, j in pairs:
            a, b = infos[i], infos[j]
            for k in [k for k in carried if k < i]:
                del carried[k]  # no later pair starts there
            if not (a.ok and b.ok):
                results.append(_unusable(i, j, a, b))
                bar.update(failed=1)
                continue
            d = _pair_dir(out, a, b)
            if not cfg.overwrite and (d / "pose.json").is_file() and (d / "matches.npz").is_file():
                res, m = _load_pair(d, a, b)
                if m is not None:
                    carried.setdefault(j, []).append(m.pairs()[1])
                results.append(res)
                bar.update()
                continue
            if engine is None:
                engine, owned = _engine("corr", profile, cfg, engines)
            t0 = time.perf_counter()
            try:
                v1, v2 = views.get(a), views.get(b)
                pts = None
                if cfg.corr.track_queries:
                    c = carried.get(i)
                    pts = track_points(a.camera.width, a.camera.height, grid, np.concatenate(c) if c else None)
                t1 = t2 = None
                if _uses_truth(engine):
                    truth_m = truth.matches(i, j) if truth is not None else None
                    back_m = truth.matches(j, i) if truth is not None else None
                    t1, t2 = pair_truth(v1, v2, truth_m), pair_truth(v2, v1, back_m)
                req = PairRequest(v1, v2, pts, t1, t2, key=(i, j))
                _, m = next(match_pairs(engine, profile, [req], grid=grid, fb_check=cfg.corr.fb_check,
                                        fb_thresh_px=cfg.corr.fb_thresh_px))
                del t1, t2, req
            except (ImageError, CameraError, OSError, ValueError) as exc:
                log.error("pair %s/%s: %s", a.id, b.id, exc)
                results.append(failed_pair(i, j, a.id, b.id, str(exc), "image"))
                bar.update(failed=1)
                continue
            except EngineError as exc:
                log.error("pair %s/%s: engine failed: %s", a.id, b.id, exc)
                results.append(failed_pair(i, j, a.id, b.id, f"engine: {exc}", "engine"))
                bar.update(failed=1)
                continue
            depth1 = _load_depth(out, a) if cfg.pose.use_depth else None
            pose, info = solve_pair(m, a.camera, b.camera, depth1, cfg.pose.estimator)
            del depth1
            counts = {"asked": len(m), "asked_backward": m.backward_queries, "valid": m.n_valid,
                      "failures": m.failure_counts(),
                      "fb_median_px": float(np.nanmedian(m.fb_error)) if m.fb_error is not None
                      and np.isfinite(m.fb_error).any() else None, "wall_s": time.perf_counter() - t0}
            res = classify(PairResult(i, j, a.id, b.id, "ok", pose, counts, information=info),
                           require_metric=require_metric)
            if res.status == "failed":
                log.warning("pair %s/%s failed: %s", a.id, b.id, res.error)
            _write_pair(d, res, m, cfg, rgb1=load_rgb(a.path) if cfg.corr.save_flow else None)
            carried.setdefault(j, []).append(m.pairs()[1])
            results.append(res)
            bar.update(queries=len(m) + m.backward_queries, failed=int(res.status == "failed"))
    finally:
        bar.close()
        if owned and engine is not None:
            engine.close()
    return results


# -- 3. poses asked of the pose profile

def vlm_pose_stage(infos: list[ImageInfo], pairs: list[tuple[int, int]], results: list[PairResult] | None,
                   cfg: ReconstructJobConfig, out: Path, *, engines=None, truth: TruthProvider | None = None,
                   progress: bool = True, require_metric: bool = True) -> list[PairResult]:
    """Ask the pose profile about every pair; source 'vlm' replaces the poses, 'both' cross-checks them."""
    profile = load_profile(cfg.pose.profile)
    if profile.task != "pose":
        raise ConfigError(f"pose.profile: {profile.name!r} is a {profile.task} profile, not a pose profile")
    by_pair = {(r.i, r.j): r for r in results or []}
    engine, owned = _engine("pose", profile, cfg, engines)
    views = _Views(lambda info: pose_view(load_rgb(info.path), info.camera, profile))
    out_results = []
    try:
        for i, j in pairs:
            a, b = infos[i], infos[j]
            res = by_pair.get((i, j))
            if not (a.ok and b.ok):
                out_results.append(res or _unusable(i, j, a, b))
                continue
            try:
                T_gt = truth.relative_pose(i, j) if truth is not None and _uses_truth(engine) else None
                vp = ask_pose(engine, profile, views.get(a), views.get(b), id1=a.id,
                              id2=b.id, questions=cfg.pose.questions, T_2_from_1=T_gt)
            except (ImageError, CameraError, OSError, EngineError) as exc:
                log.error("pair %s/%s: pose questions failed: %s", a.id, b.id, exc)
                out_results.append(res or failed_pair(i, j, a.id, b.id, f"pose questions: {exc}", "engine"))
                continue
            vpose = vp.pair_pose()
            if cfg.pose.source == "vlm":
                res = res or PairResult(i, j, a.id, b.id)
                res.status, res.error, res.error_kind = "ok", None, None
                res.pose, res.information = vpose, None
                res.vlm = vp.to_dict()
                classify(res, require_metric=require_metric)
            else:
                res = res or failed_pair(i, j, a.id, b.id, "no correspondence pose", "pose")
                res.vlm = vp.to_dict()
                if res.pose is not None and res.pose.R is not None:
                    res.cross_check = compare_poses(res.pose, vpose)
                    log.info("pair %s/%s: RANSAC vs VLM pose: rotation %.1f deg, direction %s deg", a.id, b.id,
                             res.cross_check["rotation_deg"], _fmt(res.cross_check["direction_deg"]))
            d = _pair_dir(out, a, b)
            outputs.write_json(d / "vlm_pose.json", {"answers": vp.to_dict(), "pose": vpose.to_dict(),
                                                     "cross_check": res.cross_check})
            if cfg.pose.source == "vlm":
                _write_pair(d, res, None, cfg)
            out_results.append(res)
    finally:
        if owned:
            engine.close()
    return out_results


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


# -- 4. pose graph

def graph_stage(infos: list[ImageInfo], results: list[PairResult], cfg: ReconstructJobConfig) -> PoseGraphResult:
    nodes = [k.index for k in infos if k.ok]
    edges = []
    for r in results:
        if r.status == "failed" or not r.usable:
            continue
        w = float(max(r.pose.inliers, 1))
        edges.append(PoseEdge(r.i, r.j, r.pose.T, r.information, weight=w,
                              uncertain=cfg.posegraph.loop_edges_uncertain and (r.j - r.i) > 1))
    return optimize_poses(nodes, edges, cfg.posegraph)


def dropped_images(infos: list[ImageInfo], graph: PoseGraphResult) -> list[dict]:
    out = []
    for k in infos:
        if not k.ok:
            out.append({"id": k.id, "image": str(k.path), "reason": f"{k.error_kind}: {k.error}"})
        elif k.index not in graph.cam_to_world:
            out.append({"id": k.id, "image": str(k.path),
                        "reason": "no usable pair connects it to the largest connected component of the pair graph"})
    return out


def write_poses(path: Path, infos: list[ImageInfo], graph: PoseGraphResult, dropped: list[dict]) -> None:
    ref = infos[graph.reference].id if graph.reference is not None else None
    outputs.write_json(path, {
        "convention": "cam_to_world: x_world = T @ x_camera; OpenCV camera axes (x right, y down, z forward); "
                      "world = the reference camera's frame; metres",
        "reference": ref,
        "frames": [{"id": infos[k].id, "image": str(infos[k].path), "cam_to_world": graph.cam_to_world[k],
                    "intrinsics": infos[k].camera.to_dict()} for k in sorted(graph.cam_to_world)],
        "dropped": dropped, "pruned_pairs": [[infos[i].id, infos[j].id] for i, j in graph.pruned_edges]})


# -- 5. fusion, 6. exports

def fusion_stage(infos, graph: PoseGraphResult, cfg: ReconstructJobConfig, out: Path) -> dict:
    items = [(infos[k].id, infos[k].path, infos[k].camera, graph.cam_to_world[k]) for k in sorted(graph.cam_to_world)]
    if not items:
        return {"frames": 0}
    mesh, cloud, n = tsdf_fuse(frames_from_outputs(items, out / "depth", load_rgb), cfg.fusion)
    outputs.write_mesh(out / "mesh.ply", mesh)
    outputs.write_ply(out / "cloud.ply", cloud)
    return {"frames": n, "mesh_vertices": len(mesh.vertices), "mesh_triangles": len(mesh.triangles),
            "cloud_points": len(cloud.points)}


def export_stage(infos, results: list[PairResult], graph: PoseGraphResult, cfg: ReconstructJobConfig,
                 out: Path) -> dict:
    posed = graph.cam_to_world
    report: dict = {}
    if cfg.export.colmap:
        def pair_matches():
            for r in results:
                if r.i not in posed or r.j not in posed or r.status == "failed":
                    continue
                f = _pair_dir(out, infos[r.i], infos[r.j]) / "matches.npz"
                if not f.is_file():
                    continue
                z = np.load(f)
                keep = z["inliers"] if "inliers" in z.files else z["valid"]
                yield r.i, r.j, z["xy1"][keep], z["xy2"][keep]

        tracks = build_tracks(pair_matches(), cfg.export.min_track_length)
        cams = {k: infos[k].camera for k in posed}
        tracks = triangulate_tracks(tracks, cams, posed, cfg=cfg.export,
                                    load_depth=lambda k: _load_depth(out, infos[k]),
                                    load_rgb=lambda k: load_rgb(infos[k].path))
        images = [(k, infos[k].path.name, infos[k].camera, posed[k]) for k in sorted(posed)]
        write_colmap_text(out / "colmap", images, tracks)
        report["tracks"] = tracks.stats
        try:
            report["colmap"] = read_colmap_check(out / "colmap")
        except ImportError:
            report["colmap"] = {"error": "pycolmap not installed: model written but not read back"}
        except Exception as exc:  # pycolmap raises its own error types; the check must not end the run
            report["colmap"] = {"error": f"pycolmap could not read the model back: {exc}"}
            log.error("COLMAP model check failed: %s", exc)
    if cfg.export.nerfstudio:
        frames = [(os.path.relpath(infos[k].path, out), infos[k].camera, posed[k]) for k in sorted(posed)]
        depth = [os.path.relpath(out / "depth" / infos[k].id / "depth.png", out)
                 if (out / "depth" / infos[k].id / "depth.png").is_file() else None for k in sorted(posed)]
        write_nerfstudio(out / "transforms.json", frames, depth_paths=depth)
        report["nerfstudio"] = {"frames": len(frames)}
    return report


# -- the whole run

def run_reconstruct(sources: list[ImageSource], cfg: ReconstructJobConfig, out_dir: str | Path, *,
                    engines: dict[str, Engine] | None = None, truth: TruthProvider | None = None,
                    intrinsics=None, progress: bool = True) -> dict:
    """Run every stage; returns the summary (also written as <out>/summary.json).

    engines: optional engines per stage ('depth', 'corr', 'pose'), used as given and not closed.
    truth: ground truth for a simulated engine's pair questions (default: files beside the images).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if len(sources) < 2:
        raise ValueError(f"reconstruct needs at least 2 images, got {len(sources)}")
    if truth is None:
        truth = SidecarTruth(sources)

    infos, depth_summary = depth_stage(sources, cfg, out / "depth", engines=engines, intrinsics=intrinsics,
                                       progress=progress)
    timings["depth"] = time.perf_counter() - t
    pairs = pair_list(len(infos), cfg.pairs)

    t = time.perf_counter()
    results = None
    if cfg.pose.source in ("matches", "both"):
        results = pair_stage(infos, pairs, cfg, out, engines=engines, truth=truth, progress=progress)
    timings["pairs"] = time.perf_counter() - t
    if cfg.pose.source in ("vlm", "both"):
        t = time.perf_counter()
        results = vlm_pose_stage(infos, pairs, results, cfg, out, engines=engines, truth=truth, progress=progress)
        timings["vlm_pose"] = time.perf_counter() - t
    results = sorted(results, key=lambda r: (r.i, r.j))
    outputs.write_jsonl(out / "pairs.jsonl", (r.record() for r in results))

    t = time.perf_counter()
    graph = graph_stage(infos, results, cfg)
    dropped = dropped_images(infos, graph)
    for d in dropped:
        log.warning("dropped %s: %s", d["id"], d["reason"])
    write_poses(out / "poses.json", infos, graph, dropped)
    timings["posegraph"] = time.perf_counter() - t

    t = time.perf_counter()
    fusion = fusion_stage(infos, graph, cfg, out)
    timings["fusion"] = time.perf_counter() - t
    t = time.perf_counter()
    export = export_stage(infos, results, graph, cfg, out)
    timings["export"] = time.perf_counter() - t

    failed_pairs = [r.record() for r in results if r.status == "failed"]
    summary = {
        "images": len(infos), "posed": len(graph.cam_to_world),
        "reference": infos[graph.reference].id if graph.reference is not None else None,
        "dropped": dropped,
        "pairs": len(results), "pairs_ok": sum(r.status != "failed" for r in results),
        "failed_pairs": failed_pairs,
        "pruned_pairs": [[infos[i].id, infos[j].id] for i, j in graph.pruned_edges],
        "verdicts": {v: sum(1 for r in results if r.pose is not None and r.pose.verdict == v)
                     for v in ("good", "weak", "failed")},
        "depth": {k: depth_summary[k] for k in ("ok", "skipped", "failed", "queries", "answer_failures", "metrics")},
        "pair_queries": sum(r.matches.get("asked", 0) + r.matches.get("asked_backward", 0) for r in results),
        "fusion": fusion, "export": export, "timings_s": timings, "wall_s": sum(timings.values()),
        "config": cfg.model_dump(mode="json"),
    }
    outputs.write_json(out / "summary.json", summary)
    summary["_pairs"] = results
    summary["_graph"] = graph
    summary["_infos"] = infos
    return summary


# -- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="images in sequence order (files, a folder, globs or a .jsonl)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", help="pipeline YAML (default: configs/pipelines/reconstruct.yaml)")
    p.add_argument("--pairs", choices=["consecutive", "+skip2", "consecutive+skip2"],
                   help="pairs to relate: (i, i+1), plus (i, i+2) with +skip2")
    p.add_argument("--engine", help="simulated | hf | vllm | openai | ray (every stage)")
    p.add_argument("--pose-source", choices=["matches", "vlm", "both"], help="RANSAC on matches, the pose "
                   "profile's answers, or RANSAC cross-checked by the VLM")
    p.add_argument("--grid", type=int, nargs=2, metavar=("NX", "NY"), help="correspondence queries per pair")
    p.add_argument("--no-fb", action="store_true", help="skip the forward-backward check (half the queries)")
    p.add_argument("--intrinsics", help="fx,fy,cx,cy for every image (else sidecar JSON, else default FoV)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key")
    p.add_argument("--overwrite", action="store_true", help="redo images and pairs whose outputs exist")


def config_from_args(args) -> ReconstructJobConfig:
    over = parse_set_options(args.set)
    if getattr(args, "engine", None):
        over.setdefault("engine", {})["name"] = args.engine
    if getattr(args, "pairs", None):
        over["pairs"] = "consecutive+skip2" if args.pairs in ("+skip2", "consecutive+skip2") else args.pairs
    if getattr(args, "pose_source", None):
        over.setdefault("pose", {})["source"] = args.pose_source
    if getattr(args, "grid", None):
        over.setdefault("corr", {})["grid"] = list(args.grid)
    if getattr(args, "no_fb", False):
        over.setdefault("corr", {})["fb_check"] = False
    if getattr(args, "overwrite", False):
        over["overwrite"] = True
    return load_reconstruct_config(getattr(args, "config", None), over)


def run(args) -> int:
    from densify.cameras import parse_intrinsics_arg

    cfg = config_from_args(args)
    log.info("config: %s", cfg.model_dump_json())
    intr = parse_intrinsics_arg(args.intrinsics) if args.intrinsics else None
    sources = discover(args.inputs)
    s = run_reconstruct(sources, cfg, args.out, intrinsics=intr)
    print_summary(s, args.out)
    return 0 if s["posed"] >= 2 else 1


def print_summary(s: dict, out) -> None:
    from rich.console import Console

    c = Console()
    t = s["timings_s"]
    c.print(f"[bold]densify reconstruct[/]: {s['posed']} of {s['images']} images posed "
            f"(reference {s['reference']}); pairs {s['pairs_ok']} ok of {s['pairs']} "
            f"(verdicts {s['verdicts']}); {s['pair_queries']:,} correspondence queries (forward + backward); "
            f"{s['wall_s']:.1f} s (" + ", ".join(f"{k} {v:.1f}" for k, v in t.items()) + ")")
    for f in s["failed_pairs"]:
        c.print(f"  [red]failed pair[/] {f['pair'][0]} -> {f['pair'][1]} ({f.get('error_kind')}): {f.get('error')}")
    for d in s["dropped"]:
        c.print(f"  [yellow]dropped[/] {d['id']}: {d['reason']}")
    ex = s["export"]
    if "colmap" in ex:
        c.print(f"  COLMAP model: {ex['colmap']}")
    fu = s["fusion"]
    if fu.get("frames"):
        c.print(f"  fused {fu['frames']} frames: mesh {fu['mesh_vertices']:,} vertices, "
                f"cloud {fu['cloud_points']:,} points")
    c.print(f"outputs in {out} (poses.json, mesh.ply, cloud.ply, colmap/, transforms.json, pairs.jsonl, summary.json)")
