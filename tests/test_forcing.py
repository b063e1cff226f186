"""Forced answers (densify.queries.forcing): the fixed text around the number is appended to the assistant turn,
the engine stops after the number, the answer is completed, and an audit turns forcing off when it disagrees."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from densify.config.answer_format import AnswerFormat
from densify.config.profiles import load_profile
from densify.engines.base import Completion, EngineBatch, Query, Sampling
from densify.queries.forcing import ForcingEngine, ForcingSettings
from densify.sim.engine import SimulatedEngine
from test_engine_vllm_cpu import fake_vllm  # noqa: F401 - fixture

DEPTHLM = "<think> The point is around {d:.2f} meters away from the camera. </think>\n\n<answer> {d:.2f} </answer>"


def test_declared_format_splits_into_head_stop_and_tail():
    f = AnswerFormat.parse(DEPTHLM)
    assert f.head == "<think> The point is around "
    assert f.stop == " m"  # the tail's first character ends the number (one token later at most)
    whole = "<think> The point is around 3.42 meters away from the camera. </think>\n\n<answer> 3.42 </answer>"
    assert f.complete("3.42") == whole  # the number repeated where the format repeats it
    assert f.complete("far") == f.head + "far"  # not a lone number: left for the parser to reject
    assert AnswerFormat.parse(load_profile("depthlm").question.answer_format) == f
    with pytest.raises(ValueError):
        AnswerFormat.parse("no number here")
    with pytest.raises(ValueError):
        AnswerFormat.parse("{a} and {b}")


def test_formats_are_learned_from_answers():
    texts = [f"<think> The point is around {d} meters away from the camera. </think>\n\n<answer> {d} </answer>"
             for d in ("3.42", "1.07", "12.50")]
    f = AnswerFormat.learn(texts)
    assert f == dataclasses.replace(AnswerFormat.parse(DEPTHLM), source="learned")
    g = AnswerFormat.learn(["<think> </think><answer>3.42</answer>", "<think> </think><answer>0.5</answer>"])
    assert (g.head, g.tail, g.stop) == ("<think> </think><answer>", ("</answer>",), "<")
    # the thinking differs: only the common start is fixed, forced without a stop
    h = AnswerFormat.learn(["<think> a wall </think><answer>3.4</answer>", "<think> a floor </think><answer>2</answer>"])
    assert (h.head, h.tail, h.stop) == ("<think> a ", (), None)
    assert h.complete("wall </think><answer>3.4</answer>") == "<think> a wall </think><answer>3.4</answer>"
    assert AnswerFormat.learn(["3.42", "1.0"]) is None  # nothing fixed before the number


# ---------------------------------------------------------------------------------------------- pipeline
def _scene(tmp_path, n=2):
    from densify.io.images import discover
    from densify.synthetic.scenes import SceneSpec, make_scene

    make_scene(SceneSpec(seed=3, n_views=n, width=240, height=180)).save(tmp_path / "scene")
    return discover([str(tmp_path / "scene")])


def test_learned_forcing_gives_the_unforced_maps(tmp_path):
    """VLM3-depth publishes no answer text: the job learns it from its first answers, forces it, audits it,
    and the maps are those of unforced answers (the simulator answers a forced prompt as a model that
    writes that text would)."""
    from densify.stages.summary import run_depth
    from densify.stages.settings import DepthConfig

    sources = _scene(tmp_path)
    out = {}
    for mode in ("auto", "off"):
        eng = SimulatedEngine("vlm3-depth", seed=1)
        seen = []
        gen = eng.generate
        eng.generate = lambda b, gen=gen, seen=seen: (seen.append(b.sampling), gen(b))[1]
        cfg = DepthConfig(engine={"name": "simulated"}, forcing={"mode": mode}, outputs={"ply": False})
        summary, res = run_depth(sources, cfg, eng, None, keep_maps=True)
        out[mode] = (summary, res, seen)
    s, res, seen = out["auto"]
    f = s["forcing"]
    assert f["active"] and f["format"]["source"] == "learned"
    assert f["format"]["head"] == "<think> </think><answer>" and f["format"]["stop"] == "<"
    assert f["forced_queries"] > 0 and f["audited"] >= 8 and f["agreement"] == 1.0 and f["off_reason"] is None
    assert any(sp.prefill == "<think> </think><answer>" and sp.stop == ("<",) for sp in seen)
    assert "forcing" not in out["off"][0] and all(sp.prefill is None for sp in out["off"][2])
    for a, b in zip(res, out["off"][1]):
        assert a.queries == b.queries
        np.testing.assert_array_equal(a.depth, b.depth)
        np.testing.assert_array_equal(a.answers.values, b.answers.values)
        assert a.answers.texts == b.answers.texts  # whole answers; the unparseable ones asked again unforced
    assert f["retried_unforced"] > 0  # the simulator's unparseable answers (1%)


class _Stubborn(SimulatedEngine):
    """Writes another number when its answer is forced: the audit must notice."""

    def generate(self, batch):
        out = super().generate(batch)
        if batch.sampling.prefill:
            out = [dataclasses.replace(c, text=batch.sampling.prefill + "9.99") for c in out]
        return out


def test_audit_disagreement_turns_forcing_off(tmp_path):
    from densify.stages.summary import run_depth
    from densify.stages.settings import DepthConfig

    sources = _scene(tmp_path, n=3)
    eng = _Stubborn("vlm3-depth", seed=0)
    seen = []
    gen = eng.generate
    eng.generate = lambda b: (seen.append(b.sampling.prefill), gen(b))[1]
    cfg = DepthConfig(engine={"name": "simulated"}, forcing={"mode": "auto", "min_audits": 8},
                      outputs={"ply": False})
    summary, res = run_depth(sources, cfg, eng, None)
    f = summary["forcing"]
    assert not f["active"] and f["off_reason"].startswith("audit: 0 of")
    assert f["agreement"] == 0.0 and f["forced_before_off"] == f["forced_queries"] > 0
    assert f["disagreements"] and f["disagreements"][0]["forced"].endswith("9.99</answer>")
    first_off = len(seen) - 1 - seen[::-1].index("<think> </think><answer>")
    assert all(p is None for p in seen[first_off + 1:]) and len(seen) > first_off + 1  # the rest unforced
    assert all(r.ok for r in res)


def test_forcing_stays_off_without_a_format_or_with_structured_decoding(tmp_path):
    prof = load_profile("vlm3-corr")
    eng = ForcingEngine(SimulatedEngine(prof), prof)
    assert not eng.active and "does not allow learning" in eng.report()["off_reason"]
    depth = load_profile("depthlm")
    inner = SimulatedEngine(depth)
    forced = ForcingEngine(inner, depth, ForcingSettings())
    assert forced.active and forced.fmt.source == "declared"
    batch = EngineBatch({}, [Query("x", ())], Sampling(structured_regex="x"))
    assert forced._split(batch, {})[0].tag[1] == "plain"


# ---------------------------------------------------------------------------------------------- hf, a real model
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CANDIDATES = ["Depth: 2.5 m", "Depth=2.5 m", "Depth: 7.25 m", "depth 2.5 m", "D: 2.5 m"]
TOKEN_END = 151645  # <|im_end|>


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The tiny Qwen3-VL made to answer a fixed text (densify.synthetic.models, answer=...)."""
    from densify.synthetic.models import build_model_folder

    base = tmp_path_factory.mktemp("chain")
    for i, answer in enumerate(CANDIDATES):
        try:
            return build_model_folder(base / f"m{i}", shape="tiny", seed=0, answer=answer), answer
        except ValueError as exc:
            assert repr(answer) in str(exc)
    pytest.fail(f"none of {CANDIDATES} tokenizes without a repeated token")


