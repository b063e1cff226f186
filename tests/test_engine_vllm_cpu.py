"""The vllm engine on the CPU, against a fake `vllm` module: prompts, image uids, sampling params, the
in-flight policy of `stream`, answer bookkeeping and error handling. No vLLM or GPU needed."""

from __future__ import annotations

import random
import re
import sys
import types

import numpy as np
import pytest

from densify.config.profiles import load_profile
from densify.engines.base import EngineBatch, EngineError, PromptImage, Query, Sampling
from densify.queries.prompts import render_text


class FakeSamplingParams:
    def __init__(self, **kw):
        self.kw = kw
        self.__dict__.update(kw)


class FakeStructured:
    def __init__(self, regex=None, **kw):
        self.regex = regex


SPECIAL = re.compile(r"(<\|[a-z_]+\|>)")


def fake_tokenize(text: str) -> list[int]:
    """Special tokens are single ids; every other character is its code point."""
    out = []
    for piece in SPECIAL.split(text):
        if SPECIAL.fullmatch(piece):
            out.append(1_000_000 + sum(map(ord, piece)))
        else:
            out.extend(ord(c) for c in piece)
    return out


IMAGE_PAD = fake_tokenize("<|image_pad|>")[0]


def expand(ids: list[int], n: int = 5) -> list[int]:
    out = []
    for t in ids:
        out.extend([t] * n if t == IMAGE_PAD else [t])
    return out


class FakeTokenizer:
    """A Qwen-like chat template in plain Python."""

    skew = False  # tokenise lists differently from vLLM's renderer (to test the fallback)

    def __call__(self, texts, add_special_tokens=False):
        one = isinstance(texts, str)
        ids = [fake_tokenize(t) + ([7] if self.skew and not one else []) for t in ([texts] if one else texts)]
        return {"input_ids": ids[0] if one else ids}

    def batch_decode(self, seqs, skip_special_tokens=False):
        self.batch_decodes = getattr(self, "batch_decodes", 0) + 1
        return ["".join(chr(t) for t in ids if t < 1_000_000 or not skip_special_tokens) for ids in seqs]

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        out = ""
        for m in messages:
            out += f"<|im_start|>{m['role']}\n"
            for c in ([{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]):
                out += "<|vision_start|><|image_pad|><|vision_end|>" if c["type"] == "image" else c["text"]
            out += "<|im_end|>\n"
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")


class Out:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class FakeCore:
    def __init__(self, llm):
        self.llm = llm
        self.queue: list = []  # (internal id, prompt, params)
        self.steps = 0
        self.aborted: list = []
        self.max_unfinished = 0
        self.fail_at_step: int | None = None
        self.rng = random.Random(0)
        self.shutdown_called = False
        self.max_per_step = 40
        self.added: list = []

    def has_unfinished_requests(self):
        return bool(self.queue)

    def step(self):
        self.steps += 1
        if self.fail_at_step is not None and self.steps >= self.fail_at_step:
            raise RuntimeError("EngineCore encountered a fatal error: CUDA error: out of memory")
        self.max_unfinished = max(self.max_unfinished, len(self.queue))
        k = min(len(self.queue), self.rng.randint(1, self.max_per_step))
        done = self.rng.sample(self.queue, k)  # finish out of order
        outs = [Out(request_id="x-unrelated", finished=False, outputs=[])]
        for item in done:
            self.queue.remove(item)
            rid, prompt, params = item
            ids = prompt.get("prompt_token_ids") or expand(fake_tokenize(prompt["prompt"]))
            text = f"<answer>{sum(ids) % 997}.5</answer>"
            toks = list(range(min(params.max_tokens, 7)))
            if params.kw.get("detokenize") is False:  # vLLM then returns token ids and no text
                text, toks = "", fake_tokenize(text) + [1_000_000 + 1]  # + an end-of-text special
            outs.append(Out(request_id=rid.rsplit("-", 1)[0], finished=True, prompt_token_ids=[0] * 100,
                            num_cached_tokens=96,
                            outputs=[Out(text=text, token_ids=toks, cumulative_logprob=-0.25 if params.kw.get("logprobs") else None,
                                         logprobs=None, finish_reason="stop")]))
        return outs

    def add_request(self, request_id, prompt, params):
        assert prompt["type"] == "multimodal" and "-" not in request_id
        rid = f"{request_id}-abcdefgh"
        self.added.append((rid, prompt, params))
        self.queue.append((rid, prompt, params))
        return rid

    def abort_request(self, ids, internal=False):
        self.aborted.extend(ids)
        self.queue = [q for q in self.queue if q[0] not in ids]

    # engine_core.shutdown()
    @property
    def engine_core(self):
        return self

    def shutdown(self):
        self.shutdown_called = True


class FakeLLM:
    instances: list = []

    def __init__(self, **kw):
        self.kw = kw
        self.llm_engine = FakeCore(self)
        self.enqueued: list = []
        self.counter = 0
        self.renders = 0
        self.tokenizer = FakeTokenizer()
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return self.tokenizer


    def enqueue(self, prompts, params, use_tqdm=True):
        assert use_tqdm is False
        ids = []
        for p in prompts:
            if len(p["prompt"]) > 100000:
                raise ValueError("The decoder prompt is longer than the maximum model length")
            rid = f"{self.counter}-abcdefgh"
            self.counter += 1
            self.enqueued.append((rid, p, params))
            self.llm_engine.queue.append((rid, p, params))
            ids.append(rid)
        return ids


class FastFakeLLM(FakeLLM):
    """Also has the internals the fast prompt path uses."""

    def _preprocess_cmpl_one(self, prompt):
        self.renders += 1
        # without uuids vLLM hashes the image itself
        uuids = prompt.get("multi_modal_uuids", {}).get("image") or [
            f"hash-{hash(im.tobytes())}" for im in prompt["multi_modal_data"]["image"]]
        return {"type": "multimodal", "prompt_token_ids": expand(fake_tokenize(prompt["prompt"])),
                "prompt": prompt["prompt"], "mm_kwargs": {"image": [None] * len(uuids)},
                "mm_hashes": {"image": list(uuids)}, "mm_placeholders": {"image": ["range"] * len(uuids)}}


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM = FakeLLM
    vllm.SamplingParams = FakeSamplingParams
    sp = types.ModuleType("vllm.sampling_params")
    sp.StructuredOutputsParams = FakeStructured
    sp.SamplingParams = FakeSamplingParams
    vllm.sampling_params = sp
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sp)
    FakeLLM.instances.clear()
    return vllm


