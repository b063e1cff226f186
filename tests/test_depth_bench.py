"""benchmarks/depth_bench.py without a GPU: the depth config its GPU mode writes, with dummy weights and with
a fixed-answer model folder (--answer), the rows it makes of a summary, and README's table from committed results."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from benchmarks.depth_bench import gpu_config, row  # noqa: E402
from densify.config.profiles import load_profile  # noqa: E402
from densify.queries.answers import parse_text  # noqa: E402
from densify.queries.forcing import ForcingEngine  # noqa: E402
from densify.sim.engine import SimulatedEngine  # noqa: E402
from densify.stages.settings import DepthConfig  # noqa: E402

ANSWER = "Depth: 2.50 m"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from densify.synthetic.models import build_model_folder

    return build_model_folder(tmp_path_factory.mktemp("answer"), shape="tiny", answer=ANSWER)


def test_the_forced_gpu_config_uses_the_weights_and_declares_the_answer(folder, tmp_path):
    cfg, what = gpu_config(tmp_path, str(folder), ANSWER)
    opts = cfg["engine"]["options"]
    assert cfg["engine"]["name"] == "ray" and opts["engine"] == "vllm" and opts["ray_address"] == "local"
    assert opts["engine_options"] == {"model": str(folder)}  # the saved weights, not load_format dummy
    assert cfg["structured"] is False and "forcing" not in cfg and "plan" not in cfg  # the defaults: forcing auto
    assert repr(ANSWER) in what and "forcing auto" in what
    depth = DepthConfig(**cfg)
    assert depth.forcing.mode == "auto" and depth.plan.count == "auto"
    prof = load_profile(cfg["profile"])
    vlm3 = load_profile("vlm3-depth")
    assert prof.question.template == vlm3.question.template and prof.suffix == vlm3.suffix  # the prompt unchanged
    assert prof.question.answer_format == "Depth: {d} m" and prof.question.structured_regex is None
    assert not prof.question.learn_answer_format
    forcing = ForcingEngine(SimulatedEngine(prof), prof)
    assert forcing.active and (forcing.fmt.head, forcing.fmt.stop) == ("Depth: ", " m")
    assert parse_text(prof.question, ANSWER).value == 2.5 and parse_text(prof.question, "2.50").value is None


def test_the_forced_gpu_config_refuses_a_folder_built_for_another_answer(folder, tmp_path):
    with pytest.raises(SystemExit, match=r"built for the answer 'Depth: 2.50 m', not 'Depth: 3.00 m'; build it "
                                         r"with: densify make-model .* --answer 'Depth: 3.00 m'"):
        gpu_config(tmp_path, str(folder), "Depth: 3.00 m")
    with pytest.raises(SystemExit, match="not a fixed-answer folder"):
        gpu_config(tmp_path, str(tmp_path), ANSWER)


def test_the_dummy_gpu_config_is_as_before(tmp_path):
    cfg, what = gpu_config(tmp_path, "/m")
    assert cfg["engine"]["options"]["engine_options"] == {"model": "/m", "load_format": "dummy"}
    assert cfg["structured"] is True and "dummy weights" in what
    assert load_profile(cfg["profile"]).question.structured_regex.startswith("<think> </think><answer>")


def test_rows_say_whether_forcing_was_active_and_how_the_audit_agreed():
    s = {"queries": 128, "answer_failures": {}, "ok": 1, "failed": 0, "wall_s": 2.0, "command_s": 5.0,
         "plan": {"queries_per_image": {"mean": 128}, "stops": {"precise": 1}},
         "forcing": {"active": True, "forced_queries": 128, "audited": 4, "agreed": 4, "agreement": 1.0,
                     "same_text": 4, "retried_unforced": 0, "off_reason": None}}
    r = row(s, 1, 0.5)
    assert r["timeline"] is None  # summaries from before the timeline
    assert row(dict(s, timeline={"maps": 1, "first_map_s": 2.0, "last_map_s": 2.0}), 1)["timeline"]["maps"] == 1
    assert r["forcing"] is True and r["forcing_audit"]["agreement"] == 1.0 and r["forcing_audit"]["audited"] == 4
    assert r["valid"] and r["gpu_busy_share"] == 0.5 and r["startup_s"] == 3.0
    s.pop("forcing")
    assert row(s, 1)["forcing"] is None and "forcing_audit" not in row(s, 1)


def test_the_forced_gpu_mode_end_to_end_with_the_command_faked(folder, tmp_path, monkeypatch):
    """main() --model --answer: the config it hands `densify depth` (read back from the file), one row per
    run, and whether forcing held to the end (`forced_throughout`); no GPU, `densify depth` faked."""
    import json

    import yaml

    import benchmarks.depth_bench as db

    seen = []

    def fake_run(images, out, config, env):
        seen.append(yaml.safe_load(config.read_text()))
        n = len(images)
        return {"queries": 1536 * n, "answer_failures": {}, "ok": n, "failed": 0, "wall_s": 3.0 * n, "command_s": 9.0,
                "plan": {"queries_per_image": {"mean": 1536}, "stops": {"precise": n}},
                "forcing": {"active": True, "forced_queries": 1536 * n, "audited": 16 * n, "agreed": 16 * n,
                            "agreement": 1.0, "same_text": 16 * n, "retried_unforced": 0,
                            "off_reason": "audit: 0 of 8" if n > 1 else None}}

    monkeypatch.setattr(db, "run_depth", fake_run)
    monkeypatch.setattr(db, "_gpu_sampler", lambda: None)
    assert db.main(["--model", str(folder), "--answer", ANSWER, "--images", "2", "--one", "1",
                    "--out", str(tmp_path), "--name", "r.json"]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    rec = res["presets"]["declared-answer"]
    assert [c["structured"] for c in seen] == [False, False] and "load_format" not in json.dumps(seen)
    assert rec["one_at_a_time"][0]["forcing"] is True and rec["streamed"]["forcing_audit"]["audited"] == 32
    assert rec["valid"] and rec["forced_throughout"] is False  # the streamed run's audit turned forcing off
    assert "real weights answering" in res["engine"]
    with pytest.raises(SystemExit):
        db.main(["--answer", ANSWER])  # the GPU mode only


def test_table_rows_come_from_the_committed_results():
    from benchmarks import depth_bench as db

    results = Path(__file__).parents[1] / "benchmarks" / "results"
    gpu = db.table_rows(results / "depth_bench-gpu-H200-20261203.json")
    assert len(gpu) == 1
    assert gpu[0]["s per map streamed"] == "4.49 (8 images)" and gpu[0]["s per map one at a time"] == "13.54 (1)"
    assert gpu[0]["busy streamed"] == "0.64" and gpu[0]["forcing"] == "off" and gpu[0]["queries per map"] == "1536"
    cpu = {r["errors"]: r for r in db.table_rows(results / "depth_bench-cpu-paced652x2-20261203.json")}
    assert cpu["structured"]["s per map streamed"] == "2.62 (8 images)" and cpu["structured"]["busy streamed"] == "0.91"
    assert cpu["iid"]["queries per map"] == "1536-4096" and cpu["iid"]["valid"] == "yes"
    table = db.markdown_table([results / "depth_bench-gpu-H200-20261203.json"]).splitlines()
    assert len(table) == 3 and table[0].startswith("| file | engine |")


def test_the_table_gives_the_first_map_where_the_summary_has_a_timeline(tmp_path):
    import json

    from benchmarks import depth_bench as db

    st = {"images": 8, "s_per_map": 3.5, "queries_per_image": {"mean": 1536}, "forcing": True,
          "timeline": {"maps": 8, "first_map_s": 11.04, "last_map_s": 27.7}}
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"engine": "e", "presets": {"p": {"streamed": st, "one_at_a_time": [], "valid": True}}}))
    assert db.table_rows(f)[0]["first map streamed"] == "11.0 s"
    st.pop("timeline")  # results from before the timeline
    f.write_text(json.dumps({"engine": "e", "presets": {"p": {"streamed": st, "one_at_a_time": [], "valid": True}}}))
    assert db.table_rows(f)[0]["first map streamed"] == "-"
