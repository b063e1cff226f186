"""Engine throughput on one GPU for the VLM3-depth workload (queries/s, tokens, cache hits, memory).

    python -m benchmarks.engine_bench --out benchmarks/results [--phases base,hf,cascade,fp8] [--model DIR]

What runs (each phase its own engine; phases append to one JSON file, written after every phase):
  base     vLLM, prefix caching on, max_num_seqs 1024, max_num_batched_tokens 32768, CUDA graphs up to
           1024 requests (the engine's defaults):
           (a) one 1000x750 image, its 64x48 grid (3072 queries) in one submission, and N images streamed
           (the next image submitted while the last answers of the current one decode: the steady state
           the depth pipeline runs in); seconds per image, 3 images one at a time vs streamed; (b) the same
           engine with prefix-cache reads off; structured-output decoding vs plain.
  depthlm  (c) DepthLM as released: the depthlm profile (the release's marker pixel by pixel, focal 750,
           Pixtral chat) on the Pixtral-12B shape (densify.synthetic.models "pixtral-12b", dummy weights;
           --depthlm-model DIR to give one): every query its own marked image, nothing shared; 256 queries
           of one 1000x750 image at 12 and at 30 generated tokens (the training answer is about 30).
  cascade  base with cascade attention allowed (vLLM's default is off): (a), streamed.
  fp8      base with online fp8 weights (quantization="fp8"; changes numerics): (a), streamed.
  rayK     the production path: a Ray pool of K vLLM actors on the one GPU (`engines_per_gpu=K`: 1/K GPU
           each, memory, step and CUDA-graph sizes from `vllm_memory.engine_memory_plan`), N images
           streamed through it at 12 generated tokens, then N more at 30 (--long-tokens; 0: skip).
           `rayK+NAME` adds the engine options of `--custom NAME=JSON` (e.g. ray2+fp8).
  cpu      per-request CPU cuts, each alone on one engine, N images streamed: baseline, detokenize=False,
           mm_uuids=False (vLLM hashes every request's image), baseline again, 30 tokens.
  xxhash   base with prefix_caching_hash_algo="xxhash" (needs the xxhash package), N images streamed.
  hf       (d) transformers the way the VLM3 release notebook runs it (one query per generate call) and
           batched (64 per call); random bf16 weights built on the GPU (the 4B folder has none).
  --custom NAME=JSON  any engine options over base's: (a), streamed. VARIANTS names options worth trying on
           the GPU (rayK+NAME without --custom): chunk64k (larger prefill chunks), graphsfull (CUDA graphs for
           mixed prefill/decode steps too), async / noasync (vLLM's async scheduling: on by default in vLLM
           0.26, so `async` is the base), byimage (each engine's running batch mostly one image: the next
           image only once fewer than 512 queries are unfinished).
  rayK@T   the production path at a forced answer length: every prompt ends with the assistant-turn head a
           forced answer has (FORCED_HEAD, VLM3-depth's learned one) and T tokens are generated (the number
           and the stop token; densify.queries.forcing), N images streamed.
  profK    rayK (12 tokens) under vLLM's torch profiler (CUDA activities, `profiler_config`), the first
           --profile-steps engine steps of each engine: kernel time by class (GEMM, attention per prefill /
           decode / mixed step, KV-cache writes, sampling, copies, other) and idle gaps
           (benchmarks.kernel_profile) in the row's "kernel_profile", and per answered query with the rate
           the same kernels allow on a GPU never idle ("per_query"; `python -m benchmarks.kernel_profile
           --per-query RESULT` for committed results); `profK+NAME` with a variant. The profiled run's q/s
           carries the profiler's cost (compare the rayK row).
`--table [RESULT ...]` prints README's engine rows from committed results (no GPU needed).
Every row counts answered queries only in queries_per_s; a row with engine errors has "valid": false and
"invalid_reason". Rows record engines_per_gpu, memory_per_engine_gib (vLLM's share) and the most GPU
memory one engine process held (NVML, per process), generated tokens, gpu_busy_share, share_of_ceiling.
Rows also say where the time went: CPU share of this process (frontend) and of its children (the vLLM
engine core), NVML GPU busy share, seconds spent adding requests and blocked in engine steps; --pyspy DIR
adds a py-spy profile of both processes during (a).

Model: the 4B-shaped synthetic Qwen3-VL (densify.synthetic.models, load_format="dummy"; the depthlm phase:
the Pixtral-12B shape, ceiling at 12.2e9 parameters, the text model's). Random weights
write garbage, so for speed comparisons every answer is forced to exactly 12 generated tokens
(max_tokens = min_tokens = 12, ignore_eos) - the VLM3-depth answer `<think> </think><answer>3.42</answer>`
is about that long; hf stops at max_new_tokens=12 (random weights rarely emit EOS). The template is the
profile's, unchanged. Ceiling per query: 2 x 4.4e9 x (uncached prompt + generated tokens) FLOP against the
bf16 matmul rate measured on the card (torch, 8192^3).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from densify.config.profiles import load_profile
from densify.engines.base import EngineBatch, Sampling
from densify.io.cameras import Camera, prepare_for, resize_rgb
from densify.io.images import load_rgb
from densify.queries.plan import grid_points, plan_queries
from densify.queries.prompts import depth_batch, image_ref, image_uid, render_text

log = logging.getLogger("engine_bench")
ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "tests" / "data" / "ibims1_factory_01.png"
PARAMS = 4.4e9
PIXTRAL_PARAMS = 12.2e9  # Mistral-Nemo-12B, the text model of Pixtral-12B (the 0.4B vision encoder not counted)
GEN_TOKENS = 12
LONG_TOKENS = 30   # DepthLM's training answer (<think> ... </think>\n\n<answer> d </answer>) is about this long
GRID = (64, 48)
TARGETS = {"bf16": 900.0, "fp8": 1500.0}  # answered q/s per H200 through the Ray pool at 12 tokens (issue 13)
FORCED_TARGETS = {"bf16": 900.0, "fp8": 1300.0}  # ... at the forced answer length (issue 23)
FORCED_HEAD = "<think> </think><answer>"  # what densify learns from VLM3-depth-style answers and forces
VARIANTS = {  # engine options worth trying on the GPU (issue 23), over BASE_OPTS
    "chunk64k": {"max_num_batched_tokens": 65536},
    "graphsfull": {"llm_kwargs": {"compilation_config": {"cudagraph_mode": "FULL"}}},
    "async": {"llm_kwargs": {"async_scheduling": True}},
    "noasync": {"llm_kwargs": {"async_scheduling": False}},
    "byimage": {"queries_in_flight": 512},
    "fp8": {"quantization": "fp8"},
}


# ---------------------------------------------------------------------------------------------- helpers
class GPUMemory:
    """Peak used memory of GPU 0 (all processes) and its busy share, sampled by NVML every 50 ms."""

    def __init__(self):
        self.peak = 0
        self.per_process: dict[int, int] = {}  # pid -> most GPU memory it held (bytes)
        self.util: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._th = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._h = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception:
            self._nvml = None

    def used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._h).used) if self._nvml else 0

    def __enter__(self):
        self.peak = self.used()
        self._stop.clear()

        def loop():
            while not self._stop.wait(0.05):
                self.peak = max(self.peak, self.used())
                self._processes()
                if self._nvml:
                    self.util.append((time.perf_counter(), int(self._nvml.nvmlDeviceGetUtilizationRates(self._h).gpu)))
        self._th = threading.Thread(target=loop, daemon=True)
        self._th.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._th.join()
        self.peak = max(self.peak, self.used())

    def _processes(self) -> None:
        if not self._nvml:
            return
        try:
            for pr in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._h):
                if pr.usedGpuMemory:
                    self.per_process[pr.pid] = max(self.per_process.get(pr.pid, 0), int(pr.usedGpuMemory))
        except Exception:  # noqa: BLE001 - not every driver reports per-process memory
            pass

    @property
    def process_peak_gib(self) -> float | None:
        """The most GPU memory any one process held (an engine core, with several engines per GPU)."""
        return round(max(self.per_process.values()) / 2**30, 2) if self.per_process else None

    @property
    def total_gib(self) -> float | None:
        return round(self._nvml.nvmlDeviceGetMemoryInfo(self._h).total / 2**30, 2) if self._nvml else None

    @property
    def peak_gib(self) -> float:
        return round(self.peak / 2**30, 2)

    def busy(self, t0: float, t1: float) -> float | None:
        """Mean NVML utilisation (share of time a kernel ran) between two perf_counter times."""
        v = [u for t, u in self.util if t0 <= t <= t1]
        return round(float(np.mean(v)) / 100, 3) if v else None


def matmul_rate(n: int = 8192, reps: int = 10) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n ** 3 / float(np.median(times))


def photo(k: int, size=(1000, 750)) -> tuple[np.ndarray, Camera]:
    """The test photo resized to `size` with fx = 1000 (so VLM3-depth keeps it at that size); image k is
    shifted by k * 17 pixels so every measurement sees a new image (no prefix-cache carry-over)."""
    rgb = resize_rgb(load_rgb(IMAGE), size)
    if k:
        rgb = np.ascontiguousarray(np.roll(rgb, 17 * k, axis=1))
    w, h = size
    return rgb, Camera(1000.0, 1000.0, w / 2, h / 2, w, h)


def image_batch(profile, k: int, n: int | None = None, sampling: Sampling | None = None, tag=None,
                tokens: int = GEN_TOKENS, prefill: str | None = None) -> EngineBatch:
    rgb, cam = photo(k)
    prep = prepare_for(rgb, cam, profile)
    pts = grid_points(cam.width, cam.height, count=GRID)
    if n is not None and n < len(pts):
        pts = pts[np.linspace(0, len(pts) - 1, n).round().astype(int)]
    plan = plan_queries(pts, prep.pixel_map, marker=profile.marker)
    s = sampling or Sampling(max_tokens=tokens, prefill=prefill)
    sid = f"bench-{profile.name}-{k}"
    return depth_batch(prep, plan, profile, uid=image_uid(prep, sid), ref=image_ref(sid, prep), sampling=s,
                       tag=tag if tag is not None else k)


def summarize(name: str, completions: list, wall: float, rate: float, *, engines_per_gpu: int = 1,
              params: float = PARAMS, **extra) -> dict:
    """One row. queries_per_s counts answered queries only; a row with engine errors is invalid."""
    failed = [c for c in completions if c.error is not None]
    errs = len(failed)
    completions = [c for c in completions if c.error is None]
    n = len(completions)
    pt = np.array([c.n_prompt_tokens or 0 for c in completions], float)
    gt = np.array([c.n_generated_tokens or 0 for c in completions], float)
    ct = np.array([c.cached_prompt_tokens or 0 for c in completions], float)
    uncached = pt - ct
    flop = 2 * params * (uncached + gt)
    ceiling = rate / flop.mean() if n and flop.mean() > 0 else None
    qps = n / wall if wall > 0 and n else None
    row = {"variant": name, "valid": errs == 0 and n > 0, "queries": n + errs, "answered": n, "errors": errs,
           "wall_s": round(wall, 3), "queries_per_s": round(qps, 2) if qps else None,
           "engines_per_gpu": engines_per_gpu,
           "prompt_tokens_per_query": round(float(pt.mean()), 1) if n else None,
           "generated_tokens_per_query": round(float(gt.mean()), 2) if n else None,
           "cached_tokens_per_query": round(float(ct.mean()), 1) if n else None,
           "uncached_prompt_tokens_per_query": round(float(uncached.mean()), 1) if n else None,
           "prefix_cache_hit_rate": round(float(ct.sum() / pt.sum()), 4) if pt.sum() else None,
           "flop_per_query": float(flop.mean()) if n else None,
           "ceiling_queries_per_s": round(ceiling, 1) if ceiling else None,
           "share_of_ceiling": round(qps / ceiling, 3) if qps and ceiling else None}
    if errs:
        kinds = sorted({(c.error or "")[:160] for c in failed})
        row["invalid_reason"] = f"{errs} of {n + errs} queries failed in the engine: " + " | ".join(kinds[:3])
    elif not n:
        row["invalid_reason"] = "no queries answered"
    row.update(extra)
    log.info("%-34s %6d answered in %7.2f s = %8.1f q/s  prompt %.0f (cached %.0f) gen %.1f  ceiling %s%s", name, n,
             wall, qps or 0, row["prompt_tokens_per_query"] or 0, row["cached_tokens_per_query"] or 0,
             row["generated_tokens_per_query"] or 0, row["ceiling_queries_per_s"],
             f"  INVALID: {row['invalid_reason']}" if not row["valid"] else "")
    return row


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _children_cpu() -> float:
    try:
        import psutil

        tot = 0.0
        for c in psutil.Process().children(recursive=True):
            try:
                t = c.cpu_times()
                tot += t.user + t.system
            except psutil.Error:
                pass
        return tot
    except ImportError:
        return float("nan")


class Probe:
    """Where the time of one measurement goes: wall, CPU of this (frontend) process and of its children (the
    vLLM engine core: scheduler, model runner, kernel launches), GPU busy share, and time spent adding
    requests (submit) and blocked in engine steps. Optionally a py-spy profile of both processes."""

    def __init__(self, eng=None, mem: GPUMemory | None = None, pyspy: str | None = None, seconds: float = 10.0):
        self.mem, self.pyspy, self.seconds = mem, pyspy, seconds
        # the vllm engine's own counters (VLLMEngine.stats: submit_s, step_s, steps), read before and after
        self.eng = eng if eng is not None and getattr(eng, "llm", None) is not None else None

    def run(self, fn):
        import subprocess

        before = dict(self.eng.stats) if self.eng is not None else {}
        spy = None
        if self.pyspy:
            import os

            spy = subprocess.Popen(["py-spy", "record", "--pid", str(os.getpid()), "--subprocesses", "--rate", "200",
                                    "--duration", str(int(self.seconds)), "--format", "raw", "--nonblocking",
                                    "--threads", "-o", self.pyspy], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.STDOUT)
            time.sleep(1.0)  # py-spy attaches
        c0, k0, t0 = time.process_time(), _children_cpu(), time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        wall = t1 - t0
        extra = {"frontend_cpu_share": round((time.process_time() - c0) / wall, 3),
                 "engine_core_cpu_share": round((_children_cpu() - k0) / wall, 3)}
        if self.mem is not None:
            extra["gpu_busy_share"] = self.mem.busy(t0, t1)
        if self.eng is not None:
            spent = {k: self.eng.stats.get(k, 0) - before.get(k, 0) for k in ("submit_s", "step_s", "steps")}
            extra.update(submit_s=round(spent["submit_s"], 3), blocked_in_step_s=round(spent["step_s"], 3),
                         steps=int(spent["steps"]))
        if spy is not None:
            try:
                spy.wait(timeout=self.seconds + 30)
            except subprocess.TimeoutExpired:
                spy.kill()
            extra["pyspy"] = self.pyspy
        return out, wall, extra


def pyspy_top(path: str, n: int = 25) -> dict:
    """Where the samples of a py-spy raw (collapsed-stack) profile fall: per process, the functions with
    the most samples on top of the stack (self) and anywhere in it (inclusive), as shares."""
    import collections

    procs: dict[str, dict] = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        proc = "?"
        if frames and frames[0].startswith("process "):
            proc = frames[0][:80]
            frames = frames[1:]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        d = procs.setdefault(proc, {"samples": 0, "self": collections.Counter(), "incl": collections.Counter()})
        c = int(count)
        d["samples"] += c
        d["self"][frames[-1]] += c
        for f in set(frames):
            d["incl"][f] += c
    out = {}
    for proc, d in sorted(procs.items(), key=lambda kv: -kv[1]["samples"])[:4]:
        tot = d["samples"]
        out[proc] = {"samples": tot,
                     "self": [(f, round(c / tot, 3)) for f, c in d["self"].most_common(n)],
                     "inclusive": [(f, round(c / tot, 3)) for f, c in d["incl"].most_common(n)]}
    return out


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("vllm", "torch", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            out[mod] = f"unavailable ({type(exc).__name__})"
    try:
        import torch

        out["cuda"] = torch.version.cuda
        out["device"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return out


# ---------------------------------------------------------------------------------------------- phases
BASE_OPTS = dict(load_format="dummy", gpu_memory_utilization=0.90, max_model_len=8192, max_num_seqs=1024,
                 max_num_batched_tokens=32768, enable_prefix_caching=True, min_tokens=GEN_TOKENS, ignore_eos=True)


def vllm_phase(name: str, model: str, opts: dict, rate: float, what: set[str], state: dict,
               pyspy_dir: str | None = None, stream_images: int = 4) -> list[dict]:
    from densify.engines import create_engine

    prof = load_profile("vlm3-depth")
    rows: list[dict] = []
    mem = GPUMemory()
    t0 = time.perf_counter()
    with mem:
        eng = create_engine("vllm", profile=prof, model=model, **opts)
        start_s = time.perf_counter() - t0
        log.info("[%s] engine ready in %.1f s", name, start_s)
        k = state.setdefault("next_image", 100)

        def new_image():
            nonlocal k
            k += 1
            state["next_image"] = k
            return k
        try:
            eng.generate(image_batch(prof, new_image(), 512))  # warm-up (graphs, encoder, caches)
            if "a" in what:
                b = image_batch(prof, new_image())
                spy = str(Path(pyspy_dir) / f"pyspy-{name}.txt") if pyspy_dir else None
                outs, wall, extra = Probe(eng, mem, spy, seconds=12).run(lambda: eng.generate(b))
                rows.append(summarize(f"{name}: (a) prefix cache, 1 image", outs, wall, rate, engine_start_s=start_s,
                                      **extra))
            if "stream" in what:  # steady state: the pipeline's default (next image submitted while one decodes)
                bs = [image_batch(prof, new_image()) for _ in range(stream_images)]
                res, wall, extra = Probe(eng, mem).run(lambda: list(eng.stream(bs)))
                outs = [c for _, cs in res for c in cs]
                rows.append(summarize(f"{name}: (a) {stream_images} images streamed", outs, wall, rate,
                                      seconds_per_image=round(wall / stream_images, 3), **extra))
            if "cpu" in what:  # per-request CPU cuts, each alone on this engine, then 30-token answers
                def streamed(label, tokens=GEN_TOKENS, **extra_row):
                    bs = [image_batch(prof, new_image(), tokens=tokens) for _ in range(stream_images)]
                    res, wall, extra = Probe(eng, mem).run(lambda: list(eng.stream(bs)))
                    outs = [c for _, cs in res for c in cs]
                    rows.append(summarize(f"{name}: {label}, {stream_images} images streamed", outs, wall, rate,
                                          seconds_per_image=round(wall / stream_images, 3), **extra_row, **extra))
                for label, attr, value in (("baseline", None, None), ("detokenize=False", "detokenize", False),
                                           ("mm_uuids=False", "mm_uuids", False), ("baseline again", None, None)):
                    old = getattr(eng, attr) if attr else None
                    if attr:
                        setattr(eng, attr, value)
                    try:
                        streamed(label, cpu_cut=label)
                    finally:
                        if attr:
                            setattr(eng, attr, old)
                eng.min_tokens = LONG_TOKENS
                streamed(f"{LONG_TOKENS} tokens", tokens=LONG_TOKENS, cpu_cut="baseline")
                eng.min_tokens = GEN_TOKENS
            if "images" in what:
                for label, qif in (("one at a time", 0), ("streamed", eng.queries_in_flight)):
                    eng.queries_in_flight = qif
                    bs = [image_batch(prof, new_image()) for _ in range(3)]
                    res, wall = timed(lambda: list(eng.stream(bs)))
                    outs = [c for _, cs in res for c in cs]
                    rows.append(summarize(f"{name}: 3 images {label}", outs, wall, rate,
                                          seconds_per_image=round(wall / 3, 3), queries_in_flight=qif))
                eng.queries_in_flight = 2 * eng.max_num_seqs
            if "b" in what:
                eng.read_prefix_cache = False
                b = image_batch(prof, new_image(), 1024)
                outs, wall = timed(lambda: eng.generate(b))
                rows.append(summarize(f"{name}: (b) no prefix-cache reads", outs, wall, rate))
                eng.read_prefix_cache = True
            if "structured" in what:
                for label, regex in (("plain", None), ("structured", prof.question.structured_regex)):
                    b = image_batch(prof, new_image(), 1024, Sampling(max_tokens=GEN_TOKENS, structured_regex=regex))
                    outs, wall = timed(lambda: eng.generate(b))
                    rows.append(summarize(f"{name}: {label} decoding", outs, wall, rate,
                                          sample_answer=outs[0].text[:60]))
        finally:
            fast = int(eng.stats.get("fast_prompt_batches", 0))
            eng.close()
    for r in rows:
        r["peak_gpu_memory_gib"] = mem.peak_gib
        r["engine_process_peak_gib"] = mem.process_peak_gib
        r["memory_per_engine_gib"] = round(opts.get("gpu_memory_utilization", 0.9) * (mem.total_gib or 0), 1) or None
        r["engine_options"] = {k: v for k, v in opts.items()}
        r["fast_prompt_batches_in_phase"] = fast
    return rows


def depthlm_phase(model: str, rate: float, state: dict, n_queries: int = 256, long_tokens: int = LONG_TOKENS,
                  opts: dict | None = None) -> list[dict]:
    """(c) DepthLM as released on the Pixtral-12B shape: the depthlm profile's exact marker (every query its
    own marked image: no image prefix to share), its chat (no system message), at 12 and 30 tokens."""
    from densify.engines import create_engine

    dlm = load_profile("depthlm")
    opts = dict(BASE_OPTS if opts is None else opts)
    rows: list[dict] = []
    mem = GPUMemory()
    t0 = time.perf_counter()
    with mem:
        eng = create_engine("vllm", profile=dlm, model=model, **opts)
        start_s = time.perf_counter() - t0
        log.info("[depthlm] engine ready in %.1f s", start_s)
        k = state.setdefault("next_image", 100)
        try:
            eng.generate(image_batch(dlm, k + 1, 32))  # warm-up
            for j, tokens in enumerate((GEN_TOKENS, long_tokens)):
                if not tokens:
                    continue
                eng.min_tokens = tokens
                b = image_batch(dlm, k + 2 + j, n_queries, Sampling(max_tokens=tokens, system_prompt=dlm.system_prompt))
                outs, wall = timed(lambda: eng.generate(b))
                rows.append(summarize(f"depthlm: (c) exact marker, Pixtral-12B, {tokens} tokens", outs, wall, rate,
                                      params=PIXTRAL_PARAMS, engine_start_s=start_s, profile=dlm.name,
                                      model_shape="pixtral-12b", answer_tokens=tokens,
                                      images_sent=len(b.images), marker=dlm.marker.model_dump(),
                                      image_size=list(next(iter(b.images.values())).pixels.shape[1::-1])))
            state["next_image"] = k + 4
        finally:
            eng.close()
    for r in rows:
        r["peak_gpu_memory_gib"] = mem.peak_gib
        r["engine_process_peak_gib"] = mem.process_peak_gib
        r["memory_per_engine_gib"] = round(opts.get("gpu_memory_utilization", 0.9) * (mem.total_gib or 0), 1) or None
        r["engine_options"] = dict(opts)
    return rows


def ray_phase(name: str, model: str, opts: dict, rate: float, per_gpu: int, state: dict, n_images: int,
              engine: str = "vllm", long_tokens: int = LONG_TOKENS, pyspy_dir: str | None = None,
              answer_tokens: int = GEN_TOKENS, prefill: str | None = None,
              profile_steps: int | None = None) -> list[dict]:
    """K vLLM engines on the one GPU as Ray actors (several engine-core processes feed one GPU: one core's
    per-request CPU work overlaps another's GPU steps). Memory per engine from `engines_per_gpu`.
    answer_tokens / prefill: the first run's answer length and assistant-turn head (rayK@T: forced answers);
    profile_steps: that run under vLLM's torch profiler, the kernel breakdown in its row (profK)."""
    from densify.engines.ray_pool import RayPoolEngine
    from densify.engines.vllm_memory import engine_memory_plan

    prof = load_profile("vlm3-depth")
    k0 = state.setdefault("next_image", 100)
    # min_tokens covers the longer answers; each batch's max_tokens sets its length
    opts = dict(opts, model=model, min_tokens=max(answer_tokens, long_tokens or 0))
    opts.pop("gpu_memory_utilization", None)
    if opts.get("max_num_batched_tokens") == BASE_OPTS["max_num_batched_tokens"]:  # a variant's own value stays
        opts.pop("max_num_batched_tokens", None)
    mem = GPUMemory()
    plan = engine_memory_plan(per_gpu, mem.total_gib or 140.0) if per_gpu > 1 else None
    extra_llm = dict(opts.get("llm_kwargs") or {})
    if "compilation_config" in extra_llm and plan:  # a variant's graph mode keeps the plan's capture sizes
        extra_llm["compilation_config"] = {**plan["compilation_config"], **extra_llm["compilation_config"]}
    trace_dir = None
    if profile_steps:
        trace_dir = tempfile.mkdtemp(prefix="densify-prof-")
        extra_llm["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": trace_dir,
                                        "torch_profiler_with_stack": False, "torch_profiler_record_shapes": False,
                                        "torch_profiler_dump_cuda_time_total": False,
                                        "max_iterations": int(profile_steps)}
        long_tokens = 0
    if extra_llm:
        opts["llm_kwargs"] = extra_llm
    rows: list[dict] = []
    t0 = time.perf_counter()
    with mem:
        pool = RayPoolEngine(prof, engine=engine, engine_options=opts, num_actors=per_gpu, num_gpus_per_actor=1,
                             engines_per_gpu=per_gpu, max_in_flight_per_actor=3)
        start_s = time.perf_counter() - t0
        plan = pool.memory_plan or plan  # what the actors applied (sized on their GPU)
        log.info("[%s] %d actor(s) ready in %.1f s", name, per_gpu, start_s)
        n = max(n_images, 2 * per_gpu)
        try:
            list(pool.stream([image_batch(prof, k0 + 1 + i, 512) for i in range(2 * per_gpu)]))  # warm-up
            for tokens in [answer_tokens] + ([long_tokens] if long_tokens else []):
                k = state["next_image"] = state.get("next_image", k0) + n + 10
                head = prefill if tokens == answer_tokens else None
                bs = [image_batch(prof, k + i, tokens=tokens, prefill=head) for i in range(n)]
                if trace_dir:
                    import ray

                    profiling = ray.get([a.profile.remote(True, f"engine{i}") for i, a in enumerate(pool.actors)])
                s0 = dict(pool.stats)
                spy = None
                if pyspy_dir and tokens == GEN_TOKENS:  # one actor and its engine core, during the 12-token run
                    import subprocess

                    import ray

                    pid = ray.get(pool.actors[0].info.remote())["pid"]
                    spy_path = str(Path(pyspy_dir) / f"pyspy-{name.replace('+', '_')}.txt")
                    spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--subprocesses", "--rate", "100",
                                            "--duration", "12", "--format", "raw", "--nonblocking", "-o", spy_path],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                    time.sleep(1.0)
                res, wall, extra = Probe(None, mem).run(lambda: list(pool.stream(bs)))
                if trace_dir:
                    extra["kernel_profile"] = _kernel_profile(pool, profiling, trace_dir, profile_steps)
                if head:
                    extra["forced_head"] = head
                if spy is not None:
                    try:
                        spy.wait(timeout=40)
                        extra["pyspy"] = spy_path
                        extra["pyspy_top"] = pyspy_top(spy_path)
                    except Exception as exc:  # noqa: BLE001 - a profile is a bonus
                        spy.kill()
                        extra["pyspy"] = f"failed: {type(exc).__name__}: {exc}"
                outs = [c for _, cs in res for c in cs]
                extra["children_cpu_share"] = extra.pop("engine_core_cpu_share")
                extra["pool"] = {key: (round(v - s0.get(key, 0), 3) if isinstance(v, (int, float)) else v)
                                 for key, v in pool.stats.items()}
                rows.append(summarize(f"{name}: (a) {n} images streamed, Ray pool, {per_gpu} engine(s) on the GPU, "
                                      f"{tokens} tokens", outs, wall, rate, engines_per_gpu=per_gpu,
                                      seconds_per_image=round(wall / n, 3), engine_start_s=round(start_s, 1),
                                      answer_tokens=tokens, **extra))
        finally:
            pool.close()
    for row in rows:
        row["peak_gpu_memory_gib"] = mem.peak_gib
        row["engine_process_peak_gib"] = mem.process_peak_gib
        util = plan["gpu_memory_utilization"] if plan else 0.9
        row["memory_per_engine_gib"] = round(util * (mem.total_gib or 0), 1) or None
        row["memory_plan"] = plan
        row["engine_options"] = {k: v for k, v in opts.items() if k != "model"}
        row["ray"] = {"num_actors": per_gpu, "engines_per_gpu": per_gpu, "max_in_flight_per_actor": 3}
        row["dtype"] = "fp8" if opts.get("quantization") == "fp8" else "bf16"
        if "window_ms" in (row.get("kernel_profile") or {}) and row.get("answered"):
            from benchmarks.kernel_profile import row_per_query

            cfg = Path(model) / "config.json"
            text = json.loads(cfg.read_text()).get("text_config") if cfg.is_file() else None
            row["kernel_profile"]["per_query"] = row_per_query(row, text)
    return rows