def test_a_fixed_answer_with_a_repeated_token_is_refused_by_name(tmp_path):
    """A model that sees only its last token cannot write `>` before `2` and later before end-of-turn."""
    from densify.synthetic.models import answer_chain, build_model_folder

    folder = build_model_folder(tmp_path / "m", shape="tiny", save_weights=False)
    bad = "<think> </think><answer>2.50</answer>"
    with pytest.raises(ValueError, match=r"fixed answer '<think> </think><answer>2\.50</answer>': token '>' is "
                                         r"followed by different tokens"):
        answer_chain(folder, bad)
    with pytest.raises(ValueError, match="repeated token"):
        build_model_folder(tmp_path / "w", shape="tiny", answer=bad)
    assert not list((tmp_path / "w").glob("*.safetensors")) and not (tmp_path / "w" / "fixed_answer.json").exists()
    nxt = answer_chain(folder, "Depth: 2.5 m")  # the generation prompt's last token, then the answer, then the end
    assert len(nxt) == len(set(nxt)) and TOKEN_END in nxt.values() and TOKEN_END not in nxt


def _profile(tmp_path, answer: str, fmt: str | None = None):
    from benchmarks.pipeline_bench import declared_answer_profile

    return load_profile(declared_answer_profile(tmp_path, answer, fmt))


