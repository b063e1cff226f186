"""Seconds per dense map through `densify depth` itself (the command, run as a subprocess) at its default
settings (plan.count auto, edge-aware densification, every output file), one image at a time and streamed,
and how busy the engines were meanwhile.

    python -m benchmarks.depth_bench --rate 652 --engines 2          # CPU: paced simulated engines (652 q/s in all)
    python -m benchmarks.depth_bench --rate 652 --engines 0 [--set cpu_threads=0]   # one engine in process
    python -m benchmarks.depth_bench --model DIR [--images 12]       # GPU: vLLM engines in a Ray pool (dummy weights)
    python -m benchmarks.depth_bench --model DIR --answer "Depth: 2.50 m"   # GPU: real weights, forced answers
    python -m benchmarks.depth_bench --table [RESULT ...]            # README's rows from committed results

CPU: the engines are simulated VLM3-depth engines in a Ray pool, paced to `--rate` answers/s in all
(`answers_per_s` = rate / engines each: they take the time a GPU engine of that rate would, and spend no CPU
waiting), answering from the ground truth of synthetic rooms (1000x750, densify.synthetic.scenes) under each
error preset of `--errors`, so the stopping rule of `plan.count: auto` sees each kind of error. Their busy
share is the share of wall time the engines have work booked (`summary.json` engine_busy).
GPU: vLLM engines with random weights in a Ray pool (`engines_per_gpu` auto), 1000x750 photos, answers held to
a VLM3-depth answer (`<think> </think><answer>d.dd</answer>`) by structured decoding (so forcing is off and
the plan sees the fixed answers of a random model); the GPU's busy share is NVML's, sampled every 50 ms.
GPU with `--answer TEXT`: the folder's real weights (`densify make-model DIR --shape 4b --answer TEXT`: the
transformer blocks add nothing, so every prompt's greedy answer is TEXT, at the model's full GEMM and attention
cost), VLM3-depth's prompt with TEXT declared as the answer format, forcing at its default and no structured
decoding: what a real checkpoint runs. Every map is then constant (the plan stops `precise`); rows give
`forcing` and the audit's agreement (`forcing_audit`).

One image at a time: one `densify depth IMG` per image (seconds per map = that run's wall time, engines
already up: summary.json wall_s; the command's own start-up, Ray and engines included, is reported apart).
Streamed: one `densify depth` over N images (seconds per map = wall_s / N; the first map's seconds from the
summary's `timeline`: what a user waits for, and where the engines' first requests show).
Rows count answered queries only; a row with failed images or engine errors is marked invalid.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
SIZE = (1000, 750)


def scene_images(folder: Path, n: int, seed: int) -> list[Path]:
    """n views of a synthetic room with their truth files (the simulated engine answers from them)."""
    from densify.synthetic.scenes import SceneSpec, make_scene

    scene = make_scene(SceneSpec(seed=seed, n_views=n, width=SIZE[0], height=SIZE[1], step_m=0.5, step_deg=15.0))
    return [Path(p) for p in scene.save(folder)]


def photo_images(folder: Path, first: int, n: int) -> list[Path]:
    """n distinct photos with intrinsics sidecars (GPU: nothing is cached from one image for another)."""
    import cv2

    from benchmarks.scaling_bench import shifted_photo

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(first, first + n):
        p = folder / f"img_{k:05d}.png"
        cv2.imwrite(str(p), np.ascontiguousarray(shifted_photo(k, SIZE)[..., ::-1]))
        (folder / f"img_{k:05d}.json").write_text(json.dumps({"fx": 1000.0, "fy": 1000.0, "cx": SIZE[0] / 2,
                                                               "cy": SIZE[1] / 2}))
        out.append(p)
    return out


def run_depth(images: list[Path], out: Path, config: Path, env: dict) -> dict:
    """`densify depth` over these images; its summary plus the command's own wall time."""
    cmd = [sys.executable, "-m", "pipelines", "depth", *map(str, images), "--out", str(out), "--config", str(config)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    try:
        s = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        raise RuntimeError(f"densify depth exited {proc.returncode} without a summary: {proc.stderr[-2000:]}")
    s["command_s"] = wall
    s["returncode"] = proc.returncode
    return s


def gpu_config(work: Path, model: str, answer: str | None = None) -> tuple[dict, str]:
    """The depth config of the GPU mode and what its engine is, in words. Without `answer`: dummy weights,
    answers held to a VLM3-depth answer by structured decoding (forcing off). With it: the folder's real
    weights, whose greedy answer is `answer` (refused unless the folder was built for it), and VLM3-depth with
    that answer declared, so forcing is on from the first batch and audited against free answers."""
    import importlib.util

    from benchmarks.pipeline_bench import declared_answer_profile, fixed_answer_profile

    vllm = {"model": model}
    if answer is None:
        vllm["load_format"] = "dummy"
        cfg = {"profile": str(fixed_answer_profile(work)), "structured": True}
        what = "vllm (Ray pool, engines_per_gpu auto), dummy weights, structured fixed answers"
    else:
        from densify.synthetic.models import fixed_answer_of

        built = fixed_answer_of(model)
        if built != answer:
            raise SystemExit(f"--model {model}: " + (f"built for the answer {built!r}, not {answer!r}" if built else
                                                     "not a fixed-answer folder") +
                             f"; build it with: densify make-model {model} --shape 4b --answer {answer!r} --overwrite")
        cfg = {"profile": str(declared_answer_profile(work, answer)), "structured": False}
        what = (f"vllm (Ray pool, engines_per_gpu auto), real weights answering {answer!r} (greedy), that text "
                f"declared as the answer format: forcing auto, audited; no structured decoding")
    cfg["engine"] = {"name": "ray", "options": {"engine": "vllm", "num_gpus_per_actor": 1, "ray_address": "local",
                                                "engine_options": vllm}}
    if importlib.util.find_spec("open3d") is None:
        cfg["outputs"] = {"ply": False}  # GPU hosts lack Open3D
    return cfg, what


def row(s: dict, images: int, gpu: dict | None = None) -> dict:
    answered = s["queries"] - sum(v for k, v in s["answer_failures"].items() if k == "engine_error")
    r = {"images": images, "ok": s["ok"], "failed": s["failed"], "queries": s["queries"], "answered": answered,
         "queries_per_image": s["plan"]["queries_per_image"], "stops": s["plan"]["stops"], "wall_s": s["wall_s"],
         "s_per_map": s["wall_s"] / max(images, 1), "command_s": round(s["command_s"], 2),
         "startup_s": round(s["command_s"] - s["wall_s"], 2), "engine_busy": s.get("engine_busy"),
         "timeline": s.get("timeline"), "forcing": (s.get("forcing") or {}).get("active"),
         "valid": s["failed"] == 0 and answered == s["queries"]}
    if s.get("forcing"):  # forced and audited queries, and how often the audit's free answer agreed
        f = s["forcing"]
        r["forcing_audit"] = {k: f.get(k) for k in ("forced_queries", "audited", "agreed", "agreement", "same_text",
                                                    "retried_unforced", "off_reason")}
    if gpu:
        r["gpu_busy_share"] = gpu
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GPU: model folder (the 4B-shaped synthetic Qwen3-VL); vLLM engines")
    ap.add_argument("--answer", metavar="TEXT",
                    help="GPU: --model was built with this fixed answer (make-model --answer): real weights, the "
                         "answer format declared, forcing at its default, no structured decoding")
    ap.add_argument("--rate", type=float, default=652.0, help="CPU: answers/s of all simulated engines together")
    ap.add_argument("--engines", type=int, default=2, help="CPU: simulated engine actors (0: one engine in the "
                                                           "command's process, as densify depth runs vllm)")
    ap.add_argument("--errors", default="iid,structured", help="CPU: error presets of the simulated engines")
    ap.add_argument("--images", type=int, default=8, help="images streamed")
    ap.add_argument("--one", type=int, default=3, help="images run one at a time")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more depth settings")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", help="result file name (default depth_bench-<cpu|gpu|gpu-forced>-<date>.json)")
    ap.add_argument("--table", nargs="*", metavar="RESULT", help="print README's seconds-per-map rows (markdown) "
                    "from these result files (none given: every committed depth_bench-*.json), and exit")
    args = ap.parse_args(argv)
    if args.table is not None:
        print(markdown_table([Path(p) for p in args.table]
                             or sorted((ROOT / "benchmarks" / "results").glob("depth_bench-*.json"))))
        return 0
    gpu = args.model is not None
    if args.answer is not None and not gpu:
        ap.error("--answer needs --model (the GPU mode)")
    work = Path(tempfile.mkdtemp(prefix="depth_bench_"))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = {"benchmark": "densify depth_bench (benchmarks/depth_bench.py)", "command": "python -m benchmarks."
              "depth_bench " + " ".join(sys.argv[1:] if argv is None else argv),
              "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "python": platform.python_version(), "host_cpus": os.cpu_count(), "image_size": list(SIZE),
              "load_average_at_start": list(os.getloadavg()),
              "settings": "configs/pipelines/depth.yaml defaults" + (f" + {args.set}" if args.set else ""),
              "presets": {}}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (args.name or f"depth_bench-{'gpu' if gpu else 'cpu'}{'-forced' if args.answer else ''}-"
                                          f"{dt.date.today():%Y%m%d}.json")
    try:
        if gpu:
            presets = ["declared-answer" if args.answer else "fixed-answer"]
        else:
            presets = [e.strip() for e in args.errors.split(",") if e.strip()]
        for i, preset in enumerate(presets):
            cfg: dict = {}
            if gpu:
                cfg, result["engine"] = gpu_config(work, args.model, args.answer)
                images = photo_images(work / "img", 0, args.images + args.one)
            elif args.engines == 0:  # one engine in the command's own process (densify depth's default layout)
                cfg = {"engine": {"name": "simulated", "options": {"answers_per_s": args.rate, "error": preset,
                                                                   "seed": 0}}}
                images = scene_images(work / f"scene_{preset}", args.images + args.one, seed=200 + i)
                result["engine"] = f"simulated VLM3-depth in process, paced to {args.rate:g} answers/s"
            else:
                cfg = {"engine": {"name": "ray", "options": {
                    "engine": "simulated", "num_actors": args.engines, "ray_address": "local",  # never another job's Ray
                    "engine_options": {"answers_per_s": args.rate / args.engines, "error": preset, "seed": 0}}}}
                images = scene_images(work / f"scene_{preset}", args.images + args.one, seed=200 + i)
                result["engine"] = (f"simulated VLM3-depth, {args.engines} Ray actors paced to {args.rate:g} answers/s "
                                    f"in all ({args.rate / args.engines:g} each)")
            for item in args.set:
                key, _, value = item.partition("=")
                node = cfg
                *parents, leaf = key.split(".")
                for p in parents:
                    node = node.setdefault(p, {})
                node[leaf] = yaml.safe_load(value)
            config = work / f"config_{preset}.yaml"
            config.write_text(yaml.safe_dump(cfg, sort_keys=False))
            rec = result["presets"][preset] = {"config": cfg, "one_at_a_time": [], "streamed": None}
            mem = _gpu_sampler() if gpu else None
            for k, img in enumerate(images[: args.one]):
                with mem or _null():
                    t0 = time.perf_counter()
                    s = run_depth([img], work / f"one_{preset}_{k}", config, env)
                    busy = mem.busy(t0 + s["command_s"] - s["wall_s"], t0 + s["command_s"]) if mem else None
                rec["one_at_a_time"].append(row(s, 1, busy))
                print(f"{preset}: one image {k}: {s['wall_s']:.2f} s, {s['queries']} queries{_forced(s)}", flush=True)
                path.write_text(json.dumps(result, indent=2) + "\n")  # a killed run keeps what it measured
            if args.images:
                with mem or _null():
                    t0 = time.perf_counter()
                    s = run_depth(images[args.one:], work / f"stream_{preset}", config, env)
                    busy = mem.busy(t0 + s["command_s"] - s["wall_s"], t0 + s["command_s"]) if mem else None
                rec["streamed"] = row(s, len(images) - args.one, busy)
                print(f"{preset}: streamed {len(images) - args.one} images{_forced(s)}", flush=True)
                rec["streamed_s_per_map"] = rec["streamed"]["s_per_map"]
            ones = rec["one_at_a_time"]
            if ones:
                rec["one_at_a_time_s_per_map"] = float(np.mean([o["s_per_map"] for o in ones]))
            rec["valid"] = all(o["valid"] for o in ones) and (rec["streamed"] or {}).get("valid", True)
            if args.answer:  # what this mode measures: every row forced to the end, the audit agreeing
                rows = ones + ([rec["streamed"]] if rec["streamed"] else [])
                rec["forced_throughout"] = all(r["forcing"] and r["forcing_audit"]["off_reason"] is None
                                               for r in rows)
            print(f"{preset}: {rec.get('one_at_a_time_s_per_map', float('nan')):.2f} s per map one at a time, "
                  f"{rec.get('streamed_s_per_map', float('nan')):.2f} s streamed; busy "
                  f"{(rec['streamed'] or {}).get('engine_busy') or (rec['streamed'] or {}).get('gpu_busy_share')}",
                  flush=True)
            path.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["load_average_at_end"] = list(os.getloadavg())
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


