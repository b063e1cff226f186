"""The whole job on GPUs against the engine alone: `densify label` end to end vs the same Ray pool fed
ready-made batches, and seconds per dense map at the default depth settings.

    python -m benchmarks.pipeline_bench --model DIR [--engines-per-gpu 2] [--images 12] [--cpu-workers 4]
                                        [--engine-options JSON] [--out DIR]

One Ray pool of vllm engines over every visible GPU (K per GPU) serves, in order, on distinct images (no
image's prefix is cached from an earlier step):
  engine-only  N images' grid batches (3,072 queries each), prepared beforehand, streamed through the pool:
               the engine-only rate.
  label        `LabelJob` (what `densify label` runs) over N other images from a JSONL manifest with the
               same grid: decode, prepare, store, engine, densify, outputs (16-bit PNG depth, confidence,
               result.json), with `ray.cpu_workers` CPU tasks. Ratio = label q/s / engine-only q/s.
  dense maps   the depth stage at its default settings (adaptive plan, 3,072-query budget, 4 rounds; what
               `densify depth` runs) writing its outputs: 3 images one at a time, then N streamed.
               Seconds per dense map per GPU = wall x GPUs / images.
`--simulated-rate Q` runs the same steps on CPU actors instead: simulated engines paced to Q answers/s in
all (`answers_per_s`; a depth map of the scene written beside each image is their truth), so the CPU side
(planner rounds, densification, outputs) is measured against an engine of a GPU's measured rate.
The model has random weights, so every answer is constrained to a fixed-length VLM3-depth answer
(`<think> </think><answer>d.dd</answer>`, ~12 tokens) by structured decoding, in every step alike (the
profile is vlm3-depth with that regex; answers parse, so every stage runs). Structured decoding costs
engine throughput of its own; the comparison is like for like. q/s counts answered queries only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks.scaling_bench import shift_of, shifted_photo
from densify.config.loading import dict_overrides
from densify.config.profiles import load_profile, profiles_dir
from densify.engines.base import generate_stream
from densify.io.images import ImageSource
from densify.io.layout import RunLayout
from densify.stages.depth import DepthStage
from densify.stages.engine import build_engine
from densify.stages.label import LabelJob
from densify.stages.settings import DepthConfig, LabelConfig, load_config

log = logging.getLogger("pipeline_bench")
ROOT = Path(__file__).resolve().parents[1]
FIXED_ANSWER = r"<think> </think><answer>[1-9]\.[0-9]{2}</answer>"


def write_images(folder: Path, first: int, n: int, size=(1000, 750), truth: bool = False) -> Path:
    """n distinct photos (the test photo rolled by a different shift each) and their JSONL manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for k in range(first, first + n):
        rgb = shifted_photo(k, size)
        name = f"img_{k:05d}.png"
        cv2.imwrite(str(folder / name), np.ascontiguousarray(rgb[..., ::-1]))
        if truth:  # the simulated engine's answers: a tilted floor-to-wall ramp with a nearer box
            yy, xx = np.mgrid[0:size[1], 0:size[0]].astype(np.float32)
            depth = 2.0 + 3.0 * (1 - yy / size[1]) + 0.5 * xx / size[0]
            depth[size[1] // 3: 2 * size[1] // 3, size[0] // 4: size[0] // 2] *= 0.6
            np.save(folder / f"img_{k:05d}.depth.npy", np.roll(depth, shift_of(k, size[0]), axis=(0, 1)))
        lines.append(json.dumps({"image": name, "intrinsics": [1000.0, 1000.0, size[0] / 2, size[1] / 2]}))
    manifest = folder / f"manifest_{first}.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def sources(manifest: Path) -> list[ImageSource]:
    from densify.stages.label import iter_manifest

    return list(iter_manifest(str(manifest)))


def _vlm3_depth_variant(folder: Path, name: str, question: dict, drop: tuple = ()) -> Path:
    """VLM3-depth's profile with its prompt unchanged and these keys of its default question set (and `drop`
    removed), written to folder/NAME.yaml."""
    import yaml

    data = yaml.safe_load((profiles_dir() / "vlm3-depth.yaml").read_text())
    data["name"] = name
    q = data["questions"][data["default_question"]]
    q.update(question)
    for key in drop:
        q.pop(key, None)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def fixed_answer_profile(folder: Path) -> Path:
    return _vlm3_depth_variant(folder, "vlm3-depth-fixed-answer", {"structured_regex": FIXED_ANSWER})


def declared_answer_profile(folder: Path, answer: str, fmt: str | None = None) -> Path:
    """VLM3-depth with its prompt unchanged and its answer text DECLARED as `answer` with the number as the
    field (`fmt` another declared format), parsed by a regex made from `answer`: for a model folder built with
    that fixed answer (densify.synthetic.models, answer=...), so forcing is on from the first batch and the audit
    compares forced with free answers. No structured decoding (it turns forcing off)."""
    import re

    from densify.config.answer_format import NUMBER

    number = NUMBER.search(answer)
    if number is None:
        raise ValueError(f"fixed answer {answer!r} has no number to parse")
    pieces = answer.split(number.group())
    return _vlm3_depth_variant(folder, "vlm3-depth-declared-answer", {
        "regex": r"([-+]?\d*\.?\d+)".join(re.escape(p) for p in pieces),
        "answer_format": fmt or "{d}".join(p.replace("{", "{{").replace("}", "}}") for p in pieces)},
        drop=("structured_regex", "learn_answer_format"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder (e.g. the 4B-shaped synthetic Qwen3-VL); needed unless "
                                    "--simulated-rate")
    ap.add_argument("--simulated-rate", type=float, help="CPU actors with simulated engines paced to this many "
                                                         "answers/s in all, instead of vllm")
    ap.add_argument("--actors", type=int, default=2, help="--simulated-rate: engine actors")
    ap.add_argument("--images", type=int, default=12, help="images per measurement")
    ap.add_argument("--engines-per-gpu", default="auto", type=lambda v: v if v == "auto" else int(v))
    ap.add_argument("--cpu-workers", type=int, default=4, help="ray.cpu_workers of the label job")
    ap.add_argument("--in-flight", type=int, default=3, help="batches in flight per actor")
    ap.add_argument("--images-in-flight", default="0",
                    help="dense maps: images_in_flight of the depth stage, a comma list measured one after "
                         "another on the same pool (0: the depth config's; the stage keeps at least the pool's "
                         "capacity in flight)")
    ap.add_argument("--split-min-queries", type=int, default=128,
                    help="ray.split_min_queries: split a batch between idle engines (0: never)")
    ap.add_argument("--engine-options", metavar="JSON", help="more vllm engine options")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: engine,label,maps")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", help="result file name (default pipeline_bench-<date>.json)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if not args.model and not args.simulated_rate:
        ap.error("give --model (vllm) or --simulated-rate (simulated engines on CPU)")
    sim = bool(args.simulated_rate)
    work = Path(tempfile.mkdtemp(prefix="pipeline_bench_"))
    n = args.images
    profile_path = fixed_answer_profile(work)
    extra = json.loads(args.engine_options or "{}")
    base = {"profile": str(profile_path), "model": args.model, "structured": True,
            "engine": {"name": "vllm", "options": {"load_format": "dummy", **extra}},
            "ray": {"enabled": True, "num_gpus_per_actor": 1, "engines_per_gpu": args.engines_per_gpu,
                    "max_in_flight_per_actor": args.in_flight, "cpu_workers": args.cpu_workers,
                    "split_min_queries": args.split_min_queries}}
    grid = {"plan": {"mode": "grid", "count": 3072}}
    label_cfg = load_config(LabelConfig, None, dict_overrides({**base, **grid}), default_name="label")
    depth_over = {k: v for k, v in base.items() if k != "ray"}
    if importlib.util.find_spec("open3d") is None:  # GPU hosts lack it; the maps then go without cloud.ply
        depth_over["outputs"] = {"ply": False}
    depth_cfg = load_config(DepthConfig, None, dict_overrides(depth_over), default_name="depth")
    widths = [int(v) or depth_cfg.images_in_flight for v in args.images_in_flight.split(",")]
    try:
        import torch

        gpus = torch.cuda.device_count()
        device = f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else "cpu"
    except ImportError:
        gpus, device = 0, "cpu"
    result = {"benchmark": "densify pipeline_bench (benchmarks/pipeline_bench.py)", "device": device, "gpus": gpus,
              "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "python": platform.python_version(), "images_per_step": n, "image_size": [1000, 750],
              "answer_regex": FIXED_ANSWER, "engine_options": base["engine"]["options"],
              "ray": label_cfg.ray.model_dump(), "steps": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (args.name or f"pipeline_bench-{dt.date.today():%Y%m%d}.json")

    def save():
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")

    result["engine"] = (f"simulated, paced to {args.simulated_rate:g} answers/s over {args.actors} CPU actors"
                        if sim else "vllm")
    if sim:
        result["engine_options"] = {"answers_per_s": args.simulated_rate / args.actors}
    t0 = time.perf_counter()
    if sim:
        from densify.engines.ray_pool import RayPoolEngine

        pool = RayPoolEngine(load_profile(label_cfg.profile), engine="simulated", num_actors=args.actors,
                             engine_options={"answers_per_s": args.simulated_rate / args.actors},
                             max_in_flight_per_actor=args.in_flight, split_min_queries=args.split_min_queries)
    else:
        pool = build_engine(label_cfg.engine, load_profile(label_cfg.profile), model=args.model,
                            ray=label_cfg.ray)
    result["pool"] = {"actors": pool.num_actors, "engines_per_gpu": pool.engines_per_gpu,
                      "memory_plan": pool.memory_plan, "start_s": round(time.perf_counter() - t0, 1)}
    log.info("pool of %d engines ready in %.0f s", pool.num_actors, result["pool"]["start_s"])
    try:
        stage = DepthStage(label_cfg, pool)
        warm = [stage.prepare(s)[1] for s in sources(write_images(work / "img", 90_000, pool.num_actors, truth=sim))]
        list(generate_stream(pool, warm))

        if "engine" not in skip:  # the engine alone, on batches prepared beforehand
            batches = [stage.prepare(s)[1] for s in sources(write_images(work / "img", 0, n, truth=sim))]
            answered = total = 0
            t = time.perf_counter()
            for _, comps in generate_stream(pool, batches):
                total += len(comps)
                answered += sum(c.error is None for c in comps)
            wall = time.perf_counter() - t
            result["steps"]["engine_only"] = {"images": n, "queries": total, "answered": answered, "wall_s": wall,
                                              "queries_per_s": answered / wall, "images_per_s": n / wall,
                                              "valid": answered == total}
            log.info("engine only: %.0f q/s", answered / wall)
            save()

        if "label" not in skip:  # the label job end to end on other images
            manifest = write_images(work / "img", 1000, n, truth=sim)
            s = LabelJob(label_cfg, work / "label", engine=pool).run(str(manifest))
            run_s = s["wall_s"] - s["startup_s"]
            row = {"images": s["images"], "ok": s["ok"], "failed": s["failed"], "queries": s["queries"],
                   "wall_s": s["wall_s"], "run_s": run_s, "queries_per_s": s["queries_per_s"],
                   "images_per_s": s["images_per_s"], "failed_by_kind": s["failed_by_kind"], "time_s": s["time_s"],
                   "valid": s["failed"] == 0}
            eng = result["steps"].get("engine_only")
            if eng:
                row["ratio_to_engine_only"] = s["queries_per_s"] / eng["queries_per_s"]
                row["within_10_percent"] = row["ratio_to_engine_only"] >= 0.9
            result["steps"]["label"] = row
            log.info("label: %.0f q/s, %.2f images/s", s["queries_per_s"], s["images_per_s"])
            save()

        if "maps" not in skip:  # the depth stage at its defaults (adaptive plan), with outputs
            depth_stage = DepthStage(depth_cfg, pool, layout=RunLayout(work / "depth"))
            one = []
            for src in sources(write_images(work / "img", 2000, 3, truth=sim)):
                t, c = time.perf_counter(), time.process_time()
                res = list(depth_stage.run([src]))
                one.append({"s": time.perf_counter() - t, "driver_cpu_s": time.process_time() - c,
                            "status": res[0].status, "queries": res[0].queries})
            n_gpus = 1 if sim else max(1, gpus)  # simulated: the paced rate stands for one GPU's
            maps = result["steps"]["dense_maps"] = {
                "plan": depth_cfg.plan.model_dump(), "densify": depth_cfg.densify.method,
                "outputs": depth_cfg.outputs.model_dump(), "one_at_a_time": one,
                "one_at_a_time_s_per_map": float(np.mean([o["s"] for o in one])), "streamed": []}
            for i, width in enumerate(widths):  # each width on its own images
                cfg = depth_cfg.model_copy(update={"images_in_flight": width})
                stage = DepthStage(cfg, pool, layout=RunLayout(work / f"depth{i}"))
                srcs = sources(write_images(work / "img", 3000 + 1000 * i, n, truth=sim))
                t, c = time.perf_counter(), time.process_time()
                res = list(stage.run(srcs))
                wall, cpu = time.perf_counter() - t, time.process_time() - c
                maps["streamed"].append({
                    "images_in_flight": max(width, pool.capacity), "images": len(res),
                    "ok": sum(r.status == "ok" for r in res), "wall_s": wall, "driver_cpu_s": cpu,
                    "queries": int(sum(r.queries for r in res)), "s_per_map": wall / len(res),
                    "s_per_map_per_gpu": wall * n_gpus / len(res)})
                log.info("dense maps: %.2f s one at a time, %.2f s per map per GPU streamed (%d images in flight)",
                         maps["one_at_a_time_s_per_map"], wall * n_gpus / len(res), max(width, pool.capacity))
            maps["valid"] = (all(o["status"] == "ok" for o in one)
                             and all(s["ok"] == s["images"] for s in maps["streamed"]))
            save()
    finally:
        result["pool"]["stats"] = dict(pool.stats)
        pool.close()
        save()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result["steps"], indent=2, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
