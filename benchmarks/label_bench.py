"""Framework overhead of `densify label`: synthetic images through the whole job, simulated engine on CPU actors.

    python -m benchmarks.label_bench [--images 1000] [--count 3072] [--actors N] [--no-ray] [--out DIR]

Writes N small textured images (320x240 by default) with a ground-truth depth .npy beside each and a JSONL
manifest with intrinsics, runs the label job over them (answer store on, outputs on) and reports images/s,
simulated queries/s and where the time goes. It then reruns the job with every result.json removed, so
every answer comes from the store, and times the simulated engine alone on the same batches. Results go
to benchmarks/results/label_bench_<date>.json.

The simulated engine burns CPU too (on the same cores as the framework), so queries/s through the job is
a lower bound on what the framework sustains. The CPU time of the driver and of the actors is measured as
well: `framework_us_per_query` is the job's CPU time per answer minus the simulated engine's own (timed
alone), i.e. what the framework adds to each answer of a real (GPU) engine, and `projected_queries_per_s_2_cores`
the rate two otherwise idle cores would sustain (the machine may be shared: see `machine.load_avg`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def make_dataset(folder: Path, n: int, width: int = 320, height: int = 240, seed: int = 0) -> Path:
    """n textured images with a smooth depth map (a tilted plane plus a box) and a JSONL manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    fx = 0.5 * width / np.tan(np.radians(60) / 2)
    lines = []
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(n):
        small = (rng.random((height // 8, width // 8, 3)) * 255).astype(np.uint8)
        img = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
        img = cv2.add(img, (rng.random((height, width, 3)) * 40).astype(np.uint8))
        a, b, c = rng.uniform(1.5, 4.0), rng.uniform(-1, 1), rng.uniform(-1, 1)
        depth = a + b * (xx / width - 0.5) + c * (yy / height - 0.5)
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        depth[y0:y0 + height // 3, x0:x0 + width // 3] *= 0.6
        cv2.imwrite(str(folder / f"img_{i:05d}.png"), img[..., ::-1])
        np.save(folder / f"img_{i:05d}.depth.npy", depth.astype(np.float32))
        lines.append(json.dumps({"image": f"img_{i:05d}.png", "intrinsics": [fx, fx, width / 2, height / 2]}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def engine_alone(manifest: Path, cfg, n: int) -> dict:
    """The simulated engine's own speed, in this process, on the first n images' batches."""
    from densify.engines.simulated import SimulatedEngine
    from densify.stages.depth import DepthStage
    from densify.stages.label import iter_manifest

    eng = SimulatedEngine(cfg.profile, **cfg.engine.options)
    stage = DepthStage(cfg, eng)
    t_prep = t_gen = 0.0
    q = 0
    for k, src in enumerate(iter_manifest(str(manifest))):
        if k >= n:
            break
        t0 = time.perf_counter()
        _, batch = stage.prepare(src)
        t1 = time.perf_counter()
        eng.generate(batch)
        t_gen += time.perf_counter() - t1
        t_prep += t1 - t0
        q += len(batch.queries)
    return {"images": n, "queries": q, "engine_s": t_gen, "engine_queries_per_s": q / t_gen,
            "prepare_s_per_image": t_prep / n}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--count", type=int, default=3072, help="queries per image")
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--actors", type=int, default=None, help="Ray actors (default: one per CPU)")
    ap.add_argument("--in-flight", type=int, default=2, help="batches in flight per actor")
    ap.add_argument("--no-ray", action="store_true", help="engine in the driver process")
    ap.add_argument("--cpu-workers", type=int, default=0, help="prepare and densify in this many Ray CPU tasks "
                                                               "(ray.cpu_workers; 0: in the driver)")
    ap.add_argument("--densify", default=None, help="densify.method (default: the label config's, linear)")
    ap.add_argument("--out", help="work folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--tag", default="", help="suffix for the results file name")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("densify.cameras").setLevel(logging.ERROR)

    from densify.config import dict_overrides
    from densify.settings import LabelConfig, load_config
    from densify.stages.label import LabelJob

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="label_bench_"))
    try:
        t0 = time.perf_counter()
        manifest = make_dataset(work / "data", args.images, args.width, args.height)
        t_data = time.perf_counter() - t0
        cfg = load_config(LabelConfig, None, dict_overrides({
            "engine": {"name": "simulated"}, "plan": {"count": args.count},
            "ray": {"enabled": not args.no_ray, "num_actors": args.actors, "max_in_flight_per_actor": args.in_flight,
                    "cpu_workers": args.cpu_workers},
            **({"densify": {"method": args.densify}} if args.densify else {}),
            "manifest_every_s": 30.0,
        }), default_name="label")
        out = work / "out"
        load = os.getloadavg()
        full = LabelJob(cfg, out).run(str(manifest))
        load_after = os.getloadavg()
        # Rerun with every image redone from the store: the framework without any engine work.
        for d in out.iterdir():
            if d.is_dir():
                (d / "result.json").unlink(missing_ok=True)
        cfg_store = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"enabled": False, "cpu_workers": 0})})
        resumed = LabelJob(cfg_store, out).run(str(manifest))
        alone = engine_alone(manifest, cfg, min(20, args.images))
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)

    run_s = full["wall_s"] - full["startup_s"]
    q = full["queries"]
    driver_cpu = full["time_s"]["driver_cpu"]
    actor_cpu = full["pool"].get("actor_cpu_s", 0.0)
    total_us = 1e6 * (driver_cpu + actor_cpu) / max(q, 1)
    engine_us = 1e6 / alone["engine_queries_per_s"]
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_avg": {"before": load, "after": load_after}},
        "setup": {"images": args.images, "size": [args.width, args.height], "queries_per_image": args.count,
                  "ray": not args.no_ray, "actors": full["pool"] and args.actors, "in_flight_per_actor": args.in_flight,
                  "cpu_workers": args.cpu_workers, "densify": cfg.densify.method,
                  "outputs": cfg.outputs.model_dump(), "store": cfg.store.model_dump(), "dataset_s": t_data},
        "full_job": {
            "images_per_s": full["images_per_s"], "queries_per_s": full["queries_per_s"],
            "wall_s": full["wall_s"], "startup_s": full["startup_s"], "run_s": run_s, "queries": q,
            "ok": full["ok"], "failed": full["failed"],
            "time_s": full["time_s"],
            "pool": full["pool"],
            "driver_cpu_us_per_query": 1e6 * driver_cpu / max(q, 1),
            "actor_cpu_us_per_query": 1e6 * actor_cpu / max(q, 1),
            "total_cpu_us_per_query": total_us,
        },
        "resume_from_store": {
            "images_per_s": resumed["images_per_s"], "queries_per_s": resumed["queries_per_s"],
            "store_hits": resumed["store_hits"], "engine_queries": resumed["engine_queries"],
            "time_s": resumed["time_s"],
        },
        "engine_alone": alone,
    }
    # The framework's cost per answer, as a real engine would see it: the job's CPU per query (prepare,
    # store, Ray, densify, outputs) less the simulated engine's own, against a 500 q/s engine's 2,000 us.
    fw = total_us - engine_us if actor_cpu else report["full_job"]["driver_cpu_us_per_query"] - engine_us
    report["engine_us_per_query"] = engine_us
    report["framework_us_per_query"] = fw
    report["overhead_vs_500qps_engine"] = fw / 2000.0
    report["framework_only_queries_per_s_per_core"] = 1e6 / fw
    report["projected_queries_per_s_2_cores"] = 2e6 / total_us if actor_cpu else None
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"label_bench_{datetime.date.today().isoformat()}{('_' + args.tag) if args.tag else ''}.json"
    (RESULTS / name).write_text(json.dumps(report, indent=2) + "\n")
    keys = ("full_job", "engine_us_per_query", "framework_us_per_query", "overhead_vs_500qps_engine",
            "framework_only_queries_per_s_per_core", "projected_queries_per_s_2_cores")
    print(json.dumps({k: report[k] for k in keys}, indent=2))
    print(f"results: {RESULTS / name}")
    return report


if __name__ == "__main__":
    main()
