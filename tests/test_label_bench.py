"""label_bench on a tiny job: the whole run, and --engine-rate (paced simulated engines, CPU of every process)."""

import json

import pytest

from benchmarks import label_bench as lb


def test_engine_rate_paces_the_job_and_reports_the_cpu_of_every_process(tmp_path):
    pytest.importorskip("ray")
    rep = lb.main(["--images", "3", "--count", "64", "--engine-rate", "500", "--actors", "1", "--cpu-workers", "1",
                   "--no-resume", "--results", str(tmp_path), "--tag", "tiny", "--out", str(tmp_path / "work")])
    saved = json.loads((tmp_path / rep["results_file"].rsplit("/", 1)[1]).read_text())
    r = saved["rate"]
    assert saved["setup"]["engine_rate"] == 500 and r["per_actor_queries_per_s"] == 500 and r["actors"] == 1
    q = saved["full_job"]["queries"]
    assert 3 * 60 <= q <= 3 * 70 and saved["resume_from_store"] is None  # ~64 a grid image
    # pacing is an upper bound on the rate: q answers at 500/s take at least q / 500 s of the run
    assert r["achieved_queries_per_s"] <= 500 * 1.02 and r["run_s"] >= q / 500 * 0.98
    assert r["ratio"] == pytest.approx(r["achieved_queries_per_s"] / 500) and r["keeps_up"] == (r["ratio"] >= 0.9)
    groups = r["cpu_s_run"]
    assert set(groups) == {"driver", "actors", "workers", "ray_daemons"}
    assert groups["driver"] > 0 and groups["workers"] > 0  # the CPU tasks ran in their own processes
    assert r["cores_per_900qps"] == pytest.approx(sum(groups.values()) / r["run_s"] / (r["achieved_queries_per_s"]
                                                                                        / 900))


def test_engine_rate_without_ray(tmp_path):
    rep = lb.main(["--images", "2", "--count", "64", "--engine-rate", "400", "--no-ray", "--no-resume",
                   "--results", str(tmp_path)])
    r = rep["rate"]
    assert r["actors"] == 1 and r["achieved_queries_per_s"] <= 400 * 1.02
    assert r["cpu_s_run"]["actors"] == 0 and r["cpu_s_run"]["workers"] == 0


def test_sampler_interpolates_between_samples():
    s = lb.CpuSampler.__new__(lb.CpuSampler)
    s.kind, s.base = {1: "driver", 2: "actors"}, {1: 0.0, 2: 0.0}
    # pid 2 was an idle Ray worker at first, then an actor: it counts as an actor throughout
    s.series = [(0.0, {1: 0.0}, 0.0, 0.0), (1.0, {1: 2.0, 2: 1.0}, 0.0, 2.0), (2.0, {1: 2.0, 2: 1.0}, 0.0, 4.0)]
    w = s.window(0.5, 1.5)
    assert w["driver"] == 1.0 and w["actors"] == 0.5 and w["workers"] == 0 and w["machine_busy"] == 2.0
    assert s.window(-1, 5)["driver"] == 2.0
