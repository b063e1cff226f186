"""The scene stage: pose graph, TSDF fusion and exports; and `reconstruct`, which runs every stage in turn.

    depth   every image through the depth stage (<out>/depth/<id>/, resumable)
    select  which pairs: a sequence's neighbours, every pair, a global-descriptor retrieval, a pairs file
            (densify.pairs.select), plus loop-closure candidates
    pairs   correspondences and RANSAC/PnP poses per pair, candidates probed first (densify.stages.pairs)
    graph   Open3D pose-graph optimisation, coarse to fine with outlier pruning, over the largest connected
            component -> poses.json
    fusion  TSDF of the written depth maps (loaded one at a time) -> mesh.ply, cloud.ply
    export  multi-view tracks -> colmap/ (text, read back with pycolmap) and colmap/bin/, transforms.json,
            scene.glb (mesh and cameras)

A missing image or a failed pair gets a record; reconstruction goes on with what still connects and says
what it dropped and why. With fewer than two posed images there is no scene: no mesh, cloud or exports
are written (never an empty file), and the summary says so.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from densify.config.profiles import load_profile
from densify.engines import Engine
from densify.geometry.clouds import require_open3d
from densify.geometry.export import (build_tracks, read_colmap_check, triangulate_tracks, write_colmap_binary,
                                     write_colmap_text, write_glb, write_nerfstudio)
from densify.geometry.fusion import FusionFrame, tsdf_fuse
from densify.geometry.posegraph import PoseEdge, PoseGraphResult, optimize_poses
from densify.io import outputs
from densify.io.images import ImageSource
from densify.io.layout import RunLayout
from densify.pairs.select import SEQUENTIAL, PairSelection, select_pairs
from densify.pairs.solve import PairResult
from densify.stages.depth import DepthStage, read_camera
from densify.stages.summary import summarize
from densify.stages.engine import StageEngines
from densify.stages.pairs import ImageInfo, load_depth, pair_stage, vlm_pose_stage
from densify.stages.settings import ReconstructConfig

log = logging.getLogger("densify.scene")

__all__ = ["SceneResult", "reconstruct", "depth_infos", "select_stage", "graph_stage", "fusion_stage", "export_stage"]


@dataclass
class SceneResult:
    """A reconstruction: poses of the images that connect, what was dropped, the pairs, the summary."""

    cam_to_world: dict[str, np.ndarray]
    """image id -> 4x4 camera-to-world (world = the reference camera's frame, metres, OpenCV axes)."""
    cameras: dict[str, object]
    reference: str | None
    dropped: list[dict]
    pairs: list[PairResult]
    summary: dict
    out: Path
    infos: list[ImageInfo] = field(default_factory=list)
    graph: PoseGraphResult | None = None

    @property
    def ok(self) -> bool:
        return len(self.cam_to_world) >= 2


def depth_infos(sources: list[ImageSource], cfg: ReconstructConfig, layout: RunLayout, engines: StageEngines, *,
                intrinsics=None, progress=None) -> tuple[list[ImageInfo], dict]:
    """The depth stage over the sequence; per image only a light record stays in memory."""
    dcfg = cfg.depth_config()
    profile = load_profile(dcfg.profile)
    engine, owned = engines.open("depth", profile)
    results = {}
    t0 = time.perf_counter()
    on_round = (lambda n: progress.update(images=0, queries=n)) if progress is not None else None
    try:
        stage = DepthStage(dcfg, engine, layout=layout.depth, on_round=on_round)  # queries counted per round
        for r in stage.run(sources, intrinsics=intrinsics):
            results[r.id] = r
            if progress is not None:
                progress.update(failed=int(r.status == "failed"))
    finally:
        if progress is not None:
            progress.close()
        if owned:
            engine.close()
    infos = []

    for k, src in enumerate(sources):
        r = results[src.id]
        info = ImageInfo(k, src.id, Path(src.path), r.status, r.camera, r.error, r.error_kind, src.manifest,
                         dcfg.max_side, src.extra.get("timestamp_s"))
        if r.status == "skipped":
            info.camera = read_camera(stage.layout.image(src.id))
        infos.append(info)
    summary = summarize(list(results.values()), time.perf_counter() - t0, profile, dcfg)
    summary["fingerprint"] = stage.fingerprint
    return infos, summary


def select_stage(infos: list[ImageInfo], cfg: ReconstructConfig) -> PairSelection:
    """The pairs to relate; a retrieval reads each usable image once (unusable ones match nothing)."""
    from densify.io.images import ImageError, load_rgb

    def pixels(k):
        if not infos[k].ok:
            return None
        try:
            return load_rgb(infos[k].path, max_side=cfg.pairs.retrieval.max_side)
        except (ImageError, OSError):
            return None

    sel = select_pairs(cfg.pairs, [i.path for i in infos], [i.id for i in infos], pixels)
    log.info("pairs: %d (%s; %d candidates to probe)", len(sel.pairs), sel.report["mode"], sel.report["candidates"])
    return sel


def graph_stage(infos: list[ImageInfo], results: list[PairResult], cfg: ReconstructConfig,
                log_scales: np.ndarray | None = None) -> PoseGraphResult:
    """The pose graph of the usable pairs; log_scales: each view's estimated depth log scale (a pair's
    metres come from its first image's depth map, so its translation is divided by that view's scale)."""
    nodes = [k.index for k in infos if k.ok]
    edges = []
    for r in results:
        if r.status == "failed" or not r.usable:
            continue
        w = float(max(r.pose.inliers, 1))
        T = r.pose.T
        if log_scales is not None:
            T = T.copy()
            T[:3, 3] *= np.exp(-log_scales[r.i])
        # Only a sequence's consecutive pairs are odometry; loops, skips and retrieved pairs may be pruned.
        odometry = r.kind == SEQUENTIAL and r.j - r.i == 1
        edges.append(PoseEdge(r.i, r.j, T, r.information, weight=w,
                              uncertain=cfg.posegraph.loop_edges_uncertain and not odometry))
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


def view_scales(infos: list[ImageInfo], results: list[PairResult], layout: RunLayout) -> tuple[np.ndarray | None, int]:
    """Each view's relative depth log scale from the pairs whose metric pose came from PnP (and how many pairs
    were used); matches and depth maps are read back one pair at a time."""
    from densify.geometry.scale import pair_log_scale, relative_log_scales
    from densify.pairs.matching import Matches

    rows = []
    for r in results:
        if not r.usable or r.pose.source != "pnp" or r.pose.t_metric is None:
            continue
        f = layout.pair(infos[r.i].id, infos[r.j].id).matches
        d1, d2 = load_depth(layout, infos[r.i]), load_depth(layout, infos[r.j])
        if not f.is_file() or d1 is None or d2 is None:
            continue
        xy1, xy2 = Matches.load(f).pairs()
        lr = pair_log_scale(xy1, xy2, d1, d2, infos[r.i].camera, r.pose.R, r.pose.t_metric)
        if lr is not None:
            rows.append((r.i, r.j, lr))
    return relative_log_scales(len(infos), rows), len(rows)


def fusion_stage(infos: list[ImageInfo], graph: PoseGraphResult, cfg: ReconstructConfig, layout: RunLayout,
                 log_scales: np.ndarray | None = None) -> tuple[dict, object, object]:
    """TSDF fusion of the posed views -> mesh.ply, cloud.ply; returns the report, the mesh and the cloud."""
    depth = layout.depth
    frames = []
    for k in sorted(graph.cam_to_world):
        f, info = depth.image(infos[k].id), infos[k]
        gain = np.float32(np.exp(-log_scales[k])) if log_scales is not None else np.float32(1.0)
        frames.append(FusionFrame(info.camera, graph.cam_to_world[k], lambda f=f, g=gain: np.load(f.depth_npy) * g,
                                  info.rgb,
                                  lambda f=f: np.load(f.confidence) if f.confidence.is_file() else None))
    mesh, cloud, n = tsdf_fuse(frames, cfg.fusion)
    report = {"frames": n, "mesh_vertices": len(mesh.vertices), "mesh_triangles": len(mesh.triangles),
              "cloud_points": len(cloud.points)}
    if log_scales is not None:
        report["view_log_scales"] = {infos[k].id: round(float(log_scales[k]), 4) for k in sorted(graph.cam_to_world)}
    if len(mesh.triangles):
        outputs.write_mesh(layout.mesh, mesh)
    else:
        report["mesh"] = "not written: fusion gave no surface (depth beyond fusion.depth_trunc, or no overlap)"
    if len(cloud.points):
        outputs.write_ply(layout.cloud, cloud)
    return report, mesh, cloud


def _export_colmap(infos: list[ImageInfo], results: list[PairResult], graph: PoseGraphResult,
                   cfg: ReconstructConfig, layout: RunLayout) -> dict:
    """Multi-view tracks -> colmap/ (text), read back with pycolmap, and colmap/bin/ (binary) from it."""
    posed = graph.cam_to_world

    def pair_matches():
        for r in results:
            if r.i not in posed or r.j not in posed or r.status == "failed":
                continue
            f = layout.pair(infos[r.i].id, infos[r.j].id).matches
            if not f.is_file():
                continue
            z = np.load(f)
            keep = z["inliers"] if "inliers" in z.files else z["valid"]
            yield r.i, r.j, z["xy1"][keep], z["xy2"][keep]

    tracks = build_tracks(pair_matches(), cfg.export.min_track_length)
    tracks = triangulate_tracks(tracks, {k: infos[k].camera for k in posed}, posed, cfg=cfg.export,
                                load_depth=lambda k: load_depth(layout, infos[k]), load_rgb=lambda k: infos[k].rgb())
    write_colmap_text(layout.colmap, [(k, infos[k].path.name, infos[k].camera, posed[k]) for k in sorted(posed)],
                      tracks)
    report: dict = {"tracks": tracks.stats}
    try:
        report["colmap"] = read_colmap_check(layout.colmap)
        if cfg.export.colmap_binary:
            write_colmap_binary(layout.colmap, layout.colmap / "bin")
            report["colmap"]["binary"] = str((layout.colmap / "bin").relative_to(layout.root))
    except ImportError:
        report["colmap"] = {"error": "pycolmap not installed: text model written but not read back, no binary "
                                     "model (pip install 'densify[colmap]')"}
    except Exception as exc:  # pycolmap raises its own error types; the check must not end the run
        report["colmap"] = {"error": f"pycolmap could not read the model back: {exc}"}
        log.error("COLMAP model check failed: %s", exc)
    return report


def export_stage(infos: list[ImageInfo], results: list[PairResult], graph: PoseGraphResult, cfg: ReconstructConfig,
                 layout: RunLayout, mesh=None, cloud=None) -> dict:
    posed = graph.cam_to_world
    report: dict = _export_colmap(infos, results, graph, cfg, layout) if cfg.export.colmap else {}
    if cfg.export.nerfstudio:
        frames = [(os.path.relpath(infos[k].path, layout.root), infos[k].camera, posed[k]) for k in sorted(posed)]
        paths = [layout.depth.image(infos[k].id).depth_png for k in sorted(posed)]
        write_nerfstudio(layout.transforms, frames,
                         depth_paths=[os.path.relpath(p, layout.root) if p.is_file() else None for p in paths])
        report["nerfstudio"] = {"frames": len(frames)}
    if cfg.export.glb:
        try:
            cams = [(infos[k].id, infos[k].camera, posed[k]) for k in sorted(posed)]
            write_glb(layout.glb, cams, mesh=mesh, cloud=cloud)
            report["glb"] = {"file": layout.glb.name, "cameras": len(cams),
                             "geometry": "mesh" if mesh is not None and len(mesh.triangles) else "cloud"}
        except ImportError:
            report["glb"] = {"error": "trimesh not installed: no scene.glb (pip install trimesh)"}
    return report


def write_poses(layout: RunLayout, infos: list[ImageInfo], graph: PoseGraphResult, dropped: list[dict]) -> None:
    ref = infos[graph.reference].id if graph.reference is not None else None

    def frame(k):
        f = {"id": infos[k].id, "image": str(infos[k].path), "cam_to_world": graph.cam_to_world[k],
             "intrinsics": infos[k].camera.to_dict()}
        if infos[k].timestamp_s is not None:
            f["timestamp_s"] = infos[k].timestamp_s
        return f

    outputs.write_json(layout.poses, {
        "convention": "cam_to_world: x_world = T @ x_camera; OpenCV camera axes (x right, y down, z forward); "
                      "world = the reference camera's frame; metres",
        "reference": ref,
        "frames": [frame(k) for k in sorted(graph.cam_to_world)],
        "dropped": dropped, "pruned_pairs": [[infos[i].id, infos[j].id] for i, j in graph.pruned_edges],
        "long_pairs_left_out": [[infos[i].id, infos[j].id] for i, j in graph.long_edges]})


def reconstruct(sources: list[ImageSource], cfg: ReconstructConfig, out: str | Path, *,
                engines: dict[str, Engine] | None = None, intrinsics=None, progress=None,
                video: dict | None = None) -> SceneResult:
    """Every stage in turn; the summary is also <out>/summary.json. `engines`: ready engines per stage
    ('depth', 'corr', 'pose'), used as given and not closed. `video`: the frames.json record when the
    sources are a video's frames (densify.io.video), kept in the summary."""
    layout = RunLayout(out)
    layout.check()
    if len(sources) < 2:
        from densify.config.loading import ConfigError

        raise ConfigError(f"reconstruct needs at least 2 images, got {len(sources)}")
    require_open3d()  # the pose graph and fusion need it: fail before any engine work, not after it
    check_stages(cfg, engines=engines)
    stage_engines = StageEngines(cfg.engine, cfg.models.model_dump(), engines)
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.sweep(layout.summary, layout.pairs_jsonl, layout.poses, layout.mesh, layout.cloud, layout.transforms,
                 *(layout.colmap / n for n in ("cameras.txt", "images.txt", "points3D.txt")))
    timings: dict[str, float] = {}
    try:
        return _reconstruct(sources, cfg, layout, stage_engines, timings, intrinsics, progress, video)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: say what finished (the stages' files are valid and resume)
        outputs.write_json(layout.summary, {"images": len(sources), "interrupted": True, "complete": False,
                                            "finished_stages": list(timings), "timings_s": timings,
                                            "engine": cfg.engine.name,
                                            "simulated": cfg.engine.simulated})
        raise


@contextmanager
def _timed(timings: dict, name: str):
    """timings[name] = seconds the block took, once it finished (an interrupted stage is not listed)."""
    t0 = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t0


def _pair_results(infos, sel: PairSelection, cfg: ReconstructConfig, layout: RunLayout, stage_engines,
                  depth_fp: str | None, timings: dict, progress) -> list[PairResult]:
    results = None
    with _timed(timings, "pairs"):
        if cfg.pose.source in ("matches", "both"):
            results = pair_stage(infos, sel.pairs, cfg, layout, stage_engines, progress=progress is not None,
                                 kinds=sel.kinds, depth_fp=depth_fp)
    if cfg.pose.source in ("vlm", "both"):
        with _timed(timings, "vlm_pose"):
            results = vlm_pose_stage(infos, sel.pairs, results, cfg, layout, stage_engines,
                                     progress=progress is not None)
            for r in results:
                r.kind = sel.kind(r.i, r.j)
    results = sorted(results, key=lambda r: (r.i, r.j))
    outputs.write_jsonl(layout.pairs_jsonl, (r.record() for r in results))
    return results


def _scene(infos, results, graph: PoseGraphResult, cfg: ReconstructConfig, layout: RunLayout,
           timings: dict, scales: tuple) -> tuple[dict, dict]:
    """Fusion and exports of the posed images (or why there is no scene)."""
    if len(graph.cam_to_world) < 2:
        why = (f"only {len(graph.cam_to_world)} image(s) connect through usable pairs: no scene to fuse or export "
               f"(see dropped and failed_pairs)")
        log.error("%s", why)
        return {"skipped": why}, {"skipped": why}
    with _timed(timings, "fusion"):
        fusion, mesh, cloud = fusion_stage(infos, graph, cfg, layout, scales[0])
        fusion["scale_check_pairs"] = scales[1]
    with _timed(timings, "export"):
        export = export_stage(infos, results, graph, cfg, layout, mesh, cloud)
    return fusion, export


def _pair_summary(infos, results: list[PairResult], graph: PoseGraphResult, sel: PairSelection) -> dict:
    asked = lambda r: r.matches.get("asked", 0) + r.matches.get("asked_backward", 0)  # noqa: E731
    failed = [r for r in results if r.status == "failed"]
    return {
        "pairs": len(results), "pairs_ok": len(results) - len(failed),
        "pair_selection": sel.report,
        "failed_pairs": [r.record() for r in failed],
        "pruned_pairs": [[infos[i].id, infos[j].id] for i, j in graph.pruned_edges],
        "long_pairs_left_out": [[infos[i].id, infos[j].id] for i, j in graph.long_edges],
        "verdicts": {v: sum(1 for r in results if r.pose is not None and r.pose.verdict == v)
                     for v in ("good", "weak", "failed")},
        "pair_queries": sum(asked(r) for r in results),
        "pair_queries_failed": sum(asked(r) for r in failed),
        "pair_queries_no_overlap": sum(asked(r) for r in failed if r.error_kind == "no_overlap"),
        "pairs_no_overlap": sum(r.error_kind == "no_overlap" for r in failed),
    }


def _reconstruct(sources, cfg: ReconstructConfig, layout: RunLayout, stage_engines: StageEngines, timings: dict,
                 intrinsics, progress, video) -> SceneResult:
    with _timed(timings, "depth"):
        infos, depth_summary = depth_infos(sources, cfg, layout, stage_engines, intrinsics=intrinsics,
                                           progress=progress)
    with _timed(timings, "select"):
        sel = select_stage(infos, cfg)
    results = _pair_results(infos, sel, cfg, layout, stage_engines,
                            depth_summary["fingerprint"] if cfg.pose.use_depth else None, timings, progress)
    with _timed(timings, "posegraph"):
        want = cfg.fusion.scale_check or cfg.posegraph.scale_pairs
        scales, scale_pairs = view_scales(infos, results, layout) if want else (None, 0)
        graph = graph_stage(infos, results, cfg, scales if cfg.posegraph.scale_pairs else None)
        dropped = dropped_images(infos, graph)
        for d in dropped:
            log.warning("dropped %s: %s", d["id"], d["reason"])
        write_poses(layout, infos, graph, dropped)
    fusion, export = _scene(infos, results, graph, cfg, layout, timings,
                            (scales, scale_pairs) if cfg.fusion.scale_check else (None, 0))
    summary = {
        "images": len(infos), "posed": len(graph.cam_to_world), "complete": len(graph.cam_to_world) >= 2,
        "reference": infos[graph.reference].id if graph.reference is not None else None,
        "dropped": dropped, **_pair_summary(infos, results, graph, sel),
        "depth": {k: depth_summary[k] for k in ("ok", "skipped", "failed", "queries", "answer_failures", "metrics")},
        "fusion": fusion, "export": export, "timings_s": timings, "wall_s": sum(timings.values()),
        "engine": cfg.engine.name, "simulated": cfg.engine.simulated,
    }
    if video is not None:
        summary["video"] = {k: video[k] for k in ("video", "native_fps", "decoded_frames", "sampling")}
        summary["video"]["frames"] = [{"id": f["id"], "timestamp_s": f["timestamp_s"]} for f in video["frames"]]
    outputs.write_json(layout.summary, summary)
    return SceneResult({infos[k].id: graph.cam_to_world[k] for k in graph.cam_to_world},
                       {i.id: i.camera for i in infos if i.camera is not None},
                       summary["reference"], dropped, results, summary, layout.root, infos, graph)


def camera_info(index: int, src: ImageSource, cfg: ReconstructConfig, intrinsics=None) -> ImageInfo:
    """An image's record without running depth on it (its camera at the size the depth stage decodes to)."""
    from densify.io.cameras import CameraError, decode
    from densify.io.images import ImageError

    info = ImageInfo(index, src.id, Path(src.path), "ok", manifest=src.manifest, max_side=cfg.depth.max_side)
    try:
        info.camera = decode(src.path, intrinsics if intrinsics is not None else src.intrinsics,
                             max_side=cfg.depth.max_side, default_hfov_deg=cfg.depth.default_hfov_deg).camera
    except (ImageError, CameraError, OSError) as exc:
        info.status, info.error = "failed", str(exc)
        info.error_kind = "intrinsics" if isinstance(exc, CameraError) else getattr(exc, "kind", "image")
    return info


def stage_profiles(cfg: ReconstructConfig, *, depth: bool) -> dict[str, str]:
    """The stages a run will use (stage -> profile): depth when asked, corr for matches, pose for the VLM."""
    stages = {"depth": cfg.depth.profile} if depth else {}
    if cfg.pose.source in ("matches", "both"):
        stages["corr"] = cfg.corr.profile
    if cfg.pose.source in ("vlm", "both"):
        stages["pose"] = cfg.pose.profile
    return stages


def check_stages(cfg: ReconstructConfig, *, pose: bool = False, engines: dict[str, Engine] | None = None) -> None:
    """Every stage's engine and checkpoint that a reconstruction (or, with `pose`, a relative pose) will use,
    checked before any starts (the commands call it before writing anything)."""
    depth = not pose or cfg.pose.use_depth and cfg.pose.source in ("matches", "both")
    StageEngines(cfg.engine, cfg.models.model_dump(), engines).check(stage_profiles(cfg, depth=depth))


def relative_pose(sources: list[ImageSource], cfg: ReconstructConfig, out: str | Path, *,
                  engines: dict[str, Engine] | None = None, intrinsics=None,
                  progress: bool = False) -> tuple[PairResult, list[ImageInfo]]:
    """The pose of image 2 relative to image 1 (depth of image 1 only when the metric scale is wanted).
    progress: a progress bar (or log lines) per stage: image 1's depth, the correspondences, the pose
    questions."""
    layout = RunLayout(out)
    layout.check()
    check_stages(cfg, pose=True, engines=engines)
    stage_engines = StageEngines(cfg.engine, cfg.models.model_dump(), engines)
    cfg = cfg.model_copy(update={"corr": cfg.corr.model_copy(update={"save_flow": True, "track_queries": False})})
    if cfg.pose.use_depth and cfg.pose.source in ("matches", "both"):
        from densify.io.progress import Progress

        bar = Progress(1, enabled=progress, label="depth of image 1")
        infos, dsum = depth_infos(sources[:1], cfg, layout, stage_engines, intrinsics=intrinsics, progress=bar)
        infos.append(camera_info(1, sources[1], cfg, intrinsics))
    else:
        infos, dsum = [camera_info(k, s, cfg, intrinsics) for k, s in enumerate(sources)], {}
    results = None
    if cfg.pose.source in ("matches", "both"):
        results = pair_stage(infos, [(0, 1)], cfg, layout, stage_engines, progress=progress, require_metric=False,
                             depth_fp=dsum.get("fingerprint"))
    if cfg.pose.source in ("vlm", "both"):
        results = vlm_pose_stage(infos, [(0, 1)], results, cfg, layout, stage_engines, require_metric=False,
                                 progress=progress)
    return results[0], infos
