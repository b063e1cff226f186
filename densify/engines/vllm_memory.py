"""How much of a GPU each of K vLLM engines on it may take, and the step and CUDA-graph sizes that fit.

vLLM sizes its KV cache from `gpu_memory_utilization` x the card's memory, but a process holds more than
that share: its CUDA context, the CUDA-graph pool, allocator slack, and activation workspace that vLLM's
memory profile does not see (FlashAttention's split workspace of a large step: a 32,768-token step
allocated 2.5 GiB more than the profile counted). With one engine the 10% left over absorbs it; with
several, each one's overshoot eats its neighbour's share. Measured on an H200 (140 GiB, 4B-shaped
Qwen3-VL, 2026-11-30): engines given 0.88/K of the card held 42-48 GiB against a 41 GiB share (K=3) and
32-37 GiB against 30.8 (K=4), and died of CUDA OOM. So each engine's share here is what is left of its
1/K slice after that overshoot, and large K take smaller steps (less workspace) and fewer CUDA graphs.

`engine_memory_plan` and `apply_memory_plan` are pure (no GPU, no vLLM); the Ray actor of a vllm engine
that shares its GPU (`RayPoolEngine(engines_per_gpu=K)`) sizes the engine's typed options with the card's
memory (`visible_gpu_total_gib`, `VLLMOptions.for_shared_gpu`, which calls `apply_memory_plan`) before it
builds the engine.
"""

from __future__ import annotations

import math
import os

# vLLM engines per GPU when a Ray pool's `engines_per_gpu` is "auto" (VLLMOptions.auto_engines_per_gpu): one
# engine core process leaves the GPU idle while it does its per-request CPU work; a second overlaps it (H200,
# 4B-shaped Qwen3-VL, 12-token answers, 2026-11-30: one engine 500-526 q/s streamed, two 628 in the Ray pool,
# three 624: the GPU is busy 91% with two). fp8 weights shorten the GPU's share, so a third engine still pays
# there (735 -> 781 q/s, four 782). See docs/scaling.md for the measurements.
AUTO_ENGINES_PER_GPU = 2
AUTO_ENGINES_PER_GPU_FP8 = 3

# Memory outside vLLM's share, per engine process, in GiB: fixed part (context, graph pool, slack) and the
# step's uncounted workspace, which grows with its tokens. Fitted to the overshoot above (6.2-6.7 GiB at
# 32,768 tokens) with ~0.5 GiB to spare.
FIXED_OVERHEAD_GIB = 4.5
STEP_OVERHEAD_GIB_PER_TOKEN = 2.5 / 32768
USABLE_SHARE = 0.95          # of the card, for all engines together (the rest: driver, other processes)
SINGLE_ENGINE_UTILIZATION = 0.90   # one engine per GPU: vLLM's own headroom suffices (measured, H100/H200)
MAX_BATCHED_TOKENS = 32768   # 65,536 ran out of memory even alone at 0.90 (H100)
MIN_BATCHED_TOKENS = 8192
MIN_ENGINE_GIB = 14.0        # weights of a 4B bf16 model (8.3 GiB) + a useful KV cache
ASSUMED_GPU_GIB = 80.0       # when NVML cannot say (an H100-class card): the smaller plan is the safe one


