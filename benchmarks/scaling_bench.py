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
import functools
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from densify.config.profiles import load_profile
from densify.engines import generate_stream
from densify.engines.base import Sampling
from densify.engines.ray_pool import RayPoolEngine
from densify.io.cameras import Camera, prepare_for, resize_rgb
from densify.io.images import load_rgb
from densify.queries.plan import grid_points, plan_queries
from densify.queries.prompts import depth_batch, image_ref, sampling_for

log = logging.getLogger("scaling_bench")
ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "tests" / "data" / "ibims1_factory_01.png"
GEN_TOKENS = 12
H200_BF16_TFLOPS = 796.0  # bf16 matmul 8192^3 measured on an H200, 2026-11-30 (engine_bench): the ceiling's rate


class GPUBusy:
    """Mean NVML utilisation (share of time a kernel ran) of GPUs 0..n-1, and their total memory."""

    def __init__(self, n: int):
        self.samples: list[float] = []
        self.total_gib = None
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._h = pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
            self.total_gib = pynvml.nvmlDeviceGetMemoryInfo(self._h[0]).total / 2**30
        except Exception:  # noqa: BLE001 - no NVIDIA GPU: no busy share
            self._nvml = None

    def __enter__(self):
        def loop():
            while not self._stop.wait(0.1):
                self.samples.append(float(np.mean([self._nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._h])))
        if self._nvml:
            self._th = threading.Thread(target=loop, daemon=True)
            self._th.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    @property
    def share(self) -> float | None:
        return round(float(np.mean(self.samples)) / 100, 3) if self.samples else None


def bench_sampling(profile, engine: str) -> Sampling:
    """Forced 12-token answers for vLLM (min_tokens and ignore_eos are set on the engine, so max_tokens
    must be 12 too: the profile's own limit would make every answer that long); the profile's for others."""
    return Sampling(max_tokens=GEN_TOKENS) if engine == "vllm" else sampling_for(profile)


def shift_of(k: int, width: int = 1000) -> tuple[int, int]:
    """Image k's (dy, dx) roll of the test photo: distinct for every k below 44,000, so no image's prefix
    is cached from another (the engine keys its caches on pixel content, not on image ids)."""
    return divmod(17 * (k + 1), width)


@functools.lru_cache(maxsize=2)
def _photo(size: tuple[int, int]) -> np.ndarray:
    return resize_rgb(load_rgb(IMAGE), size) if IMAGE.is_file() else \
        np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)


def shifted_photo(k: int, size=(1000, 750)) -> np.ndarray:
    """The test photo at `size`, rolled by `shift_of(k)` (random pixels if the photo is missing)."""
    return np.ascontiguousarray(np.roll(_photo(tuple(size)), shift_of(k, size[0]), axis=(0, 1)))


def make_batches(n: int, profile, grid=(64, 48), tag_prefix: str = "img",
                 sampling: Sampling | None = None, first: int = 0) -> list:
    """n batches of distinct images: image k (k = first, first + 1, ...) is the photo rolled by 17 (k + 1) pixels.
    (Until 2026-11-30 every image had the same pixels under another id; with content-keyed image caches
    the engine then answered from the prefix cache, see benchmarks/results/README-rows-issue13.md.)"""
    cam = Camera(1000, 1000, 500, 375, 1000, 750)
    out = []
    for i in range(n):
        k = first + i
        rgb = shifted_photo(k)
        prep = prepare_for(rgb, cam, profile)
        plan = plan_queries(grid_points(1000, 750, count=grid), prep.pixel_map, marker=profile.marker)
        uid = f"{tag_prefix}{k}"
        out.append(depth_batch(prep, plan, profile, uid=uid, ref=image_ref(uid, prep),
                               sampling=sampling or sampling_for(profile), tag=i))
    return out


