"""engine_bench on the CPU: answered-only rates, invalid rows, targets, and the cpu and rayK phases run
end to end (a fake vLLM in process; simulated engines in Ray actors on logical GPUs)."""

import pytest
from test_engine_vllm_cpu import FakeLLM, fake_vllm, fast_vllm  # noqa: F401 - fixtures

from benchmarks import engine_bench as eb
from densify.engines.base import Completion


def comps(ok: int, bad: int = 0):
    good = [Completion("<answer>1</answer>", None, 800, 12, 730) for _ in range(ok)]
    return good + [Completion("", error="vllm engine died while generating (EngineDeadError)") for _ in range(bad)]


def test_rate_counts_answered_queries_and_errors_make_a_row_invalid():
    row = eb.summarize("x", comps(900, 100), 1.0, 7.8e14, engines_per_gpu=3)
    assert row["queries_per_s"] == 900 and row["answered"] == 900 and row["queries"] == 1000
    assert row["valid"] is False and "100 of 1000" in row["invalid_reason"] and "EngineDead" in row["invalid_reason"]
    assert row["engines_per_gpu"] == 3 and row["generated_tokens_per_query"] == 12
    assert row["share_of_ceiling"] == pytest.approx(900 / row["ceiling_queries_per_s"], abs=1e-3)
    ok = eb.summarize("y", comps(500), 0.5, 7.8e14)
    assert ok["valid"] is True and ok["queries_per_s"] == 1000 and "invalid_reason" not in ok
    none = eb.summarize("z", comps(0, 5), 1.0, 7.8e14)
    assert none["valid"] is False and none["queries_per_s"] is None


def test_targets_use_valid_ray_rows_at_12_tokens():
    rows = [dict(eb.summarize("ray2: (a)", comps(950), 1.0, 7.8e14, engines_per_gpu=2), ray={}, dtype="bf16",
                 answer_tokens=12),
            dict(eb.summarize("ray3: (a)", comps(1200, 10), 1.0, 7.8e14, engines_per_gpu=3), ray={}, dtype="bf16",
                 answer_tokens=12),
            dict(eb.summarize("ray2+fp8: (a)", comps(1400), 1.0, 7.8e14, engines_per_gpu=2), ray={}, dtype="fp8",
                 answer_tokens=12)]
    result = {"rows": rows}
    eb.derive(result)
    s = result["summary"]
    assert s["target_bf16_ray_pool_12_tokens"].startswith("950 answered q/s with 2") and s[
        "target_bf16_ray_pool_12_tokens"].endswith(": met")
    assert s["target_fp8_ray_pool_12_tokens"].endswith("NOT met")
    assert s["invalid_rows"] == ["ray3: (a)"]


def test_cpu_phase_measures_each_cut_alone(fast_vllm):  # noqa: F811
    rows = eb.vllm_phase("cpu", "/m", dict(eb.BASE_OPTS), 7.8e14, {"cpu"}, {}, stream_images=2)
    cuts = [r.get("cpu_cut") for r in rows]
    assert cuts == ["baseline", "detokenize=False", "mm_uuids=False", "baseline again", "baseline"]
    assert all(r["valid"] and r["answered"] == 2 * 3072 for r in rows)
    llm = FakeLLM.instances[-1]
    params = [p for _, _, p in llm.llm_engine.added + llm.enqueued]
    assert {p.kw.get("detokenize", True) for p in params} == {True, False}
    assert {p.kw["max_tokens"] for p in params} == {12, 30}


def test_ray_phase_on_logical_gpus():
    ray = pytest.importorskip("ray")
    from densify.sim.engine import SimulatedEngine

    def factory(profile, **options):  # the vLLM options are not the simulated engine's
        from densify.sim.truth import ConstantTruth

        return SimulatedEngine(profile, truth=ConstantTruth(3.0))

    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        rows = eb.ray_phase("ray2", "/m", dict(eb.BASE_OPTS), 7.8e14, 2, {}, 2, engine=factory)
    finally:
        ray.shutdown()
    assert [r["answer_tokens"] for r in rows] == [12, 30]
    assert all(r["engines_per_gpu"] == 2 and r["ray"]["engines_per_gpu"] == 2 for r in rows)
    assert all(r["answered"] == 4 * 3072 for r in rows)  # at least 2 images per engine
    assert rows[0]["memory_plan"]["gpu_memory_utilization"] < 0.45 and rows[0]["dtype"] == "bf16"
    assert "gpu_memory_utilization" not in rows[0]["engine_options"] and rows[0]["engine_options"]["min_tokens"] == 30


