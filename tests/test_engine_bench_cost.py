"""engine_bench's issue-23 phases on the CPU (simulated engines in Ray actors on a logical GPU): the forced
answer length (rayK@T) and the profiled run (profK), whose kernel profile says when no trace was written."""

import pytest

from benchmarks import engine_bench as eb


def test_forced_length_and_profiled_ray_phases():
    ray = pytest.importorskip("ray")

    def _factory(profile, **options):  # defined here: Ray ships it by value; vLLM options are not the simulator's
        from densify.sim.engine import SimulatedEngine
        from densify.sim.truth import ConstantTruth

        return SimulatedEngine(profile, truth=ConstantTruth(3.0))

    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        forced = eb.ray_phase("ray2@5", "/m", dict(eb.BASE_OPTS), 7.8e14, 2, {}, 2, engine=_factory,
                              answer_tokens=5, prefill=eb.FORCED_HEAD, long_tokens=0)
        prof = eb.ray_phase("prof2", "/m", dict(eb.BASE_OPTS, **eb.VARIANTS["chunk64k"]), 7.8e14, 2, {}, 2,
                            engine=_factory, profile_steps=50)
    finally:
        ray.shutdown()
    assert len(forced) == 1 and forced[0]["answer_tokens"] == 5 and forced[0]["forced_head"] == eb.FORCED_HEAD
    assert forced[0]["valid"] and forced[0]["engine_options"]["min_tokens"] == 5
    assert len(prof) == 1 and prof[0]["answer_tokens"] == 12  # the profiled run only (no 30-token run)
    kp = prof[0]["kernel_profile"]
    assert kp["error"].startswith("no trace written") and "0 of 2" in kp["error"]  # simulated engines: no profiler
    opts = prof[0]["engine_options"]
    assert opts["max_num_batched_tokens"] == 65536  # a variant's own value survives the memory plan
    assert opts["llm_kwargs"]["profiler_config"]["profiler"] == "torch"
    assert opts["llm_kwargs"]["profiler_config"]["max_iterations"] == 50
    result = {"rows": forced}
    eb.derive(result)
    assert result["summary"]["target_bf16_ray_pool_forced"].startswith(f"{forced[0]['queries_per_s']:.0f} answered q/s at 5")


def test_phase_names_parse():
    assert set(eb.VARIANTS) >= {"chunk64k", "graphsfull", "async", "noasync", "byimage", "fp8"}
    assert eb.VARIANTS["graphsfull"]["llm_kwargs"]["compilation_config"]["cudagraph_mode"] == "FULL"