def depth_batch(n: int, uid: str = "img0", h: int = 48, w: int = 64, sampling: Sampling | None = None, tag=None):
    prof = load_profile("vlm3-depth")
    px = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    img = PromptImage(uid, px)
    qs = [Query(render_text(prof, x=10 * i, y=7 * i), (uid,)) for i in range(n)]
    return EngineBatch({uid: img}, qs, sampling or Sampling(max_tokens=256), tag)


def content_uuid(pixels) -> str:
    return "px-" + PromptImage.content_uid(pixels)


def make(fake_vllm, **kw):
    from densify.engines import create_engine

    return create_engine("vllm", profile="vlm3-depth", model="/models/x", **kw)


def test_module_imports_without_vllm():
    import importlib

    mod = importlib.import_module("densify.engines.vllm")
    assert hasattr(mod, "VLLMEngine")


def test_engine_options_reach_llm(fake_vllm):
    eng = make(fake_vllm, load_format="dummy", quantization="fp8", cascade_attention=True,
               llm_kwargs={"seed": 3, "mm_processor_cache_gb": 2})
    kw = FakeLLM.instances[0].kw
    assert kw["model"] == "/models/x"
    assert kw["enable_prefix_caching"] is True
    assert kw["max_num_seqs"] == 1024 and kw["max_num_batched_tokens"] == 32768
    assert kw["load_format"] == "dummy" and kw["quantization"] == "fp8"
    assert kw["disable_cascade_attn"] is False
    assert kw["limit_mm_per_prompt"] == {"image": 1, "video": 0}
    assert kw["seed"] == 3 and kw["mm_processor_cache_gb"] == 2
    assert kw["enforce_eager"] is False
    eng.close()
    assert FakeLLM.instances[0].llm_engine.shutdown_called


