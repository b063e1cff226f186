"""Where the GPU time goes: kernel classes of a torch-profiler trace (Chrome trace JSON, as vLLM's worker
profiler writes it with `profiler_config={"profiler": "torch", ...}` and `LLM.start_profile()`).

    python -m benchmarks.kernel_profile TRACE.json[.gz] ...     # prints the breakdown as JSON
    python -m benchmarks.kernel_profile --per-query RESULT.json   # per answered query, for engine_bench's profK rows

Every GPU kernel is put in one class by its name (`classify`): GEMM, attention, KV-cache writes, sampling,
memory copies and sets, communication, other kernels (norms, activations, rotary, elementwise, vision
tower glue). Attention is split by the engine step it ran in: vLLM annotates each step on the CPU with its
context (prefill) and generation (decode) requests (`execute_context_N(T)_generation_M(K)`); a kernel's
launch (matched by its correlation id) falls inside one step's annotation, so a step with only decode
requests is "decode", one with only prefill "prefill", one with both "mixed" (chunked prefill runs them in
one kernel; such a step's attention cannot be split further). Idle gaps are the window (first kernel start
to last kernel end) minus the union of all kernel intervals. Several trace files (engines sharing a GPU)
are combined on the common clock: the union counts once, the classes add up.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

CLASSES = ("gemm", "attention", "kv_cache", "sampling", "memcpy", "memset", "communication", "other")

# Order matters: FlashAttention-3 kernels are cutlass device kernels, so attention is tested before GEMM.
_RULES = [
    ("communication", re.compile(r"nccl|allreduce|all_reduce|cross_device|custom_ar", re.I)),
    ("kv_cache", re.compile(r"reshape_and_cache|cache_kernel|concat_and_cache|kv_cache", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|attn|mha_|_mla|paged|BatchPrefill|BatchDecode|"
                             r"merge_attn_states|unified_attention|_fwd_kernel|cascade", re.I)),
    ("sampling", re.compile(r"argmax|topk|top_k|top_p|topp|(?<!up)(?<!down)sampl|gumbel|multinomial|sort|softmax|"
                            r"logprob|logits|penalt|exponential_|cumsum|radix", re.I)),
    ("gemm", re.compile(r"gemm|gemv|cublas|cutlass|nvjet|xmma|wgmma|matmul|_mm_|scaled_mm|splitk|"
                        r"triton_tem_fused|dot_kernel|Kernel2|sm\d\d_", re.I)),
]
_STEP = re.compile(r"execute_context_(\d+)\((\d+)\)_generation_(\d+)\((\d+)\)")
_STEP_DETAILED = re.compile(r"execute_(\d+)_context_(\d+)\(sq(\d+).*?\)_generation_(\d+)\(sq(\d+)")


def classify(name: str, category: str | None = None) -> str:
    """The class of one GPU kernel (or memory event, by its trace category)."""
    cat = (category or "").lower()
    if cat == "gpu_memcpy" or name.startswith("Memcpy"):
        return "memcpy"
    if cat == "gpu_memset" or name.startswith("Memset"):
        return "memset"
    for cls, rx in _RULES:
        if rx.search(name):
            return cls
    return "other"


def step_kind(annotation: str) -> str | None:
    """prefill | decode | mixed for a vLLM step annotation; None for any other name."""
    m = _STEP.search(annotation)
    if m:
        ctx, gen = int(m.group(1)), int(m.group(3))
    else:
        m = _STEP_DETAILED.search(annotation)
        if not m:
            return None
        ctx, gen = int(m.group(2)), int(m.group(4))
    if ctx and gen:
        return "mixed"
    return "prefill" if ctx else "decode"


def load_events(path: str | Path) -> list[dict]:
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8", errors="replace") as f:
        data = json.load(f)
    return data.get("traceEvents", data) if isinstance(data, dict) else data


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, None
    start = None
    for a, b in sorted(intervals):
        if end is None or a > end:
            if end is not None:
                total += end - start
            start, end = a, b
        else:
            end = max(end, b)
    if end is not None:
        total += end - start
    return total


def breakdown(traces: list, top: int = 15) -> dict:
    """The shares of the profiled window per kernel class (attention split by step kind), idle gaps, the
    steps seen and the top kernels. `traces`: paths, or lists of trace events."""
    per_class: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, list] = defaultdict(lambda: [0.0, 0, ""])
    intervals: list[tuple[float, float]] = []
    steps: dict[str, int] = defaultdict(int)
    step_time: dict[str, float] = defaultdict(float)
    unmatched = 0
    for trace in traces:
        events = load_events(trace) if isinstance(trace, (str, Path)) else trace
        launches: dict = {}   # correlation id -> launch time (CPU clock)
        windows = []          # (start, end, kind, pid) of the step annotations
        kernels = []
        for e in events:
            if not isinstance(e, dict) or e.get("ph") != "X":
                continue
            cat = str(e.get("cat", "")).lower()
            name = str(e.get("name", ""))
            if cat in ("kernel", "gpu_memcpy", "gpu_memset"):
                kernels.append(e)
            elif cat in ("cuda_runtime", "cuda_driver"):
                corr = (e.get("args") or {}).get("correlation")
                if corr is not None:  # unique within one worker's trace; GPU events carry the device as pid
                    launches[corr] = float(e["ts"])
            elif cat in ("user_annotation", "gpu_user_annotation", "cpu_op") and name.startswith("execute_"):
                kind = step_kind(name)
                if kind is not None and cat != "gpu_user_annotation":
                    windows.append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), kind, e.get("pid")))
                    steps[kind] += 1
        windows.sort()
        starts = [w[0] for w in windows]
        for e in kernels:
            ts, dur = float(e["ts"]), float(e.get("dur", 0))
            name = str(e.get("name", ""))
            cls = classify(name, e.get("cat"))
            intervals.append((ts, ts + dur))
            kind = None
            if windows:
                launch = launches.get((e.get("args") or {}).get("correlation"))
                if launch is not None:
                    kind = _kind_at(windows, starts, launch)
                if kind is None:
                    unmatched += 1
            if kind is not None:
                step_time[kind] += dur
            if cls == "attention":
                cls = f"attention_{kind or 'unknown_step'}"
            per_class[cls] += dur
            k = per_kernel[name[:160]]
            k[0] += dur
            k[1] += 1
            k[2] = cls
    if not intervals:
        return {"error": "no GPU kernels in the trace (was the profiler's CUDA activity on?)"}
    t0 = min(a for a, _ in intervals)
    t1 = max(b for _, b in intervals)
    window = t1 - t0
    busy = _union(intervals)
    kernel_time = sum(per_class.values())
    shares = {k: round(v / window, 4) for k, v in sorted(per_class.items(), key=lambda kv: -kv[1])}
    return {
        "window_ms": round(window / 1e3, 3), "gpu_busy_ms": round(busy / 1e3, 3),
        "kernel_ms": round(kernel_time / 1e3, 3),
        "shares_of_window": {**shares, "idle_gaps": round(1.0 - busy / window, 4)},
        "kernels_overlap_ms": round(max(kernel_time - busy, 0.0) / 1e3, 3),
        "steps": dict(steps), "kernel_ms_by_step": {k: round(v / 1e3, 3) for k, v in step_time.items()},
        "kernels_without_step": unmatched,
        "top_kernels": [{"name": n, "class": c, "ms": round(t / 1e3, 3), "calls": m, "share": round(t / window, 4)}
                        for n, (t, m, c) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]],
        "notes": ["shares are of the profiled window (first kernel start to last kernel end); classes add up "
                  "to more than the busy share when kernels of several engines overlap",
                  "attention_mixed: steps that hold prefill and decode requests together (one kernel for both)"],
    }


def gemm_params(text: dict) -> float:
    """Weights every token's GEMMs multiply by in a dense decoder (attention projections and the gated MLP of
    every layer), from a text config (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, head_dim). The embedding is a lookup and the output head runs at sampled positions
    only (under 1% of a densify query's FLOP), so neither is counted."""
    h, layers = text["hidden_size"], text["num_hidden_layers"]
    hd = text.get("head_dim") or h // text["num_attention_heads"]
    attn = h * hd * (2 * text["num_attention_heads"] + 2 * text["num_key_value_heads"])  # q, o; k, v
    return float(layers * (attn + 3 * h * text["intermediate_size"]))


def per_query(profile: dict, queries: int, tokens_per_query: float | None = None,
              params: float | None = None) -> dict:
    """GPU milliseconds per answered query by kernel class, GPU busy time per query and the rate the same
    kernels would give on a GPU never idle (1 / busy time per query): what bounds the engine once every gap
    is filled. Meaningful when the profile spans the whole run (`window_share_of_run` near 1 in
    engine_bench). With the tokens each query runs through the model (uncached prompt + generated) and
    `gemm_params`, the rate the GEMMs ran at (compare the card's matmul rate)."""
    window = profile["window_ms"]
    ms = {k: round(v * window / queries, 4) for k, v in profile["shares_of_window"].items() if k != "idle_gaps"}
    busy = profile["gpu_busy_ms"] / queries
    out = {"ms_per_query": ms, "idle_ms_per_query": round((window - profile["gpu_busy_ms"]) / queries, 4),
           "busy_ms_per_query": round(busy, 4), "queries_per_s_never_idle": round(1e3 / busy, 1)}
    if tokens_per_query and params and ms.get("gemm"):
        out["gemm_tflop_per_s"] = round(2 * params * tokens_per_query / (ms["gemm"] / 1e3) / 1e12, 1)
    return out


def _kind_at(windows, starts, t: float) -> str | None:
    import bisect

    i = bisect.bisect_right(starts, t) - 1
    if i >= 0 and windows[i][0] <= t <= windows[i][1]:
        return windows[i][2]
    return None


def row_per_query(row: dict, text: dict | None) -> dict:
    """`per_query` of one profiled engine_bench row (its answered queries and tokens per query; the GEMM rate
    when the model's text config is given)."""
    tokens = (row.get("uncached_prompt_tokens_per_query") or 0) + (row.get("generated_tokens_per_query") or 0)
    return per_query(row["kernel_profile"], row["answered"], tokens, gemm_params(text) if text else None)


def result_per_query(path: str | Path, text: dict | None = None) -> list[dict]:
    """`per_query` of every profiled row of an engine_bench result (the 4B shape's text config by default)."""
    if text is None:
        from densify.synthetic.models import SHAPES

        text = SHAPES["4b"]["text"]
    rows = []
    for r in json.loads(Path(path).read_text()).get("rows", []):
        kp = r.get("kernel_profile") or {}
        if "window_ms" in kp and r.get("answered"):
            rows.append({"variant": r["variant"], "queries_per_s": r.get("queries_per_s"),
                         "window_share_of_run": round(kp["window_ms"] / 1e3 / r["wall_s"], 3),
                         **row_per_query(r, text)})
    return rows


def main(argv=None) -> int:
    args = list(argv if argv is not None else sys.argv[1:])
    if not args:
        print(__doc__)
        return 2
    if args[0] == "--per-query":
        print(json.dumps([row for p in args[1:] for row in result_per_query(p)], indent=2))
        return 0
    print(json.dumps(breakdown(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