def measure(n_gpus: int, args, profile) -> dict:
    engine_options = {}
    per_gpu = 1 if args.engine == "simulated" else args.engines_per_gpu
    if args.engine == "vllm":
        from densify.synthetic.models import build_model_folder

        model = args.model or build_model_folder(Path(tempfile.mkdtemp()) / "qwen3vl-4b", shape="4b")
        engine_options = {"model": str(model), "load_format": "dummy", "min_tokens": GEN_TOKENS,
                          "ignore_eos": True}
        if args.gpu_memory_utilization:  # else sized by the engine for its engines per GPU
            engine_options["gpu_memory_utilization"] = args.gpu_memory_utilization
        engine_options.update(json.loads(args.engine_options or "{}"))
    else:  # the simulated engine answers only where truth exists: a flat wall
        from densify.sim.truth import ConstantTruth

        engine_options = {"truth": ConstantTruth(3.0)}
    if args.engine != "simulated" and not args.ray_address:
        # this point's GPUs only: the local Ray this pool starts sees GPUs 0..n-1
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n_gpus))
    t_start = time.perf_counter()
    pool = RayPoolEngine(profile, engine=args.engine, engine_options=engine_options,
                         num_gpus_per_actor=1 if args.engine != "simulated" else 0,
                         num_actors=None if args.engine != "simulated" else n_gpus, engines_per_gpu=per_gpu,
                         max_in_flight_per_actor=args.in_flight, ray_address=args.ray_address)
    k = pool.engines_per_gpu
    start_s = time.perf_counter() - t_start
    try:
        s = bench_sampling(profile, args.engine)
        warm = list(generate_stream(pool, make_batches(n_gpus * k, profile, tag_prefix="warm", sampling=s,
                                                       first=10_000)))
        batches = make_batches(args.images, profile, sampling=s)
        comps_all = []
        with GPUBusy(n_gpus if args.engine != "simulated" else 0) as busy:
            t0 = time.perf_counter()
            for batch, comps in generate_stream(pool, batches):
                comps_all.extend(comps)
            wall = time.perf_counter() - t0
        plan = pool.memory_plan
    finally:
        pool.close()
    from benchmarks.engine_bench import summarize  # the same row fields as engine_bench

    # the ceiling of all the point's GPUs together
    summary = summarize(f"{n_gpus} GPU(s)", comps_all, wall, n_gpus * args.matmul_tflops * 1e12, engines_per_gpu=k)
    n_q, answered = len(comps_all), summary["answered"]
    errors = n_q - answered
    util = plan["gpu_memory_utilization"] if plan else engine_options.get("gpu_memory_utilization", 0.9)
    row = {"gpus": n_gpus, "engines_per_gpu": k, "images": args.images, "queries": n_q, "answered": answered,
           "wall_s": wall, "qps": answered / wall, "engine_errors": errors, "valid": summary["valid"],
           "warmup_images": len(warm), "answer_tokens": GEN_TOKENS if args.engine == "vllm" else None,
           "gpu_busy_share": busy.share, "share_of_ceiling": summary["share_of_ceiling"],
           "memory_per_engine_gib": round(util * busy.total_gib, 1) if busy.total_gib else None,
           "memory_plan": plan, "engine_start_s": round(start_s, 1)}
    row.update({key: summary[key] for key in ("prompt_tokens_per_query", "cached_tokens_per_query",
                                             "generated_tokens_per_query", "ceiling_queries_per_s")})
    if not row["valid"]:
        row["invalid_reason"] = summary.get("invalid_reason")
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
    ap.add_argument("--engine-options", metavar="JSON", help='more vllm engine options, e.g. '
                    '\'{"cascade_attention": true, "queries_in_flight": 0}\'')
    ap.add_argument("--name", help="result file name (default scaling_bench-<engine>-<date>.json)")
    ap.add_argument("--ray-address", default=None)
    ap.add_argument("--matmul-tflops", type=float, default=H200_BF16_TFLOPS,
                    help="bf16 matmul rate per GPU for the ceiling (default: measured on an H200)")
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
              "bf16_matmul_tflops_per_gpu": args.matmul_tflops,
              "engine_options": json.loads(args.engine_options or "{}"), "in_flight_per_actor": args.in_flight,
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (args.name or f"scaling_bench-{args.engine}-{dt.date.today():%Y%m%d}.json")
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