def test_typed_options_reach_llm_as_they_are(fake_vllm, monkeypatch):
    """The config's typed options are the engine's: create_engine takes them without checking them again
    (no model_validate after the config loaded), and vllm.LLM gets their one conversion."""
    from densify.engines import VLLMOptions, create_engine
    from densify.stages.settings import DepthConfig

    cfg = DepthConfig(engine={"name": "vllm", "options": {"model": "/models/x", "max_num_seqs": 64,
                                                           "llm_kwargs": {"seed": 3}}})
    opts = cfg.engine.options
    assert isinstance(opts, VLLMOptions) and opts.max_num_seqs == 64

    def no_second_validation(*a, **k):
        raise AssertionError("options validated again")

    monkeypatch.setattr(VLLMOptions, "model_validate", classmethod(no_second_validation))
    eng = create_engine(opts, profile="vlm3-depth")
    assert eng.options is opts
    kw = FakeLLM.instances[-1].kw
    assert kw["max_num_seqs"] == 64 and kw["seed"] == 3 and kw["model"] == "/models/x"
    assert kw["compilation_config"] == {"max_cudagraph_capture_size": 64}
    eng.close()


def test_engine_counts_its_submit_and_step_time(fake_vllm):
    """stats time the frontend's work (benchmarks read them instead of wrapping the engine)."""
    eng = make(fake_vllm)
    eng.generate(depth_batch(5))
    eng.generate(depth_batch(3, uid="img1"))
    st = eng.stats
    assert st["submits"] == 2 and st["steps"] >= 2 and st["batches"] == 2 and st["queries"] == 8
    assert 0 < st["submit_s"] < 60 and 0 < st["step_s"] < 60
    eng.close()


def test_prompts_uids_and_sampling(fake_vllm):
    eng = make(fake_vllm)
    s = Sampling(max_tokens=64, system_prompt="SYS", prefill="<think> </think><answer>",
                 structured_regex=r"[0-9]+", logprobs=True)
    b = depth_batch(5, sampling=s)
    outs = eng.generate(b)
    llm = FakeLLM.instances[0]
    assert len(llm.enqueued) == 5
    first = llm.enqueued[0][1]
    text = b.queries[0].text
    assert first["prompt"] == ("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n"
                               "<|vision_start|><|image_pad|><|vision_end|>" + text +
                               "<|im_end|>\n<|im_start|>assistant\n<think> </think><answer>")
    # the uuid is the image's content hash, not the caller's uid
    assert first["multi_modal_uuids"] == {"image": [content_uuid(b.images["img0"].pixels)]}
    imgs = first["multi_modal_data"]["image"]
    assert len(imgs) == 1 and imgs[0].size == (64, 48) and imgs[0].mode == "RGB"
    # one PIL image per uid, shared by every query of the image
    assert all(p["multi_modal_data"]["image"][0] is imgs[0] for _, p, _ in llm.enqueued)
    params = llm.enqueued[0][2]
    assert params.kw["max_tokens"] == 64 and params.kw["temperature"] == 0.0 and params.kw["logprobs"] == 1
    assert params.structured_outputs.regex == r"[0-9]+"
    assert "min_tokens" not in params.kw and "ignore_eos" not in params.kw
    # answers in query order, with the prefill put back, and token counts
    for q, c, (_, p, _) in zip(b.queries, outs, llm.enqueued):
        assert c.text.startswith("<think> </think><answer><answer>")
        assert c.text.endswith(f"{sum(expand(fake_tokenize(p['prompt']))) % 997}.5</answer>")
        assert c.n_prompt_tokens == 100 and c.cached_prompt_tokens == 96 and c.n_generated_tokens == 7
        assert c.logprob == -0.25 and c.error is None


def test_prompt_without_system_or_prefill_and_two_images(fake_vllm):
    eng = make(fake_vllm)
    a = PromptImage("a", np.zeros((8, 8, 3), np.uint8))
    b = PromptImage("b", np.ones((8, 8, 3), np.uint8))
    batch = EngineBatch({"a": a, "b": b}, [Query("corr?", ("a", "b"))], Sampling(max_tokens=9))
    out = eng.generate(batch)
    p = FakeLLM.instances[0].enqueued[0][1]
    assert p["prompt"] == ("<|im_start|>user\n" + "<|vision_start|><|image_pad|><|vision_end|>" * 2 +
                           "corr?<|im_end|>\n<|im_start|>assistant\n")
    assert p["multi_modal_uuids"] == {"image": [content_uuid(a.pixels), content_uuid(b.pixels)]}
    assert out[0].logprob is None and not out[0].text.startswith("<think>")


