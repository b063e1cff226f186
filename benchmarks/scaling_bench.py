"""Multi-GPU scaling of the Ray actor pool: queries/s over 1, 2, 4, 8 GPUs of one host.

    python -m benchmarks.scaling_bench --gpus 1,2 --images 16 --out benchmarks/results [--engine vllm]

Each point starts a RayPoolEngine with `--engines-per-gpu` actors per GPU (the pool's engines_per_gpu;
"auto" by default), on GPUs 0..N-1 (CUDA_VISIBLE_DEVICES), every actor running its own engine (vllm with
the 4B-shaped synthetic Qwen3-VL and dummy weights by default; answers forced to 12 tokens as in
engine_bench), streams `--images` 1000x750 images (the test photo shifted by a different number of pixels
each: distinct pixels, so no image's prefix is cached from another; the engine keys its cache on pixel
content, not on the image id) with its 64x48 VLM3-depth grid through the pool, and reports queries/s after a warm-up
image per actor. q/s counts answered queries only; a point with engine errors is marked invalid.
Efficiency = q/s(N) / (N x q/s(1)). `--engine simulated` runs the same loop on CPU actors
(it measures the pool's overhead, not GPU scaling). Results: JSON under --out, one file per run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from densify.cameras import Camera, prepare_image, resize_rgb  # noqa: E402
from densify.engines import create_engine, generate_stream  # noqa: E402
from densify.engines.base import GroundTruth, Sampling  # noqa: E402
from densify.images import load_rgb  # noqa: E402
from densify.profiles import load_profile  # noqa: E402
from densify.prompts import depth_batch, sampling_for  # noqa: E402
from densify.queries import grid_points, plan_queries  # noqa: E402

log = logging.getLogger("scaling_bench")
ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "tests" / "data" / "ibims1_factory_01.png"
GEN_TOKENS = 12


def bench_sampling(profile, engine: str) -> Sampling:
    """Forced 12-token answers for vLLM (min_tokens and ignore_eos are set on the engine, so max_tokens
    must be 12 too: the profile's own limit would make every answer that long); the profile's for others."""
    return Sampling(max_tokens=GEN_TOKENS) if engine == "vllm" else sampling_for(profile)


def make_batches(n: int, profile, grid=(64, 48), with_truth: bool = False, tag_prefix: str = "img",
                 sampling: Sampling | None = None, first: int = 0) -> list:
    """n batches of distinct images: image k (k = first, first + 1, ...) is the photo rolled by 17 (k + 1) pixels.
    (Until 2026-11-30 every image had the same pixels under another id; with content-keyed image caches
    the engine then answered from the prefix cache, see benchmarks/results/README-rows-issue13.md.)"""
    rgb0 = resize_rgb(load_rgb(IMAGE), (1000, 750)) if IMAGE.is_file() else \
        np.random.default_rng(0).integers(0, 255, (750, 1000, 3), dtype=np.uint8)
    cam = Camera(1000, 1000, 500, 375, 1000, 750)
    p = profile.preprocess
    out = []
    for i in range(n):
        k = first + i
        dy, dx = divmod(17 * (k + 1), rgb0.shape[1])  # a distinct shift for every k below 44,000
        rgb = np.ascontiguousarray(np.roll(rgb0, (dy, dx), axis=(0, 1)))
        prep = prepare_image(rgb, cam, focal=p.focal, max_side=p.max_side, coord_range=profile.coord_range)
        plan = plan_queries(grid_points(1000, 750, count=grid), prep.pixel_map)
        truth = GroundTruth(depth=np.full(prep.pixels.shape[:2], 3.0, np.float32)) if with_truth else None
        out.append(depth_batch(prep, plan, profile, uid=f"{tag_prefix}{k}", truth=truth,
                               sampling=sampling or sampling_for(profile), tag=i))
    return out


def measure(n_gpus: int, args, profile) -> dict:
    engine_options = {}
    per_gpu = 1 if args.engine == "simulated" else args.engines_per_gpu
    if args.engine == "vllm":
        from densify.synthetic.qwen3vl import build_model_folder

        model = args.model or build_model_folder(Path(tempfile.mkdtemp()) / "qwen3vl-4b", shape="4b")
        engine_options = {"model": str(model), "load_format": "dummy", "min_tokens": GEN_TOKENS,
                          "ignore_eos": True}
        if args.gpu_memory_utilization:  # else sized by the engine for its engines per GPU
            engine_options["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.engine != "simulated" and not args.ray_address:
        # this point's GPUs only: the local Ray this pool starts sees GPUs 0..n-1
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n_gpus))
    pool = create_engine("ray", profile=profile, engine=args.engine, engine_options=engine_options,
                         num_gpus_per_actor=1 if args.engine != "simulated" else 0,
                         num_actors=None if args.engine != "simulated" else n_gpus, engines_per_gpu=per_gpu,
                         max_in_flight_per_actor=args.in_flight, ray_address=args.ray_address)
    k = pool.engines_per_gpu
    try:
        s = bench_sampling(profile, args.engine)
        warm = list(generate_stream(pool, make_batches(n_gpus * k, profile, with_truth=args.engine == "simulated",
                                                       tag_prefix="warm", sampling=s, first=10_000)))
        batches = make_batches(args.images, profile, sampling=s, with_truth=args.engine == "simulated")
        t0 = time.perf_counter()
        n_q = 0
        errors = 0
        for batch, comps in generate_stream(pool, batches):
            n_q += len(comps)
            errors += sum(c.error is not None for c in comps)
        wall = time.perf_counter() - t0
    finally:
        pool.close()
    answered = n_q - errors
    row = {"gpus": n_gpus, "engines_per_gpu": k, "images": args.images, "queries": n_q, "answered": answered,
           "wall_s": wall, "qps": answered / wall, "engine_errors": errors, "valid": errors == 0 and answered > 0,
           "warmup_images": len(warm)}
    if not row["valid"]:
        row["invalid_reason"] = f"{errors} of {n_q} queries failed in the engine"
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", default="1,2", help="comma-separated GPU counts to measure")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--engine", default="vllm", help="vllm (GPU actors) or simulated (CPU actors)")
    ap.add_argument("--model", help="model folder (default: a synthetic 4B-shaped Qwen3-VL, dummy weights)")
    ap.add_argument("--in-flight", type=int, default=2, help="images in flight per actor")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="per engine (default: sized by the engine for its engines per GPU)")
    ap.add_argument("--engines-per-gpu", default="auto", type=lambda v: v if v == "auto" else int(v),
                    help="vLLM engines per GPU (Ray actors sharing it): auto or a number")
    ap.add_argument("--ray-address", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on shared hosts
    profile = load_profile("vlm3-depth")
    rows = []
    for n in [int(x) for x in args.gpus.split(",")]:
        row = measure(n, args, profile)
        rows.append(row)
        log.info("%d GPU(s): %.0f q/s", n, row["qps"])
    base = next((r["qps"] for r in rows if r["gpus"] == 1 and r["valid"]), None)
    for r in rows:
        r["efficiency"] = r["qps"] / (r["gpus"] * base) if base else None
    device = "cpu"
    try:
        import torch
        if torch.cuda.is_available():
            device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    result = {"benchmark": "densify scaling_bench (benchmarks/scaling_bench.py)", "device": device,
              "engine": args.engine, "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "python": platform.python_version(), "generated_tokens_forced": GEN_TOKENS if args.engine == "vllm" else None,
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"scaling_bench-{args.engine}-{dt.date.today():%Y%m%d}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'GPUs':>5} {'per GPU':>7} {'q/s':>9} {'efficiency':>10}")
    for r in rows:
        eff = f"{r['efficiency']:.2f}" if r["efficiency"] is not None else "-"
        bad = "" if r["valid"] else f"  INVALID: {r['invalid_reason']}"
        print(f"{r['gpus']:>5} {r['engines_per_gpu']:>7} {r['qps']:>9.0f} {eff:>10}{bad}")
    two = next((r for r in rows if r["gpus"] == 2 and r["valid"]), None)
    if two and base:
        print(f"target: 2 GPUs >= 1.9x one: {two['qps'] / base:.2f}x {'met' if two['qps'] / base >= 1.9 else 'NOT met'}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