def test_pyspy_summary(tmp_path):
    f = tmp_path / "spy.txt"
    f.write_text('process 1:"ray::_EngineActor";thread (0x1);run (a.py:1);step (b.py:2) 30\n'
                 'process 1:"ray::_EngineActor";thread (0x1);run (a.py:1) 10\n'
                 'process 2:"VLLM::EngineCore";thread (0x2);busy (c.py:3);schedule (d.py:4) 60\n')
    top = eb.pyspy_top(str(f))
    core, actor = top['process 2:"VLLM::EngineCore"'], top['process 1:"ray::_EngineActor"']
    assert core["samples"] == 60 and core["self"] == [("schedule (d.py:4)", 1.0)]
    assert actor["self"][0] == ("step (b.py:2)", 0.75) and actor["inclusive"][0] == ("run (a.py:1)", 1.0)


def test_best_options_are_those_of_the_fastest_valid_bf16_pool_row(tmp_path):
    import json

    def row(qps, extra, valid=True, dtype="bf16", tokens=12):
        return {"variant": "rayK", "ray": {"engines_per_gpu": 2}, "valid": valid, "dtype": dtype, "answer_tokens": tokens,
                "queries_per_s": qps, "engine_options": dict(eb.BASE_OPTS, min_tokens=30, **extra)}

    rows = [row(630, {}), row(800, {"cascade_attention": True, "queries_in_flight": 0}),
            row(990, {"queries_in_flight": 1}, valid=False), row(1400, {"quantization": "fp8"}, dtype="fp8"),
            row(900, {"queries_in_flight": 2}, tokens=30)]
    (tmp_path / "a.json").write_text(json.dumps({"rows": rows[:3]}))
    (tmp_path / "b.json").write_text(json.dumps({"rows": rows[3:]}))
    assert eb.best_options([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == {
        "cascade_attention": True, "queries_in_flight": 0}
    assert eb.best_options([str(tmp_path / "b.json")]) == {}


def test_depthlm_phase_sends_exactly_marked_images(fast_vllm):  # noqa: F811
    """The depthlm phase on a fake vLLM: the depthlm profile's chat and the release's marker, every query
    its own image (one of 9 red pixels changed from the unmarked photo), answered rows at 12 and 30 tokens."""
    import numpy as np

    from densify.config.profiles import load_profile
    from densify.io.cameras import prepare_image

    rows = eb.depthlm_phase("/m", 7.8e14, {}, n_queries=20)
    assert [r["answer_tokens"] for r in rows] == [12, 30]
    assert all(r["valid"] and r["answered"] == 20 and r["images_sent"] == 20 and r["profile"] == "depthlm"
               for r in rows)
    r = rows[0]
    assert r["flop_per_query"] == pytest.approx(2 * eb.PIXTRAL_PARAMS * (r["uncached_prompt_tokens_per_query"]
                                                                        + r["generated_tokens_per_query"]))
    llm = FakeLLM.instances[-1]
    dlm = load_profile("depthlm")
    rgb, cam = eb.photo(102)  # the first measured image of the phase (state starts at 100, warm-up 101)
    prep = prepare_image(rgb, cam, **dlm.preprocess.image_options())
    sent = [p for _, p, _ in llm.enqueued if p["multi_modal_data"]["image"][0].size == (750, 562)]
    assert len(sent) >= 20 + 32
    measured = [p for p in sent[32:52]]
    for p in measured:
        assert p["prompt"].endswith(dlm.question.template + "<|im_end|>\n<|im_start|>assistant\n")
        assert "system" not in p["prompt"]  # no system message
        diff = np.argwhere(np.any(np.asarray(p["multi_modal_data"]["image"][0]) != prep.pixels, axis=2))
        assert len(diff) == 9