def test_benchmark_length_forcing(fake_vllm):
    eng = make(fake_vllm, min_tokens=12, ignore_eos=True)
    eng.generate(depth_batch(2, sampling=Sampling(max_tokens=12)))
    params = FakeLLM.instances[0].enqueued[0][2]
    assert params.kw["min_tokens"] == 12 and params.kw["ignore_eos"] is True


def test_stream_keeps_next_image_in_flight_but_bounded(fake_vllm):
    eng = make(fake_vllm, max_num_seqs=16)  # queries_in_flight = 32
    batches = [depth_batch(50, uid=f"img{i}", tag=i) for i in range(4)]
    seen = []
    for b, outs in eng.stream(batches):
        assert len(outs) == 50 and all(o is not None and o.error is None for o in outs)
        seen.append(b.tag)
    assert sorted(seen) == [0, 1, 2, 3]
    core = FakeLLM.instances[0].llm_engine
    # never more than one batch ahead: < 32 unfinished + a whole new batch of 50
    assert 50 < core.max_unfinished < 32 + 50
    uids = [p["multi_modal_uuids"]["image"][0] for _, p, _ in FakeLLM.instances[0].enqueued]
    assert uids == sorted(uids)  # batches are submitted whole, in order


def test_one_batch_at_a_time(fake_vllm):
    eng = make(fake_vllm, queries_in_flight=0)
    list(eng.stream([depth_batch(30, uid=f"i{i}") for i in range(3)]))
    assert FakeLLM.instances[0].llm_engine.max_unfinished <= 30


def test_generate_stream_uses_engine_stream(fake_vllm):
    from densify.engines import generate_stream

    eng = make(fake_vllm)
    got = list(generate_stream(eng, [depth_batch(3, uid="u1"), depth_batch(0, uid="u2")]))
    assert sorted(len(o) for _, o in got) == [0, 3]


def test_rejected_batch_is_a_per_query_failure(fake_vllm):
    eng = make(fake_vllm)
    b = depth_batch(2)
    b.queries[1] = Query("x" * 200000, ("img0",))
    outs = eng.generate(b)
    assert len(outs) == 2 and all(o.error and "maximum model length" in o.error for o in outs)
    # the engine still works afterwards
    assert all(o.error is None for o in eng.generate(depth_batch(3)))


def test_generation_failure_raises_engine_error_with_advice(fake_vllm):
    eng = make(fake_vllm)
    FakeLLM.instances[0].llm_engine.fail_at_step = 1
    with pytest.raises(EngineError, match="out of GPU memory.*max_num_batched_tokens"):
        eng.generate(depth_batch(10))


def test_early_stop_aborts_queued_requests(fake_vllm):
    eng = make(fake_vllm, max_num_seqs=4)
    FakeLLM.instances[0].llm_engine.max_per_step = 3
    gen = eng.stream([depth_batch(20, uid=f"i{i}") for i in range(3)])
    next(gen)
    assert FakeLLM.instances[0].llm_engine.queue  # the next image is queued
    gen.close()
    core = FakeLLM.instances[0].llm_engine
    assert core.aborted and not core.queue


def test_start_failure_is_engine_error(fake_vllm, monkeypatch):
    class Boom(FakeLLM):
        def __init__(self, **kw):
            raise ValueError("No available memory for the cache blocks. Try increasing gpu_memory_utilization")

    monkeypatch.setattr(fake_vllm, "LLM", Boom)
    with pytest.raises(EngineError, match="out of GPU memory while starting.*gpu_memory_utilization"):
        make(fake_vllm)


def test_missing_vllm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    from densify.engines.vllm import VLLMEngine

    with pytest.raises(EngineError, match="pip install"):
        VLLMEngine("vlm3-depth", model="/m")


def test_prompt_renderer_matches_real_chat_template(tmp_path):
    """The cached prefix/suffix split renders byte-identically to the tokenizer's template."""
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from densify.engines.vllm import PromptRenderer, chat_messages
    from densify.synthetic.models import build_model_folder

    folder = build_model_folder(tmp_path / "m", shape="4b")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    r = PromptRenderer(tok)
    prof = load_profile("depthlm-qwen")
    for n, sys_prompt, prefill in [(1, None, None), (1, prof.system_prompt, None), (2, None, "<think> </think>")]:
        for text in ["Given this image, how far is (12, 34)?", "a {brace} and \\ backslash"]:
            want = tok.apply_chat_template(chat_messages(n, text, sys_prompt), tokenize=False,
                                           add_generation_prompt=True) + (prefill or "")
            assert r(n, text, sys_prompt, prefill) == want
    assert r(1, "q", None, None).count("<|image_pad|>") == 1


