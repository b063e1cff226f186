"""The multi-GPU scaling script (issue: needs a multi-GPU host) keeps working: run it on CPU actors."""

import json

import pytest

pytest.importorskip("ray")


def test_scaling_bench_runs_on_cpu_actors(tmp_path):
    from benchmarks.scaling_bench import main

    assert main(["--engine", "simulated", "--gpus", "1", "--images", "2", "--out", str(tmp_path)]) == 0
    (res,) = tmp_path.glob("scaling_bench-simulated-*.json")
    rows = json.loads(res.read_text())["rows"]
    assert rows[0]["queries"] == 2 * 3072 and rows[0]["engine_errors"] == 0 and rows[0]["efficiency"] == 1.0
    assert rows[0]["valid"] is True and rows[0]["answered"] == 2 * 3072 and rows[0]["engines_per_gpu"] == 1
    # the row fields engine_bench has (no GPU here: no busy share or memory)
    assert {"share_of_ceiling", "gpu_busy_share", "memory_per_engine_gib", "generated_tokens_per_query"} <= set(rows[0])
    assert rows[0]["gpu_busy_share"] is None and rows[0]["memory_plan"] is None


def test_vllm_answers_are_forced_to_the_benchmark_length():
    # the first H200 run used the profile's max_tokens with ignore_eos, so every answer ran to that limit
    from benchmarks.scaling_bench import GEN_TOKENS, bench_sampling, make_batches
    from densify.config.profiles import load_profile

    prof = load_profile("vlm3-depth")
    (b,) = make_batches(1, prof, sampling=bench_sampling(prof, "vllm"))
    assert b.sampling.max_tokens == GEN_TOKENS == 12
    assert bench_sampling(prof, "simulated").max_tokens == prof.question.max_tokens


def test_every_image_has_its_own_pixels():
    """Engines key their image and prefix caches on pixel content: copies of one image under other ids
    would be answered from the cache (the first H200 run of 2026-11-30 measured that, not the engine)."""
    from benchmarks.scaling_bench import make_batches
    from densify.config.profiles import load_profile
    from densify.engines.base import PromptImage

    prof = load_profile("vlm3-depth")
    batches = make_batches(3, prof) + make_batches(2, prof, tag_prefix="warm", first=10_000)
    hashes = {PromptImage.content_uid(img.pixels) for b in batches for img in b.images.values()}
    assert len(hashes) == 5