def _kernel_profile(pool, started: list, trace_dir: str, steps: int) -> dict:
    """Stop every actor's profiler and classify the kernels of the traces it wrote."""
    import ray

    from benchmarks.kernel_profile import breakdown

    try:
        ray.get([a.profile.remote(False) for a, on in zip(pool.actors, started) if on], timeout=600)
        files = sorted(Path(trace_dir).rglob("*.pt.trace.json*"))
        if not files:
            return {"error": f"no trace written under {trace_dir} (profiler started on {sum(started)} of "
                             f"{len(started)} engines)"}
        out = breakdown(files)
        out.update(trace_files=[f.name for f in files], trace_mb=round(sum(f.stat().st_size for f in files) / 2**20, 1),
                   profiled_steps_per_engine=steps)
        return out
    except Exception as exc:  # noqa: BLE001 - the run's own numbers stand without the profile
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def hf_phase(model: str, rate: float, n_single: int, n_batched: int) -> list[dict]:
    import torch

    from densify.engines.hf import HFEngine

    prof = load_profile("vlm3-depth")

    rows = []
    t0 = time.perf_counter()
    # the 4B folder has no weights: random ones, made on the GPU
    eng = HFEngine(prof, model=model, device="cuda", dtype="bfloat16", batch_size=1, load_format="dummy")
    log.info("[hf] model ready in %.1f s", time.perf_counter() - t0)
    mem = GPUMemory()
    try:
        with mem:
            eng.generate(image_batch(prof, 900, 2))  # warm-up
            torch.cuda.reset_peak_memory_stats()
            for label, bs, n in (("one query per generate", 1, n_single), ("batched 64", 64, n_batched)):
                eng.batch_size = bs
                b = image_batch(prof, 901 + bs, n)
                outs, wall = timed(lambda: eng.generate(b))
                rows.append(summarize(f"hf: (d) {label}", outs, wall, rate, batch_size=bs,
                                      torch_peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2)))
    finally:
        eng.close()
    for r in rows:
        r["peak_gpu_memory_gib"] = mem.peak_gib
    return rows