def test_vllm_renders_depthlm_prompts_for_a_pixtral_model(fake_vllm, monkeypatch, tmp_path):
    """The released DepthLM chat through the vllm engine, rendered by a Pixtral-shaped folder's own
    tokenizer and template: no system message, the image then the question, exactly one BOS once vLLM
    tokenises the prompt (its tokenizer prepends <s>, so the rendered one is left to it); every query its
    own marked image, so no fast path."""
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from densify.engines import create_engine
    from densify.io.cameras import Camera, prepare_image
    from densify.queries.plan import plan_queries
    from densify.queries.prompts import depth_batch as marked_depth_batch
    from densify.synthetic.models import build_model_folder

    folder = build_model_folder(tmp_path / "pixtral-12b", shape="pixtral-12b")
    tok = transformers.AutoTokenizer.from_pretrained(folder)

    class PixtralLLM(FastFakeLLM):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.tokenizer = tok

    monkeypatch.setattr(fake_vllm, "LLM", PixtralLLM)
    sys.modules["vllm.sampling_params"].RequestOutputKind = types.SimpleNamespace(FINAL_ONLY="final_only")
    prof = load_profile("depthlm")
    rgb = np.random.default_rng(0).integers(0, 200, (480, 640, 3), dtype=np.uint8)
    prep = prepare_image(rgb, Camera(1000.0, 1000.0, 320.0, 240.0, 640, 480), coord_range=None,
                         **prof.preprocess.image_options())
    plan = plan_queries(np.array([[100, 100], [300, 200], [500, 400], [320, 240]], float), prep.pixel_map,
                        marker=prof.marker)
    b = marked_depth_batch(prep, plan, prof, uid="img")
    eng = create_engine("vllm", profile="depthlm", model=str(folder), load_format="dummy")
    outs = eng.generate(b)
    llm = FakeLLM.instances[-1]
    assert llm.kw["model"] == str(folder) and llm.kw["limit_mm_per_prompt"] == {"image": 1, "video": 0}
    assert len(outs) == 4 and all(c.error is None for c in outs)
    assert llm.renders == 0 and len(llm.enqueued) == 4  # one image per query: nothing to share
    question = prof.question.template
    for (_, p, _), q in zip(llm.enqueued, b.queries):
        assert p["prompt"] == f"[INST][IMG]{question}[/INST]"
        ids = tok(p["prompt"])["input_ids"]  # as vLLM tokenises a text prompt: special tokens added
        assert ids[:3] == [1, 3, 10] and ids.count(1) == 1 and ids[-1] == 4
        [im] = p["multi_modal_data"]["image"]
        assert im.size == (480, 360) and np.array_equal(np.asarray(im), b.images[q.image_uids[0]].pixels)
    uuids = [p["multi_modal_uuids"]["image"][0] for _, p, _ in llm.enqueued]
    assert len(set(uuids)) == 4  # the marked images differ, so do their content hashes
    # the hf engine's rendering (tokenised without special tokens) is the same token sequence
    from densify.engines.chat import TEMPLATE_TEXT_KEYS, chat_messages
    hf_text = tok.apply_chat_template(chat_messages(1, question, None, text_keys=TEMPLATE_TEXT_KEYS),
                                      tokenize=False, add_generation_prompt=True)
    assert tok(hf_text, add_special_tokens=False)["input_ids"] == ids


@pytest.fixture
def fast_vllm(fake_vllm, monkeypatch):
    monkeypatch.setattr(fake_vllm, "LLM", FastFakeLLM)
    sp = sys.modules["vllm.sampling_params"]
    sp.RequestOutputKind = types.SimpleNamespace(FINAL_ONLY="final_only")
    return fake_vllm


@pytest.mark.parametrize("sampling", [Sampling(max_tokens=12),
                                      Sampling(max_tokens=12, system_prompt="S", prefill="<think> </think>")])
