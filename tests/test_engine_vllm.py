"""The vllm engine on a GPU (skipped without CUDA or vLLM): `pytest -m gpu tests/test_engine_vllm.py`.

Synthetic Qwen3-VL folders are built in a temporary folder (the tiny one with saved random weights; the 4B
one config-only, served with load_format="dummy"). The image is a real iBims-1 photo from tests/data.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("vllm")

from densify.config.profiles import load_profile  # noqa: E402
from densify.engines import create_engine  # noqa: E402
from densify.engines.base import EngineBatch, Sampling  # noqa: E402
from densify.io.cameras import Camera, prepare_image  # noqa: E402
from densify.io.images import load_rgb  # noqa: E402
from densify.queries.answers import parse_text  # noqa: E402
from densify.queries.plan import grid_points, plan_queries  # noqa: E402
from densify.queries.prompts import depth_batch, image_uid, sampling_for  # noqa: E402

pytestmark = pytest.mark.gpu

DATA = Path(__file__).parent / "data"
IMAGE = DATA / "ibims1_factory_01.png"

# small engines for the tiny model: eager (no compile or graph capture) unless a test needs graphs
TINY = dict(gpu_memory_utilization=0.25, max_model_len=4096, max_num_seqs=128, max_num_batched_tokens=8192,
            enforce_eager=True)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from densify.synthetic.models import build_model_folder

    return build_model_folder(tmp_path_factory.mktemp("models") / "tiny", shape="tiny")


@pytest.fixture(scope="module")
def model_4b(tmp_path_factory):
    from densify.synthetic.models import build_model_folder

    return build_model_folder(tmp_path_factory.mktemp("models") / "qwen3vl-4b", shape="4b")


def real_image(profile, size: tuple[int, int] | None = None):
    """The test photo prepared for a profile. With `size`, the photo is resized first but keeps its focal
    length in pixels (as if taken with a wider lens), so the prepared image has another size."""
    rgb = load_rgb(IMAGE)
    cam = Camera.from_list(json.loads(IMAGE.with_suffix(".json").read_text())["intrinsics"])
    if size is not None:
        from densify.io.cameras import resize_rgb

        rgb = resize_rgb(rgb, size)
        sc = cam.scaled(*size)
        cam = Camera(cam.fx, cam.fy, sc.cx, sc.cy, size[0], size[1])
    p = profile.preprocess
    return prepare_image(rgb, cam, coord_range=profile.coord_range, **p.image_options())


def queries(profile, n: int, sampling: Sampling | None = None, size=None, tag=None) -> EngineBatch:
    prep = real_image(profile, size)
    w, h = prep.camera.width, prep.camera.height
    orig = prep.pixel_map.orig_size
    plan = plan_queries(grid_points(orig[0], orig[1], count=n), prep.pixel_map, marker=profile.marker)
    return depth_batch(prep, plan, profile, uid=image_uid(prep, f"{IMAGE.stem}-{w}x{h}"),
                       sampling=sampling or sampling_for(profile), tag=tag)


def _run(engine_name: str, batch: EngineBatch, **opts):
    eng = create_engine(engine_name, profile="vlm3-depth", **opts)
    try:
        return eng.generate(batch)
    finally:
        eng.close()


# (1) the same greedy answers as transformers
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_vllm_and_hf_give_the_same_greedy_answers(tiny_model, dtype):
    prof = load_profile("vlm3-depth")
    plain = queries(prof, 16, Sampling(max_tokens=24))
    # a system prompt and a prefill, as DepthLM-style profiles use
    extra = queries(prof, 6, Sampling(max_tokens=16, system_prompt=load_profile("depthlm-qwen").system_prompt,
                                      prefill="<think> </think><answer>"))
    v_plain = _run("vllm", plain, model=str(tiny_model), dtype=dtype, **TINY)
    v_extra = None
    h_plain = _run("hf", plain, model=str(tiny_model), device="cuda", dtype=dtype, batch_size=8)
    h_extra = _run("hf", extra, model=str(tiny_model), device="cuda", dtype=dtype, batch_size=8)
    v_extra = _run("vllm", extra, model=str(tiny_model), dtype=dtype, **TINY)
    for v, h in ((v_plain, h_plain), (v_extra, h_extra)):
        # the same prompt: the same number of prompt tokens (the image expanded identically)
        assert [o.n_prompt_tokens for o in v] == [o.n_prompt_tokens for o in h]
        assert all(o.error is None for o in v)
    pairs = list(zip(v_plain + v_extra, h_plain + h_extra))
    same = [a.text == b.text for a, b in pairs]
    print(f"\n{dtype}: {sum(same)}/{len(same)} identical answers; first: vllm {pairs[0][0].text!r} hf {pairs[0][1].text!r}")
    for (a, b), s in zip(pairs, same):
        if not s:
            print(f"  differ: vllm {a.text!r} ({a.n_generated_tokens} tok) | hf {b.text!r} ({b.n_generated_tokens} tok)")
    assert all(o.text.startswith("<think> </think><answer>") for o in v_extra)
    if dtype == "float32":
        assert all(same)
        assert [a.n_generated_tokens for a, _ in pairs] == [b.n_generated_tokens for _, b in pairs]
    else:  # bf16 kernels differ (FlashAttention vs SDPA, fused norms): near-ties may flip a token
        assert sum(same) >= 0.75 * len(same)


# (2) regression: Qwen3-VL with prefix caching AND chunked prefill (crashed in earlier releases, in the
# deepstack buffers of graph-padded steps whose chunk boundary falls inside an image)
def test_prefix_caching_with_chunked_prefill_survives_many_queries(tiny_model):
    prof = load_profile("vlm3-depth")
    s = Sampling(max_tokens=8)
    batches = [queries(prof, 400, s, tag="big"),  # 1144x860: ~970 image tokens, chunked at 96 per step
               queries(prof, 150, s, size=(500, 380), tag="small"),  # 894x681: ~600 image tokens
               queries(prof, 300, s, tag="big-again")]  # the first image again: prefix-cache hits
    assert len({tuple(b.images[next(iter(b.images))].pixels.shape) for b in batches}) == 2
    eng = create_engine("vllm", profile=prof, model=str(tiny_model), gpu_memory_utilization=0.25,
                        max_model_len=4096, max_num_seqs=96, max_num_batched_tokens=96,
                        enable_prefix_caching=True, enforce_eager=False,
                        llm_kwargs={"enable_chunked_prefill": True})
    try:
        got = {b.tag: outs for b, outs in eng.stream(batches)}
    finally:
        eng.close()
    assert {k: len(v) for k, v in got.items()} == {b.tag: len(b.queries) for b in batches}
    for outs in got.values():
        assert all(o.error is None and o.n_generated_tokens for o in outs)
    hit = sum(o.cached_prompt_tokens or 0 for o in got["big-again"]) / sum(o.n_prompt_tokens for o in got["big-again"])
    print(f"\nprefix-cache hit rate on the repeated image: {hit:.3f}")
    assert hit > 0.8


# (3) structured output: every answer matches the regex and parses
def test_structured_output_answers_parse(tiny_model):
    prof = load_profile("vlm3-depth")
    tight = r"<think> </think><answer>[0-9]{1,2}\.[0-9]{2}</answer>"
    b1 = queries(prof, 24, Sampling(max_tokens=40, structured_regex=tight))
    b2 = queries(prof, 8, sampling_for(prof, structured=True))  # the profile's own regex
    b2 = EngineBatch(b2.images, b2.queries, Sampling(max_tokens=300, structured_regex=b2.sampling.structured_regex))
    eng = create_engine("vllm", profile=prof, model=str(tiny_model), **TINY)
    try:
        o1 = eng.generate(b1)
        o2 = eng.generate(b2)
        plain = eng.generate(queries(prof, 8, Sampling(max_tokens=40)))
    finally:
        eng.close()
    q = prof.question
    for o in o1:
        assert re.fullmatch(tight, o.text), o.text
        assert parse_text(q, o.text).value is not None or parse_text(q, o.text).failure == "non_positive"
    for o in o2:
        assert re.fullmatch(b2.sampling.structured_regex, o.text), o.text
        assert re.search(q.regex, o.text)
    # without the constraint the random model does not write the format (so the check above means something)
    assert sum(bool(re.fullmatch(tight, o.text)) for o in plain) < len(plain)


# (4) the depth pipeline end to end on the 4B-shaped model with dummy weights
def test_densify_depth_cli_vllm_4b_dummy(model_4b, tmp_path):
    from pipelines.cli import main

    out = tmp_path / "out"
    rc = main(["depth", str(IMAGE), "--out", str(out), "--engine", "vllm", "--model", str(model_4b),
               "--count", "256",
               "--set", "engine.options.load_format=dummy",
               "--set", "engine.options.gpu_memory_utilization=0.85",
               "--set", "engine.options.enforce_eager=true",
               "--set", "engine.options.max_model_len=4096",
               "--set", "outputs.ply=false"])
    summary = json.loads((out / "summary.json").read_text())
    print("\n", {k: summary[k] for k in ("images", "ok", "failed", "queries", "queries_per_s", "answer_failures")})
    # dummy weights write garbage, so no answer parses and the pipeline records the image as failed for
    # that reason ("answers"); what this checks is that every query went through the engine without error
    assert summary["images"] == 1 and summary["queries"] >= 240
    assert all(f["kind"] == "answers" for f in summary["failed_images"]), summary["failed_images"]
    assert "engine_error" not in summary["answer_failures"]
    assert rc in (0, 1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# (5) the openai engine against a real `vllm serve` (started here): the same answers as the in-process engine
def test_openai_engine_against_vllm_serve(tiny_model, monkeypatch):
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from densify.engines.base import EngineError

    prof = load_profile("vlm3-depth")
    plain = queries(prof, 12, Sampling(max_tokens=24))
    extra = queries(prof, 4, Sampling(max_tokens=16, system_prompt=load_profile("depthlm-qwen").system_prompt,
                                      prefill="<think> </think><answer>"))
    local = _run("vllm", plain, model=str(tiny_model), dtype="float32", **TINY)
    local_extra = _run("vllm", extra, model=str(tiny_model), dtype="float32", **TINY)

    port, key = _free_port(), "densify-test-key-7f3a"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
           "--gpu-memory-utilization", "0.25", "--max-model-len", "4096", "--max-num-seqs", "64",
           "--api-key", key, "--limit-mm-per-prompt", '{"image": 1, "video": 0}']
    log_path = Path(os.environ.get("OUT", "/tmp")) / "vllm-serve.log"
    with open(log_path, "w") as log_f:
        srv = subprocess.Popen(cmd, stdout=log_f, stderr=subprocess.STDOUT, env=dict(os.environ))
        try:
            deadline = time.time() + 420
            while True:
                assert srv.poll() is None, f"vllm serve exited with {srv.returncode}; see {log_path}"
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert time.time() < deadline, f"vllm serve not up after 420 s; see {log_path}"
                time.sleep(2)
            base = f"http://127.0.0.1:{port}/v1"
            # a wrong key is refused when the engine starts, naming the variable to fix
            monkeypatch.setenv("DENSIFY_TEST_KEY", "wrong")
            with pytest.raises(EngineError, match="DENSIFY_TEST_KEY"):
                create_engine("openai", profile=prof, base_url=base, api_key_env="DENSIFY_TEST_KEY")
            monkeypatch.setenv("DENSIFY_TEST_KEY", key)
            eng = create_engine("openai", profile=prof, base_url=base, api_key_env="DENSIFY_TEST_KEY",
                                concurrency=16, timeout=60)
            try:
                assert key not in repr(eng)
                remote = eng.generate(plain)
                remote_extra = eng.generate(extra)
                streamed = [outs for _, outs in eng.stream([plain, extra])]
            finally:
                eng.close()
        finally:
            srv.terminate()
            try:
                srv.wait(timeout=60)
            except subprocess.TimeoutExpired:
                srv.kill()
    for o in remote + remote_extra:
        assert o.error is None, o.error
    # the same prompt tokens (chat template, image expansion, prefill rendering) and the same greedy answers
    assert [o.n_prompt_tokens for o in remote] == [o.n_prompt_tokens for o in local]
    assert [o.n_prompt_tokens for o in remote_extra] == [o.n_prompt_tokens for o in local_extra]
    same = sum(a.text == b.text for a, b in zip(remote + remote_extra, local + local_extra))
    print(f"\nopenai vs in-process vllm (float32): {same}/{len(remote) + len(remote_extra)} identical; "
          f"first {remote[0].text!r}")
    assert [o.text for o in remote] == [o.text for o in local]
    assert [o.text for o in remote_extra] == [o.text for o in local_extra]
    assert [[o.text for o in outs] for outs in streamed] == [[o.text for o in remote], [o.text for o in remote_extra]]


# (6) the Ray pool with a vLLM engine in a GPU actor: several images in flight, the same answers as in-process
def test_ray_pool_runs_vllm_actor_on_the_gpu(tiny_model):
    pytest.importorskip("ray")
    from densify.engines.ray_pool import RayPoolEngine

    prof = load_profile("vlm3-depth")
    s = Sampling(max_tokens=12)
    batches = [queries(prof, 48, s, tag="a"), queries(prof, 40, s, size=(500, 380), tag="b"),
               queries(prof, 32, s, size=(640, 480), tag="c")]
    opts = dict(model=str(tiny_model), dtype="float32", **TINY)
    eng = create_engine("vllm", profile=prof, **opts)
    try:
        local = {b.tag: [o.text for o in outs] for b, outs in eng.stream(batches)}
    finally:
        eng.close()
    pool = RayPoolEngine(prof, engine="vllm", engine_options=opts, num_actors=1, num_gpus_per_actor=1,
                         max_in_flight_per_actor=3)
    try:
        got = {b.tag: outs for b, outs in pool.stream(batches)}
        stats = dict(pool.stats)
    finally:
        pool.close()
    print("\nray pool stats:", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in stats.items()})
    assert sorted(got) == ["a", "b", "c"]
    for tag, outs in got.items():
        assert all(o.error is None for o in outs), [o.error for o in outs if o.error][:2]
        assert [o.text for o in outs] == local[tag]


# (7) the per-request CPU cuts change no answer: the engine's own decoding (detokenize=False) and vLLM
# hashing each image itself (mm_uuids=False) give vLLM's default answers, texts and token counts
def test_cpu_cuts_give_the_same_answers(tiny_model):
    prof = load_profile("vlm3-depth")
    eng = create_engine("vllm", profile=prof, model=str(tiny_model), dtype="float32", **TINY)
    try:
        ref = eng.generate(queries(prof, 40, Sampling(max_tokens=24)))
        for attr in ("detokenize", "mm_uuids"):
            setattr(eng, attr, False)
            got = eng.generate(queries(prof, 40, Sampling(max_tokens=24)))
            setattr(eng, attr, True)
            assert [o.text for o in got] == [o.text for o in ref], attr
            assert [o.n_generated_tokens for o in got] == [o.n_generated_tokens for o in ref], attr
        assert eng.stats["fast_prompt_batches"] == 3 and eng.fast_prompts  # the fast path's check held
    finally:
        eng.close()


# (8) DepthLM as released on the Pixtral-shaped models: vLLM and transformers give the same prompt tokens
# (one BOS, the same image rows) and, in float32, the same greedy answers; the hf engine's folder inputs
# (no torchvision) equal the processor's; `densify depth --profile depthlm` through vLLM on the 12B shape
@pytest.fixture(scope="module")
def pixtral_tiny(tmp_path_factory):
    from densify.synthetic.models import build_model_folder

    return build_model_folder(tmp_path_factory.mktemp("models") / "pixtral-tiny", shape="pixtral-tiny")


@pytest.fixture(scope="module")
def pixtral_12b(tmp_path_factory):
    from densify.synthetic.models import build_model_folder

    return build_model_folder(tmp_path_factory.mktemp("models") / "pixtral-12b", shape="pixtral-12b")


def test_vllm_and_hf_agree_on_depthlm_pixtral_tiny(pixtral_tiny):
    prof = load_profile("depthlm")
    b = queries(prof, 12, Sampling(max_tokens=16), size=(400, 300))
    assert len(b.images) == len(b.queries) >= 10  # every query its own marked image
    v = _run_profile("vllm", prof, b, model=str(pixtral_tiny), dtype="float32", **TINY)
    h = _run_profile("hf", prof, b, model=str(pixtral_tiny), device="cuda", dtype="float32", batch_size=6)
    assert all(o.error is None for o in v)
    assert [o.n_prompt_tokens for o in v] == [o.n_prompt_tokens for o in h]
    same = [a.text == c.text for a, c in zip(v, h)]
    print(f"\npixtral-tiny float32: {sum(same)}/{len(same)} identical; prompt tokens {v[0].n_prompt_tokens}; "
          f"first: vllm {v[0].text!r} hf {h[0].text!r}")
    assert all(same)


def test_hf_folder_inputs_equal_the_processor(pixtral_tiny, tiny_model):
    """Without torchvision the hf engine expands image placeholders itself; here (torchvision present) the
    processor's inputs are the reference."""
    pytest.importorskip("torchvision")
    from transformers import AutoTokenizer

    from densify.engines.hf import FolderInputs, ProcessorInputs, model_inputs

    class Cfg:  # just what model_inputs reads of a model
        def __init__(self, path):
            import json as _json
            c = _json.loads((Path(path) / "config.json").read_text())
            self.config = type("C", (), {"image_token_id": c.get("image_token_id", c.get("image_token_index"))})()

        def forward(self, input_ids=None, mm_token_type_ids=None):
            pass

    for folder, name, proc_cls in ((pixtral_tiny, "depthlm", "PixtralProcessor"),
                                   (tiny_model, "depthlm-qwen", "Qwen3VLProcessor")):
        prof = load_profile(name)
        b = queries(prof, 4, size=(400, 300))
        tok = AutoTokenizer.from_pretrained(folder)
        tok.padding_side = "left"
        m = Cfg(folder)
        proc = model_inputs(str(folder), tok, m, None)
        assert isinstance(proc, ProcessorInputs)
        mine = FolderInputs(str(folder), tok, m.config.image_token_id, True, proc_cls)
        from densify.engines.chat import TEMPLATE_TEXT_KEYS, chat_messages
        texts = [tok.apply_chat_template(chat_messages(1, q.text, b.sampling.system_prompt, text_keys=TEMPLATE_TEXT_KEYS),
                                         tokenize=False, add_generation_prompt=True) for q in b.queries]
        ims = [[b.images[q.image_uids[0]]] for q in b.queries]
        a, c = proc(texts, ims, {}), mine(texts, ims, {})
        assert torch.equal(a["input_ids"], c["input_ids"]) and torch.equal(a["attention_mask"], c["attention_mask"])
        d = (a["pixel_values"].float() - c["pixel_values"].float()).abs()
        print(f"\n{name}: pixel values, torchvision vs PIL: max |diff| {float(d.max()):.4f}, mean {float(d.mean()):.5f}")
        assert float(d.mean()) < 0.02
        for k in ("image_sizes", "image_grid_thw"):
            if k in a:
                assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(c[k])), k


