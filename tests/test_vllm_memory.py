"""Memory sizing for several vLLM engines on one GPU (pure: no GPU, no vLLM)."""

import pytest

from densify.engines.vllm_memory import (FIXED_OVERHEAD_GIB, STEP_OVERHEAD_GIB_PER_TOKEN, USABLE_SHARE,
                                         apply_memory_plan, batched_tokens_for, cudagraph_sizes, engine_memory_plan)

H200 = 140.0


def test_one_engine_keeps_the_measured_single_engine_settings():
    p = engine_memory_plan(1, H200)
    assert p["gpu_memory_utilization"] == 0.90 and p["max_num_batched_tokens"] == 32768
    assert p["compilation_config"] == {"max_cudagraph_capture_size": 1024}


@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("total", [80.0, 94.0, H200])
def test_k_engines_with_their_overhead_fit_the_card(k, total):
    try:
        p = engine_memory_plan(k, total)
    except ValueError as exc:  # too small a slice: said, not silently undersized
        assert "fewer engines" in str(exc)
        assert USABLE_SHARE * total / k - FIXED_OVERHEAD_GIB - STEP_OVERHEAD_GIB_PER_TOKEN * batched_tokens_for(k) < 14.5
        return
    overhead = FIXED_OVERHEAD_GIB + STEP_OVERHEAD_GIB_PER_TOKEN * p["max_num_batched_tokens"]
    assert k * (p["gpu_memory_utilization"] * total + overhead) <= USABLE_SHARE * total + 1e-6
    assert p["process_gib"] * k <= total
    assert p["gpu_memory_utilization"] * total >= 14.0


def test_the_h200_oom_cases_now_fit():
    """2026-11-30: 3 engines held up to 48 GiB each (41.3 share + 6.7 uncounted), 4 up to 37 (30.8 + 6.2)."""
    for k, overshoot in ((3, 6.7), (4, 6.2)):
        p = engine_memory_plan(k, H200)
        assert k * (p["gpu_memory_utilization"] * H200 + overshoot) < H200 - 2
        assert p["gpu_memory_utilization"] < 0.88 / k


def test_more_engines_take_smaller_steps_and_fewer_graphs():
    assert [batched_tokens_for(k) for k in (1, 2, 3, 4, 8, 16)] == [32768, 32768, 16384, 16384, 8192, 8192]
    assert cudagraph_sizes(1024, 1) is None and cudagraph_sizes(1024, 2) is None
    g = cudagraph_sizes(1024, 3)
    assert g[0] == 1 and g[-1] == 1024 and len(g) < 25 and g == sorted(set(g))
    assert all(b - a <= 64 for a, b in zip(g, g[1:]))  # a decode step pads at most 63 rows
    assert cudagraph_sizes(100, 4)[-1] == 100
    assert engine_memory_plan(3, H200)["compilation_config"] == {"cudagraph_capture_sizes": g}


def test_bad_arguments():
    with pytest.raises(ValueError):
        engine_memory_plan(0, H200)
    with pytest.raises(ValueError):
        engine_memory_plan(2, 0)
    with pytest.raises(ValueError, match="fewer engines"):
        engine_memory_plan(8, 80.0)
    assert engine_memory_plan(2, H200, max_num_batched_tokens=8192)["max_num_batched_tokens"] == 8192


def test_apply_fills_only_what_the_caller_left_unset():
    opts, plan = apply_memory_plan({"model": "m"}, 2, H200)
    assert opts == {"model": "m", "gpu_memory_utilization": plan["gpu_memory_utilization"],
                    "max_num_batched_tokens": 32768, "llm_kwargs": {"compilation_config": plan["compilation_config"]}}
    mine = {"model": "m", "llm_kwargs": {"compilation_config": {"cudagraph_capture_sizes": [1, 2]}}}
    assert apply_memory_plan(mine, 2, H200)[0]["llm_kwargs"] == mine["llm_kwargs"]  # the caller's graphs win
    mine = {"model": "m", "gpu_memory_utilization": 0.3, "max_num_batched_tokens": 8192, "enforce_eager": True,
            "max_num_seqs": 256}
    opts, plan = apply_memory_plan(mine, 4, H200)
    assert opts == mine  # nothing overridden, no graphs for an eager engine
    assert plan["max_num_batched_tokens"] == 8192 and plan["compilation_config"]["cudagraph_capture_sizes"][-1] == 256
