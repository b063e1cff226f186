"""Kernel classes of a torch-profiler trace (benchmarks.kernel_profile): names, step kinds, idle gaps."""

import gzip
import json
from pathlib import Path

import pytest

from benchmarks import kernel_profile as kp

SAMPLE = json.loads((Path(__file__).parent / "data" / "vllm_kernel_names.json").read_text())


@pytest.mark.parametrize("cls", sorted(SAMPLE["classes"]))
def test_sample_kernel_names_get_their_class(cls):
    for name in SAMPLE["classes"][cls]:
        assert kp.classify(name) == cls, name


def test_memory_events_and_steps():
    assert kp.classify("Memcpy HtoD (Pinned -> Device)", "gpu_memcpy") == "memcpy"
    assert kp.classify("Memset (Device)", "gpu_memset") == "memset"
    assert kp.step_kind("execute_context_12(8280)_generation_0(0)") == "prefill"
    assert kp.step_kind("execute_context_0(0)_generation_1024(1024)") == "decode"
    assert kp.step_kind("execute_context_3(207)_generation_900(900)") == "mixed"
    assert kp.step_kind("execute_1107_context_3(sq207sk2400sqsq14283sqsk165600)_generation_900(sq900sk720000sqsq900"
                        "sqsk720000)") == "mixed"
    assert kp.step_kind("gpu_model_runner: forward") is None


def _trace(tmp_path, name="t.pt.trace.json.gz"):
    """Two engine steps (a prefill step, a decode step) of a worker: CPU annotations, launches, kernels."""
    ev = [
        {"ph": "X", "cat": "user_annotation", "name": "execute_context_4(276)_generation_0(0)", "pid": 7, "tid": 1,
         "ts": 0, "dur": 100},
        {"ph": "X", "cat": "user_annotation", "name": "execute_context_0(0)_generation_512(512)", "pid": 7, "tid": 1,
         "ts": 200, "dur": 100},
    ]
    kernels = [  # (launch ts, kernel ts, dur, name)
        (10, 20, 30, "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT"),
        (20, 50, 20, "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<...>>>"),
        (30, 70, 10, "void vllm::rms_norm_kernel<c10::BFloat16, 8, 2>"),
        (210, 220, 40, "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT"),
        (220, 260, 20, "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<...>>>"),
        (290, 300, 20, "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps>>"),
    ]
    for i, (launch, ts, dur, kname) in enumerate(kernels):
        ev.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 7, "tid": 1, "ts": launch,
                   "dur": 2, "args": {"correlation": 100 + i}})
        ev.append({"ph": "X", "cat": "kernel", "name": kname, "pid": 0, "tid": 7, "ts": ts, "dur": dur,
                   "args": {"correlation": 100 + i}})
    ev.append({"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "pid": 0, "tid": 7,
               "ts": 320, "dur": 10, "args": {"correlation": 999}})
    path = tmp_path / name
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": ev}, f)
    return path


def test_breakdown_splits_attention_by_step_and_counts_idle_gaps(tmp_path):
    b = kp.breakdown([_trace(tmp_path)])
    s = b["shares_of_window"]
    window = 330 - 20  # first kernel start to last kernel end, us
    assert b["window_ms"] == pytest.approx(window / 1e3)
    assert s["gemm"] == pytest.approx(70 / window, abs=1e-4)
    assert s["attention_prefill"] == pytest.approx(20 / window, abs=1e-4)
    assert s["attention_decode"] == pytest.approx(20 / window, abs=1e-4)
    assert s["sampling"] == pytest.approx(20 / window, abs=1e-4)
    assert s["other"] == pytest.approx(10 / window, abs=1e-4) and s["memcpy"] == pytest.approx(10 / window, abs=1e-4)
    assert s["idle_gaps"] == pytest.approx(1 - 150 / window, abs=1e-4)
    assert b["steps"] == {"prefill": 1, "decode": 1} and b["kernels_without_step"] == 1  # the copy
    assert b["top_kernels"][0]["class"] == "gemm" and b["top_kernels"][0]["calls"] == 2


def test_two_engines_on_one_gpu_count_busy_time_once(tmp_path):
    a = _trace(tmp_path, "a.pt.trace.json.gz")
    b = kp.breakdown([a, a])  # the same kernels twice: classes add up, the union does not
    assert b["gpu_busy_ms"] == pytest.approx(0.150) and b["kernel_ms"] == pytest.approx(0.300)
    assert b["kernels_overlap_ms"] == pytest.approx(0.150)
    assert kp.breakdown([[]])["error"].startswith("no GPU kernels")


def test_per_query_bound_and_gemm_rate():
    # 1,000 queries in a 2 s window, 1.5 s of it busy: 1.5 ms per query busy, so 666.7 q/s never idle
    profile = {"window_ms": 2000.0, "gpu_busy_ms": 1500.0,
               "shares_of_window": {"gemm": 0.5, "attention_mixed": 0.25, "idle_gaps": 0.25}}
    text = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128)
    params = kp.gemm_params(text)
    assert params == 36 * (2560 * 128 * (2 * 32 + 2 * 8) + 3 * 2560 * 9728)  # ~3.63e9: Qwen3-VL-4B's text layers
    out = kp.per_query(profile, 1000, tokens_per_query=81.0, params=params)
    assert out["ms_per_query"] == {"gemm": 1.0, "attention_mixed": 0.5}
    assert out["busy_ms_per_query"] == 1.5 and out["idle_ms_per_query"] == 0.5
    assert out["queries_per_s_never_idle"] == 666.7
    assert out["gemm_tflop_per_s"] == round(2 * params * 81.0 / 1e-3 / 1e12, 1)
    assert "gemm_tflop_per_s" not in kp.per_query(profile, 1000)


def test_per_query_of_a_committed_profile():
    rows = kp.result_per_query(Path(__file__).parents[1] / "benchmarks" / "results"
                               / "engine_bench-H200-20261203-prof1-forced5.json")
    assert len(rows) == 1 and rows[0]["window_share_of_run"] > 0.9
    assert 800 < rows[0]["queries_per_s_never_idle"] < 900   # one engine's kernels: 1.16 ms per query
    assert 700 < rows[0]["gemm_tflop_per_s"] < 800           # the card's bf16 matmul rate (798 measured)