def _run_profile(engine_name: str, profile, batch: EngineBatch, **opts):
    eng = create_engine(engine_name, profile=profile, **opts)
    try:
        return eng.generate(batch)
    finally:
        eng.close()


def test_densify_depth_depthlm_vllm_pixtral_12b_dummy(pixtral_12b, tmp_path):
    from pipelines.cli import main

    out = tmp_path / "out"
    rc = main(["depth", str(IMAGE), "--out", str(out), "--profile", "depthlm", "--engine", "vllm",
               "--model", str(pixtral_12b), "--count", "64",
               "--set", "plan.mode=grid", "--set", "densify.method=linear",
               "--set", "engine.options.load_format=dummy",
               "--set", "engine.options.gpu_memory_utilization=0.85",
               "--set", "engine.options.enforce_eager=true",
               "--set", "engine.options.max_model_len=4096",
               "--set", "outputs.ply=false"])
    summary = json.loads((out / "summary.json").read_text())
    print("\n", {k: summary[k] for k in ("images", "ok", "failed", "queries", "queries_per_s", "answer_failures")})
    # dummy weights write garbage: the image fails for its answers; every query went through the engine
    assert summary["images"] == 1 and summary["queries"] >= 60
    assert all(f["kind"] == "answers" for f in summary["failed_images"]), summary["failed_images"]
    assert "engine_error" not in summary["answer_failures"]
    recs = [json.loads(x) for x in (out / IMAGE.stem / "answers.jsonl").read_text().splitlines()]
    assert len(recs) == summary["queries"] and all(r["text"] for r in recs)
    assert rc == 1