def test_fast_prompt_path_matches_full_rendering(fast_vllm, sampling):
    slow = make(fast_vllm, fast_prompts=False)
    want = slow.generate(depth_batch(40, sampling=sampling))
    fast = make(fast_vllm)
    got = fast.generate(depth_batch(40, sampling=sampling))
    llm = FakeLLM.instances[-1]
    assert llm.renders == 2 and len(llm.llm_engine.added) == 40 and not llm.enqueued
    assert [c.text for c in got] == [c.text for c in want]
    # every derived input keeps the image reference of vLLM's own second rendering
    want_uuid = content_uuid(depth_batch(1).images["img0"].pixels)
    assert all(p["mm_hashes"] == {"image": [want_uuid]} for _, p, _ in llm.llm_engine.added)
    assert all(params.output_kind == "final_only" for _, _, params in llm.llm_engine.added)
    assert fast.stats["fast_prompt_batches"] == 1


def test_fast_prompt_path_falls_back_on_mismatch(fast_vllm):
    eng = make(fast_vllm)
    llm = FakeLLM.instances[-1]
    llm.tokenizer.skew = True
    got = eng.generate(depth_batch(10))
    assert llm.renders == 2 and len(llm.llm_engine.added) == 2 and len(llm.enqueued) == 8
    assert eng.fast_prompts is False and all(c.error is None for c in got)
    ref = make(fast_vllm, fast_prompts=False).generate(depth_batch(10))
    assert [c.text for c in got] == [c.text for c in ref]


def test_fast_prompt_path_skips_marker_batches(fast_vllm):
    eng = make(fast_vllm)
    b = depth_batch(6)
    for i, q in enumerate(b.queries):  # every query its own image (DepthLM markers)
        uid = f"m{i}"
        b.images[uid] = PromptImage(uid, b.images["img0"].pixels)
        q.image_uids = (uid,)
    eng.generate(b)
    llm = FakeLLM.instances[-1]
    assert llm.renders == 0 and len(llm.enqueued) == 6


def test_fast_prompt_path_streams(fast_vllm):
    eng = make(fast_vllm, max_num_seqs=8)
    got = {b.tag: outs for b, outs in eng.stream([depth_batch(30, uid=f"i{k}", tag=k) for k in range(3)])}
    assert sorted(got) == [0, 1, 2] and all(len(v) == 30 and all(c.error is None for c in v) for v in got.values())


def test_stream_source_may_yield_none(fake_vllm):
    """None from the source means "nothing new yet": the engine steps what it holds, and with nothing in
    flight it waits for the source instead of ending the stream."""
    eng = make(fake_vllm, max_num_seqs=8)
    core = FakeLLM.instances[0].llm_engine
    core.max_per_step = 3  # "a" takes several steps
    answered, steps_at_none = [], []

    def source():
        yield None  # nothing held yet
        yield depth_batch(30, uid="a", tag="a")
        for _ in range(10_000):  # the engine keeps stepping "a" meanwhile
            if "a" in answered:
                break
            steps_at_none.append(core.steps)
            yield None
        for _ in range(3):  # nothing in flight
            yield None
        yield depth_batch(30, uid="b", tag="b")
        yield None
        yield depth_batch(30, uid="c", tag="c")
        yield None

    got = {}
    for b, outs in eng.stream(source()):
        answered.append(b.tag)
        got[b.tag] = outs
    assert sorted(got) == ["a", "b", "c"]
    assert all(len(v) == 30 and all(c is not None and c.error is None for c in v) for v in got.values())
    assert len(steps_at_none) > 1 and steps_at_none == sorted(set(steps_at_none))  # a step per None


def test_cuda_graphs_cover_a_full_decode_batch(fake_vllm):
    make(fake_vllm, max_num_seqs=768)
    assert FakeLLM.instances[-1].kw["compilation_config"] == {"max_cudagraph_capture_size": 768}
    make(fake_vllm, enforce_eager=True)
    assert "compilation_config" not in FakeLLM.instances[-1].kw
    mine = {"cudagraph_capture_sizes": [1, 2, 4]}
    make(fake_vllm, llm_kwargs={"compilation_config": mine})
    assert FakeLLM.instances[-1].kw["compilation_config"] == mine