# ---------------------------------------------------------------------------------------------- main
def print_table(result: dict) -> None:
    cols = [("variant", 36), ("queries", 7), ("queries_per_s", 9), ("prompt_tokens_per_query", 7),
            ("cached_tokens_per_query", 7), ("generated_tokens_per_query", 5), ("prefix_cache_hit_rate", 6),
            ("ceiling_queries_per_s", 8), ("share_of_ceiling", 6), ("seconds_per_image", 7), ("peak_gpu_memory_gib", 6)]
    heads = ["variant", "n", "q/s", "prompt", "cached", "gen", "hit", "ceiling", "share", "s/img", "GiB"]
    print(" ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, (_, w)) in enumerate(zip(heads, cols))))
    for r in result["rows"]:
        cells = []
        for i, (k, w) in enumerate(cols):
            v = r.get(k)
            if v is None:
                s = ""
            elif isinstance(v, float):
                s = f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"
            else:
                s = str(v)
            cells.append(s.ljust(w) if i == 0 else s.rjust(w))
        print(" ".join(cells))
    for k, v in result.get("summary", {}).items():
        print(f"{k}: {v}")


def derive(result: dict) -> None:
    rows = {r["variant"]: r for r in result["rows"]}
    s = {}
    a = [r for n, r in rows.items() if "(a)" in n and r.get("queries_per_s") and r.get("valid", True)]
    single = rows.get("hf: (d) one query per generate")
    if a:
        best = max(a, key=lambda r: r["queries_per_s"])
        s["best_(a)"] = f"{best['variant']}: {best['queries_per_s']} q/s"
        if single and single.get("queries_per_s"):
            s["best_(a)_over_hf_one_per_call"] = round(best["queries_per_s"] / single["queries_per_s"], 1)
    for dtype, target in FORCED_TARGETS.items():  # the same at the forced answer length (rayK@T)
        forced = [r for r in result["rows"] if "ray" in r and r.get("dtype") == dtype and r.get("valid")
                  and r.get("forced_head")]
        if forced:
            best = max(forced, key=lambda r: r["queries_per_s"])
            met = "met" if best["queries_per_s"] >= target else "NOT met"
            s[f"target_{dtype}_ray_pool_forced"] = (f"{best['queries_per_s']:.0f} answered q/s at {best['answer_tokens']} "
                                                    f"tokens with {best['engines_per_gpu']} engine(s) per GPU vs >= "
                                                    f"{target:.0f}: {met}")
    for dtype, target in TARGETS.items():  # the production path: the Ray pool, 12-token answers, valid rows
        ray = [r for r in result["rows"] if "ray" in r and r.get("dtype") == dtype and r.get("valid")
               and r.get("answer_tokens") == GEN_TOKENS]
        if ray:
            best = max(ray, key=lambda r: r["queries_per_s"])
            met = "met" if best["queries_per_s"] >= target else "NOT met"
            s[f"target_{dtype}_ray_pool_12_tokens"] = (f"{best['queries_per_s']:.0f} answered q/s with "
                                                      f"{best['engines_per_gpu']} engine(s) per GPU vs >= {target:.0f}: {met}")
    invalid = [r["variant"] for r in result["rows"] if r.get("valid") is False]
    if invalid:
        s["invalid_rows"] = invalid
    result["summary"] = s


def best_options(paths: list[str]) -> dict:
    """Engine options beyond BASE_OPTS of the fastest valid bf16 Ray-pool row at 12 tokens in these results
    ({} when none)."""
    best, opts = 0.0, {}
    for path in paths:
        for r in json.loads(Path(path).read_text()).get("rows", []):
            if (r.get("ray") and r.get("valid", True) and r.get("dtype") == "bf16"
                    and r.get("answer_tokens") == GEN_TOKENS and (r.get("queries_per_s") or 0) > best):
                best = r["queries_per_s"]
                opts = {k: v for k, v in r.get("engine_options", {}).items()
                        if k not in BASE_OPTS and k not in ("model", "min_tokens")}
    return opts


TABLE_COLUMNS = ("file", "variant", "answered q/s", "engines/GPU", "weights", "tokens", "GPU busy",
                 "share of ceiling", "GiB per engine", "start s", "valid")


def table_rows(path: Path) -> list[dict]:
    """README's engine-row cells from one result file, one dict per row: answered q/s (answered queries
    only), engines per GPU, weights, tokens, GPU busy, share of the bf16 ceiling, vLLM's memory share per
    engine, engine start, valid. Columns older files (H100, 2026-11-23/24) lack show "-"."""
    data = json.loads(Path(path).read_text())
    if "engine_bench" not in data.get("benchmark", ""):
        raise ValueError(f"{path}: not an engine_bench result")

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    out = []
    for r in data.get("rows", []):
        errors = r.get("errors") or 0
        answered = r.get("answered", r.get("queries", 0) - errors)
        out.append({
            "file": Path(path).name, "variant": r["variant"],
            "answered q/s": num(answered / r["wall_s"] if r.get("wall_s") else None, ".1f"),
            "engines/GPU": str(r.get("engines_per_gpu", "-")),
            "weights": r.get("dtype") or (r.get("engine_options") or {}).get("quantization") or "-",
            "tokens": num(r.get("generated_tokens_per_query"), ".0f"), "GPU busy": num(r.get("gpu_busy_share"), ".2f"),
            "share of ceiling": num(r.get("share_of_ceiling"), ".2f"),
            "GiB per engine": num(r.get("memory_per_engine_gib"), ".1f"), "start s": num(r.get("engine_start_s"), ".0f"),
            "valid": "yes" if r.get("valid", errors == 0) else f"INVALID ({errors} errors)",
        })
    return out


def markdown(rows: list[dict], columns) -> str:
    """A markdown table of these rows' cells in `columns` order."""
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(r[c] for c in columns) + " |" for r in rows])


