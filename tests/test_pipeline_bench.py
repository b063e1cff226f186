"""benchmarks/pipeline_bench on CPU actors (the simulated engine stands in for vllm): every step runs on
distinct images, answers parse, and the report compares the label job with the engine alone."""

import json

import pytest

pytest.importorskip("ray")

from benchmarks import pipeline_bench as pb  # noqa: E402
from densify.engines.ray_pool import RayPoolEngine  # noqa: E402
from densify.sim.truth import ConstantTruth  # noqa: E402


def test_pipeline_bench_runs_every_step_on_cpu_actors(tmp_path, monkeypatch):
    made = {}

    def simulated_pool(engine_cfg, profile, *, model=None, ray=None):
        assert engine_cfg.name == "vllm" and ray.enabled and ray.cpu_workers == 1
        assert profile.question.structured_regex == pb.FIXED_ANSWER
        made["pool"] = RayPoolEngine(profile, engine="simulated", engine_options={"truth": ConstantTruth(3.0)},
                                     num_actors=1, max_in_flight_per_actor=2)
        return made["pool"]

    monkeypatch.setattr(pb, "build_engine", simulated_pool)
    assert pb.main(["--model", "unused", "--images", "2", "--cpu-workers", "1", "--out", str(tmp_path),
                    "--name", "p.json"]) == 0
    r = json.loads((tmp_path / "p.json").read_text())
    eng, label, maps = r["steps"]["engine_only"], r["steps"]["label"], r["steps"]["dense_maps"]
    assert eng["valid"] and eng["answered"] == 2 * 3072
    assert label["ok"] == 2 and label["failed"] == 0 and label["queries"] == 2 * 3072
    assert label["ratio_to_engine_only"] == pytest.approx(label["queries_per_s"] / eng["queries_per_s"])
    assert maps["valid"] and maps["plan"]["mode"] == "adaptive" and len(maps["one_at_a_time"]) == 3
    assert [s["ok"] for s in maps["streamed"]] == [2] and maps["streamed"][0]["queries"] > 0
    assert r["pool"]["stats"]["failed_batches"] == 0


def test_pipeline_bench_paced_simulated_engines_measure_dense_maps(tmp_path):
    """--simulated-rate: simulated engines on CPU actors, paced, answering from the depth maps written beside
    the images; the default depth settings (adaptive plan, edge-aware) give a map per image."""
    assert pb.main(["--simulated-rate", "200000", "--actors", "1", "--images", "1", "--skip", "engine,label",
                    "--images-in-flight", "0,5", "--out", str(tmp_path), "--name", "s.json"]) == 0
    r = json.loads((tmp_path / "s.json").read_text())
    maps = r["steps"]["dense_maps"]
    assert r["engine"].startswith("simulated, paced to 200000") and "engine_only" not in r["steps"]
    assert maps["valid"] and maps["plan"]["mode"] == "adaptive" and maps["densify"] == "edge"
    assert [(s["images_in_flight"], s["ok"]) for s in maps["streamed"]] == [(3, 1), (5, 1)]
    assert all(o["queries"] > 0 for o in maps["one_at_a_time"])