def _batch(profile, n=6):
    from densify.io.cameras import Camera, prepare_image
    from densify.queries.plan import plan_queries
    from densify.queries.prompts import depth_batch

    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    prep = prepare_image(rgb, Camera(1000.0, 1000.0, 32.0, 24.0, 64, 48), focal=1000.0, coord_range=2000)
    pts = np.stack([np.linspace(3, 60, n), np.linspace(3, 44, n)], 1).astype(int)
    b = depth_batch(prep, plan_queries(pts, prep.pixel_map), profile, uid="img0")
    b.sampling = dataclasses.replace(b.sampling, max_tokens=24)
    return b


def check_forced_is_free(eng, prof, answer: str, number: str) -> dict:
    """Free answers are `answer`; forced ones the same text; forced without completion they stop after the
    number, with fewer generated tokens. The forcing report."""
    batch = _batch(prof)
    free = eng.generate(batch)
    assert [c.text for c in free] == [answer] * len(free)
    forcing = ForcingEngine(eng, prof, ForcingSettings(audit_min=2, min_audits=2))
    forced = forcing.generate(batch)
    assert [c.text for c in forced] == [c.text for c in free]
    r = forcing.report()
    assert r["agreement"] == 1.0
    raw = eng.generate(_with(batch, prefill=forcing.fmt.head, stop=(forcing.fmt.stop,)))
    assert [c.text for c in raw] == [forcing.fmt.head + number] * len(raw)  # stopped after the number
    assert max(c.n_generated_tokens for c in raw) < min(c.n_generated_tokens for c in free)
    return r


def test_forcing_is_exact_on_a_model_that_writes_the_declared_text(chain, tmp_path):
    """A real transformer (the tiny Qwen3-VL, made to answer a fixed text) through the hf engine: the
    forced answers are the model's free answers, byte for byte, with fewer generated tokens."""
    from densify.config.answer_format import NUMBER
    from densify.engines import create_engine

    folder, answer = chain
    number = NUMBER.search(answer).group()
    fmt = answer.replace(number, "{d}")
    prof = _profile(tmp_path, answer)
    assert prof.question.answer_format == fmt and prof.question.structured_regex is None
    eng = create_engine("hf", profile=prof, model=str(folder), device="cpu", batch_size=4)
    try:
        r = check_forced_is_free(eng, prof, answer, number)
        assert r["active"] and r["audited"] == 2 and r["same_text"] == 2
        # a declared text the model does not write: the audit sees other numbers and forcing goes off
        wrong = ForcingEngine(eng, _profile(tmp_path, answer, fmt.replace("{d}", "-{d}")),
                              ForcingSettings(audit_min=3, min_audits=3))
        batch = _batch(prof)
        out = wrong.generate(batch)
        rw = wrong.report()
        assert not rw["active"] and rw["agreed"] == 0 and rw["off_reason"].startswith("audit: 0 of 3")
        assert [out[i].text for i in (0, 5)] == [answer, answer]  # audited queries keep the free answer
        assert all(p.sampling.prefill is None for p in [wrong._split(batch, {})[0]])
    finally:
        eng.close()