def markdown_table(paths: list[Path]) -> str:
    return markdown([row for p in paths for row in table_rows(p)], TABLE_COLUMNS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the JSON result")
    ap.add_argument("--phases", default="base,depthlm,hf,cascade,fp8",
                    help="comma list: base,depthlm,cascade,fp8,cpu,rayN (N engines per GPU in Ray actors; rayN+NAME "
                         "with --custom NAME's options),hf, or --custom names")
    ap.add_argument("--depthlm-model", help="Pixtral-12B-shaped folder for the depthlm phase (default: build one in "
                                            "a temporary folder)")
    ap.add_argument("--depthlm-queries", type=int, default=256, help="queries of the depthlm phase's image")
    ap.add_argument("--custom", action="append", default=[], metavar="NAME=JSON",
                    help='an extra vLLM phase: engine options over BASE_OPTS as JSON, e.g. '
                         'fp8kv=\'{"quantization": "fp8", "kv_cache_dtype": "fp8"}\' (measures (a) and streamed)')
    ap.add_argument("--stream-images", type=int, default=4, help="images in the streamed steady-state measurement")
    ap.add_argument("--long-tokens", type=int, default=LONG_TOKENS,
                    help="rayK phases: also stream N images with answers this long (0: skip)")
    ap.add_argument("--pyspy", help="folder for py-spy profiles of the (a) measurement (needs py-spy)")
    ap.add_argument("--profile-steps", type=int, default=300, help="profK: engine steps each engine's torch "
                    "profiler records (keeps the trace to tens of MB)")
    ap.add_argument("--model", help="4B-shaped model folder (default: build one in a temporary folder)")
    ap.add_argument("--hf-single", type=int, default=32, help="queries for hf one-per-call")
    ap.add_argument("--hf-batched", type=int, default=256, help="queries for hf batched")
    ap.add_argument("--name", help="result file name (default engine_bench-<device>-<date>.json)")
    ap.add_argument("--best", nargs="+", metavar="RESULT", help="print, as JSON, the engine options of the fastest "
                    "valid bf16 Ray-pool row at 12 tokens in these result files, and exit")
    ap.add_argument("--table", nargs="*", metavar="RESULT", help="print README's engine rows (markdown) from these "
                    "result files (none given: every committed engine_bench-*.json), and exit")
    args = ap.parse_args(argv)
    if args.best:
        print(json.dumps(best_options(args.best)))
        return 0
    if args.table is not None:
        print(markdown_table([Path(p) for p in args.table]
                             or sorted((ROOT / "benchmarks" / "results").glob("engine_bench-*.json"))))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    import torch

    if not torch.cuda.is_available():
        print("engine_bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    info = versions()
    rate = matmul_rate()
    log.info("bf16 matmul 8192^3: %.0f TFLOP/s", rate / 1e12)
    tmp = None
    model = args.model
    if model is None:
        from densify.synthetic.models import build_model_folder

        tmp = tempfile.TemporaryDirectory(prefix="densify-bench-")
        model = str(build_model_folder(Path(tmp.name) / "qwen3vl-4b", shape="4b"))
    prof = load_profile("vlm3-depth")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc)
    dev = info.get("device", "gpu").replace(" ", "-")
    path = out_dir / (args.name or f"engine_bench-{dev}-{stamp:%Y%m%d-%H%M}.json")
    result = {"benchmark": "densify engine_bench", "date_utc": stamp.isoformat(timespec="seconds"),
              "host": platform.node(), **info, "bf16_matmul_tflops": round(rate / 1e12, 1),
              "params_for_ceiling": PARAMS, "params_for_ceiling_depthlm": PIXTRAL_PARAMS,
              "generated_tokens_forced": GEN_TOKENS,
              "image": f"{IMAGE.name} resized to 1000x750 (fx=1000): {GRID[0]}x{GRID[1]} grid",
              "template": render_text(prof, x=1000, y=1000),
              "notes": ["dummy (random) weights: vLLM answers forced to 12 tokens (min_tokens=max_tokens=12, "
                        "ignore_eos); hf answers stop at max_new_tokens=12",
                        "peak_gpu_memory_gib: NVML used memory of the whole GPU while the phase ran (vLLM "
                        "reserves gpu_memory_utilization of the card up front)",
                        "ceiling: bf16 matmul rate / (2 * 4.4e9 * (uncached prompt + generated tokens))"],
              "rows": []}
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    custom = {}
    for c in args.custom:
        k, _, v = c.partition("=")
        custom[k.strip()] = json.loads(v)
    kw = dict(pyspy_dir=args.pyspy, stream_images=args.stream_images)
    state: dict = {}
    for ph in phases:
        t0 = time.perf_counter()
        try:
            if ph == "base":
                rows = vllm_phase("base", model, dict(BASE_OPTS), rate, {"a", "stream", "images", "b", "structured"},
                                  state, **kw)
            elif ph == "depthlm":
                if args.depthlm_model is None:
                    from densify.synthetic.models import build_model_folder

                    tmp = tmp or tempfile.TemporaryDirectory(prefix="densify-bench-")
                    args.depthlm_model = str(build_model_folder(Path(tmp.name) / "pixtral-12b", shape="pixtral-12b"))
                rows = depthlm_phase(args.depthlm_model, rate, state, args.depthlm_queries,
                                     long_tokens=args.long_tokens)
            elif ph == "cascade":
                rows = vllm_phase("cascade", model, dict(BASE_OPTS, cascade_attention=True), rate, {"a", "stream"},
                                  state, **kw)
            elif ph == "fp8":
                rows = vllm_phase("fp8", model, dict(BASE_OPTS, quantization="fp8"), rate, {"a", "stream"}, state, **kw)
            elif ph.startswith(("ray", "prof")) and ph.lstrip("rayprof")[:1].isdigit():
                kind = "prof" if ph.startswith("prof") else "ray"
                spec, _, extra_name = ph[len(kind):].partition("+")
                k, _, forced = spec.partition("@")
                extra_opts = (custom.get(extra_name) or VARIANTS[extra_name]) if extra_name else {}
                more = {}
                if forced:
                    more = dict(answer_tokens=int(forced), prefill=FORCED_HEAD, long_tokens=0)
                if kind == "prof":
                    more["profile_steps"] = args.profile_steps
                rows = ray_phase(ph, model, dict(BASE_OPTS, **extra_opts), rate, int(k), state, args.stream_images,
                                 **{"long_tokens": args.long_tokens, "pyspy_dir": args.pyspy, **more})
            elif ph == "cpu":
                rows = vllm_phase("cpu", model, dict(BASE_OPTS), rate, {"cpu"}, state, **kw)
            elif ph == "xxhash":
                rows = vllm_phase("xxhash", model, dict(BASE_OPTS, prefix_caching_hash_algo="xxhash"), rate,
                                  {"stream"}, state, **kw)
            elif ph in custom or ph in VARIANTS:
                rows = vllm_phase(ph, model, dict(BASE_OPTS, **(custom.get(ph) or VARIANTS[ph])), rate, {"a", "stream"},
                                  state, **kw)
            elif ph == "hf":
                rows = hf_phase(model, rate, args.hf_single, args.hf_batched)
            else:
                raise SystemExit(f"unknown phase {ph!r}")
        except Exception as exc:  # keep what the other phases measured
            log.exception("phase %s failed", ph)
            rows = [{"variant": f"{ph}: FAILED", "error": f"{type(exc).__name__}: {exc}"[:2000]}]
        log.info("phase %s took %.0f s", ph, time.perf_counter() - t0)
        result["rows"].extend(rows)
        derive(result)
        path.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"results: {path}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