TABLE_COLUMNS = ("file", "engine", "errors", "queries per map", "s per map streamed", "first map streamed",
                 "busy streamed", "s per map one at a time", "busy one at a time", "forcing", "valid")


def table_rows(path: Path) -> list[dict]:
    """README's seconds-per-map cells from one result file, a dict per preset. Busy: the engines' booked share
    (CPU, paced engines) or NVML's GPU busy share (GPU)."""
    data = json.loads(Path(path).read_text())

    def busy(r):
        b = r.get("gpu_busy_share")
        if b is None:
            b = (r.get("engine_busy") or {}).get("share")
        return "-" if b is None else f"{b:.2f}"

    out = []
    for preset, rec in data.get("presets", {}).items():
        st, ones = rec.get("streamed") or {}, rec.get("one_at_a_time") or []
        q = [r["queries_per_image"]["mean"] for r in ones + ([st] if st else [])]
        out.append({
            "file": Path(path).name, "engine": data.get("engine", "-"), "errors": preset,
            "queries per map": f"{min(q):.0f}-{max(q):.0f}" if q and min(q) != max(q) else (f"{q[0]:.0f}" if q else "-"),
            "s per map streamed": f"{st['s_per_map']:.2f} ({st['images']} images)" if st else "-",
            "first map streamed": f"{t['first_map_s']:.1f} s" if (t := st.get("timeline")) else "-",
            "busy streamed": busy(st) if st else "-",
            "s per map one at a time": f"{rec['one_at_a_time_s_per_map']:.2f} ({len(ones)})" if ones else "-",
            "busy one at a time": ", ".join(busy(r) for r in ones) or "-",
            "forcing": "on" if any(r.get("forcing") for r in ones + ([st] if st else [])) else "off",
            "valid": "yes" if rec.get("valid") else "INVALID"})
    return out


def markdown_table(paths: list[Path]) -> str:
    from benchmarks.engine_bench import markdown

    return markdown([row for p in paths for row in table_rows(p)], TABLE_COLUMNS)


def _forced(s: dict) -> str:
    f = s.get("forcing")
    if not f:
        return "; forcing off"
    return (f"; forcing {'active' if f['active'] else 'OFF (' + str(f['off_reason']) + ')'}, "
            f"{f['forced_queries']} forced, audit {f['agreed']}/{f['audited']} agreed")


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _gpu_sampler():
    from benchmarks.engine_bench import GPUMemory

    return GPUMemory()


if __name__ == "__main__":
    sys.exit(main())