def test_densify_depth_forces_the_declared_answer_of_a_fixed_answer_model(chain, tmp_path):
    """`densify depth` on the hf engine with the fixed-answer tiny model and that answer declared (what
    depth_bench --answer runs on the GPU): every query forced from the first batch, the audit at 100%, the map
    the answer's constant depth, and the stopping rule stops `precise` (the answers agree exactly)."""
    import cv2

    from benchmarks.pipeline_bench import declared_answer_profile
    from densify.config.answer_format import NUMBER
    from pipelines.cli import main

    folder, answer = chain
    depth = float(NUMBER.search(answer).group())
    prof = declared_answer_profile(tmp_path, answer)
    img = tmp_path / "room.png"
    cv2.imwrite(str(img), np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    out = tmp_path / "out"
    rc = main(["depth", str(img), "--out", str(out), "--profile", str(prof), "--engine", "hf", "--model", str(folder),
               "--intrinsics", "1000,1000,80,60", "--set", "engine.options.device=cpu",
               "--set", "engine.options.batch_size=32", "--set", "outputs.ply=false",
               "--set", "plan.auto.floor=64", "--set", "plan.auto.round=32"])  # the tiny shape's share of a map
    s = json.loads((out / "summary.json").read_text())
    assert rc == 0 and s["ok"] == 1 and not s["answer_failures"], s
    f = s["forcing"]
    assert f["active"] and f["format"]["source"] == "declared" and f["off_reason"] is None
    assert f["forced_queries"] == s["queries"] and f["retried_unforced"] == 0
    assert f["audited"] >= 2 and f["agreed"] == f["audited"] == f["same_text"] and f["agreement"] == 1.0
    assert s["plan"]["stops"] == {"precise": 1} and 64 < s["queries"] <= 64 + 2 * 32, s  # the minimum rounds
    recs = [json.loads(line) for line in (out / "room" / "answers.jsonl").read_text().splitlines()]
    assert len(recs) == s["queries"] and {r["text"] for r in recs} == {answer}
    d = np.load(out / "room" / "depth.npy")
    np.testing.assert_allclose(d[d > 0], depth, rtol=1e-5)
    assert (d > 0).mean() > 0.95


def test_make_model_writes_a_fixed_answer_folder_and_refuses_a_repeating_answer(tmp_path, capsys):
    from densify.synthetic.models import fixed_answer_of
    from pipelines.cli import main

    assert main(["make-model", str(tmp_path / "ok"), "--answer", "Depth: 7.25 m"]) == 0
    assert "answering 'Depth: 7.25 m'" in capsys.readouterr().out
    assert fixed_answer_of(tmp_path / "ok") == "Depth: 7.25 m"
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["text_config"]["tie_word_embeddings"] is False
    assert main(["make-model", str(tmp_path / "bad"), "--answer", "<answer>1</answer>"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("densify make-model: error: make-model --answer: fixed answer "
                                               "'<answer>1</answer>': token")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def _with(batch: EngineBatch, **sampling) -> EngineBatch:
    return EngineBatch(batch.images, batch.queries, dataclasses.replace(batch.sampling, **sampling), batch.tag)


def test_openai_request_carries_the_head_and_the_stop():
    from densify.engines.openai import OpenAIEngine

    eng = OpenAIEngine.__new__(OpenAIEngine)  # only the request builder: no server
    eng.model, eng.send_uuids, eng.structured_field, eng.extra_body = "m", False, "structured_outputs", {}
    q = Query("how far?", ())
    body = eng.request_body(EngineBatch({}, [q], Sampling(prefill="<answer>", stop=("<",))), q)
    assert body["messages"][-1] == {"role": "assistant", "content": "<answer>"}
    assert body["continue_final_message"] and body["stop"] == ["<"]
    comp = eng._completion({"choices": [{"message": {"content": "3.42"}}]}, Sampling(prefill="<answer>"))
    assert comp.text == "<answer>3.42" and isinstance(comp, Completion)


def test_store_keys_of_stop_strings_only_when_set():
    from densify.engines.store import _sampling_tuple

    assert _sampling_tuple(Sampling()) == [256, None, None, None, False]  # answers stored earlier still match
    assert _sampling_tuple(Sampling(stop=("<",)))[-1] == ["<"]
    assert json.dumps(_sampling_tuple(Sampling(prefill="a", stop=(" m",))))


def test_vllm_requests_carry_the_head_and_the_stop(fake_vllm):  # noqa: F811
    """The vllm engine (vLLM faked on the CPU): the head ends the rendered prompt, the stop string reaches
    SamplingParams, and the answer starts with the head (as the forcing wrapper expects)."""
    import test_engine_vllm_cpu as tv

    eng = tv.make(fake_vllm)
    s = Sampling(max_tokens=16, prefill="<think> </think><answer>", stop=("<",))
    outs = eng.generate(tv.depth_batch(3, sampling=s))
    llm = tv.FakeLLM.instances[-1]
    _, prompt, params = llm.enqueued[0]
    assert params.kw["stop"] == ["<"] and params.kw["max_tokens"] == 16
    assert prompt["prompt"].endswith("<|im_start|>assistant\n<think> </think><answer>")
    assert all(c.text.startswith("<think> </think><answer>") for c in outs)