def test_uuids_are_content_hashes_never_reused_for_other_pixels(fake_vllm):
    eng = make(fake_vllm)
    first, second = depth_batch(3, uid="same"), depth_batch(3, uid="same")
    second.images["same"].base = 255 - second.images["same"].base  # a caller reusing a uid
    eng.generate(first)
    eng.generate(second)
    llm = FakeLLM.instances[0]
    u = [p["multi_modal_uuids"]["image"][0] for _, p, _ in llm.enqueued]
    assert len(set(u[:3])) == 1 and len(set(u[3:])) == 1 and u[0] != u[3]
    assert u[0] == content_uuid(first.images["same"].pixels)
    pil = [p["multi_modal_data"]["image"][0] for _, p, _ in llm.enqueued]
    assert pil[0] is not pil[3] and pil[3].getpixel((0, 0)) == tuple(second.images["same"].pixels[0, 0])
    # the same pixels under another uid share the uuid (and vLLM's cached features)
    eng.generate(depth_batch(3, uid="other"))
    assert llm.enqueued[-1][1]["multi_modal_uuids"]["image"][0] == u[0]


def test_mm_uuids_off_lets_vllm_hash(fake_vllm):
    eng = make(fake_vllm, mm_uuids=False)
    eng.generate(depth_batch(3))
    assert all("multi_modal_uuids" not in p and p["multi_modal_data"]["image"] for _, p, _ in
               FakeLLM.instances[0].enqueued)


@pytest.mark.parametrize("fast", [False, True])
def test_detokenize_off_decodes_in_the_engine(fake_vllm, fast_vllm, fast):
    s = Sampling(max_tokens=64, prefill="<think> </think><answer>")
    want = make(fast_vllm, fast_prompts=fast).generate(depth_batch(30, sampling=s))
    eng = make(fast_vllm, fast_prompts=fast, detokenize=False)
    batches = [depth_batch(30, uid=f"i{k}", sampling=s, tag=k) for k in range(3)]
    got = {b.tag: outs for b, outs in eng.stream(batches)}
    llm = FakeLLM.instances[-1]
    params = (llm.llm_engine.added or llm.enqueued)[0][2]
    assert params.kw["detokenize"] is False
    assert [c.text for c in got[0]] == [c.text for c in want]  # same answers, special tokens dropped
    assert all(c.error is None and c.n_generated_tokens for v in got.values() for c in v)
    assert llm.tokenizer.batch_decodes == 3  # one decode call per batch, not per answer


def test_an_actor_sharing_its_gpu_sizes_its_vllm_engine(fake_vllm, monkeypatch):
    """The Ray actor (run in process here) applies the memory plan for K engines per GPU before it builds
    the vllm engine; what the caller sets wins; one engine per GPU keeps the engine's defaults."""
    from densify.engines import ray_actor
    from densify.engines.vllm_memory import engine_memory_plan

    monkeypatch.setattr(ray_actor, "visible_gpu_total_gib", lambda: 140.0)
    actor = ray_actor._EngineActor("vllm", "vlm3-depth", {"model": "/m"}, 3)
    kw = FakeLLM.instances[-1].kw
    plan = engine_memory_plan(3, 140.0)
    assert kw["gpu_memory_utilization"] == plan["gpu_memory_utilization"] < 0.3
    assert kw["max_num_batched_tokens"] == plan["max_num_batched_tokens"] == 16384
    assert kw["compilation_config"] == plan["compilation_config"]
    assert actor.info()["memory_plan"] == plan
    ray_actor._EngineActor("vllm", "vlm3-depth", {"model": "/m", "gpu_memory_utilization": 0.2,
                                                   "max_num_batched_tokens": 4096}, 3)
    kw = FakeLLM.instances[-1].kw
    assert kw["gpu_memory_utilization"] == 0.2 and kw["max_num_batched_tokens"] == 4096
    actor = ray_actor._EngineActor("vllm", "vlm3-depth", {"model": "/m"}, 1)
    kw = FakeLLM.instances[-1].kw
    assert kw["gpu_memory_utilization"] == 0.9 and kw["max_num_batched_tokens"] == 32768
    assert actor.info()["memory_plan"] is None


def test_a_dead_engine_core_marks_the_engine_dead(fake_vllm):
    eng = make(fake_vllm)
    assert eng.dead is False
    FakeLLM.instances[0].llm_engine.fail_at_step = 1
    with pytest.raises(EngineError):
        eng.generate(depth_batch(5))
    assert eng.dead is True