def batched_tokens_for(engines_per_gpu: int) -> int:
    """Tokens per engine step: 32,768 for one or two engines, then halved so that K engines' steps
    together stay near 65,536 tokens of workspace (a power of two, at least 8,192)."""
    k = max(1, int(engines_per_gpu))
    t = min(MAX_BATCHED_TOKENS, 65536 // k)
    return max(MIN_BATCHED_TOKENS, 2 ** int(math.log2(t)))


def cudagraph_sizes(max_num_seqs: int, engines_per_gpu: int) -> list[int] | None:
    """Decode batch sizes to capture as CUDA graphs, or None for vLLM's default list up to max_num_seqs.

    With three or more engines on a card each engine captures a sparser list (every graph costs memory
    in each process and start-up time): powers of two to 64, then steps of 64 (a decode step is padded
    to the next size: at most 63 wasted rows of a 1,024-row batch)."""
    n = max(1, int(max_num_seqs))
    if engines_per_gpu <= 2:
        return None
    sizes = [s for s in (1, 2, 4, 8, 16, 32) if s < n] + list(range(64, n + 1, 64))
    if sizes[-1] != n:
        sizes.append(n)
    return sorted(set(sizes))


def engine_memory_plan(engines_per_gpu: int, gpu_total_gib: float, *, max_num_seqs: int = 1024,
                       max_num_batched_tokens: int | None = None) -> dict:
    """vLLM options for one of `engines_per_gpu` engines sharing a card of `gpu_total_gib`.

    Returns gpu_memory_utilization, max_num_batched_tokens, compilation_config (CUDA-graph sizes), and
    process_gib, the most the process is expected to hold (its share + overhead). Raises ValueError when
    an engine would get less than MIN_ENGINE_GIB."""
    k = int(engines_per_gpu)
    if k < 1:
        raise ValueError(f"engines_per_gpu must be >= 1, got {engines_per_gpu}")
    if gpu_total_gib <= 0:
        raise ValueError(f"gpu_total_gib must be > 0, got {gpu_total_gib}")
    tokens = int(max_num_batched_tokens) if max_num_batched_tokens else batched_tokens_for(k)
    graphs = cudagraph_sizes(max_num_seqs, k)
    compilation = {"cudagraph_capture_sizes": graphs} if graphs else {"max_cudagraph_capture_size": int(max_num_seqs)}
    overhead = FIXED_OVERHEAD_GIB + STEP_OVERHEAD_GIB_PER_TOKEN * tokens
    if k == 1:
        util = SINGLE_ENGINE_UTILIZATION
    else:
        share = USABLE_SHARE * gpu_total_gib / k - overhead
        util = math.floor(share / gpu_total_gib * 1000) / 1000  # round down: never over the slice
    share_gib = util * gpu_total_gib
    if share_gib < MIN_ENGINE_GIB:
        raise ValueError(f"{k} engines on a {gpu_total_gib:.0f} GiB GPU leave {share_gib:.1f} GiB each (weights, "
                         f"KV cache) after {overhead:.1f} GiB of per-process overhead; the least that works is "
                         f"{MIN_ENGINE_GIB:.0f} GiB: use fewer engines per GPU")
    return {"gpu_memory_utilization": util, "max_num_batched_tokens": tokens, "compilation_config": compilation,
            "process_gib": round(share_gib + overhead, 2)}


def apply_memory_plan(options, engines_per_gpu: int, gpu_total_gib: float):
    """vllm engine options for one of `engines_per_gpu` engines on a card of `gpu_total_gib`: the plan's
    gpu_memory_utilization, max_num_batched_tokens and CUDA-graph sizes wherever `options` leave them unset
    (what the caller sets wins). `options`: typed (densify.engines.options.VLLMOptions: a copy comes back,
    with those fields set) or a dict of the options given. Returns (options, plan)."""
    typed = hasattr(options, "model_fields_set")
    given = options.model_fields_set if typed else set(options)

    def value(key):
        if key not in given:
            return None
        return getattr(options, key) if typed else options[key]

    plan = engine_memory_plan(engines_per_gpu, gpu_total_gib, max_num_seqs=int(value("max_num_seqs") or 1024),
                              max_num_batched_tokens=value("max_num_batched_tokens"))
    update = {k: plan[k] for k in ("gpu_memory_utilization", "max_num_batched_tokens") if k not in given}
    extra = dict(value("llm_kwargs") or {})  # vllm.LLM's own options travel under llm_kwargs
    if not value("enforce_eager") and "compilation_config" not in extra:
        extra["compilation_config"] = plan["compilation_config"]
        update["llm_kwargs"] = extra
    return (options.model_copy(update=update) if typed else {**options, **update}), plan


def visible_gpu_total_gib() -> float | None:
    """Memory of the GPU this process will use (the first of CUDA_VISIBLE_DEVICES), read through NVML so
    that no CUDA context is made here; None when it cannot be read."""
    try:
        import pynvml
    except ImportError:
        return None
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    try:
        pynvml.nvmlInit()
        try:
            if first.startswith(("GPU-", "MIG-")):
                h = pynvml.nvmlDeviceGetHandleByUUID(first)
            else:
                h = pynvml.nvmlDeviceGetHandleByIndex(int(first or 0))
            return pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML, no NVIDIA GPU
        return None
