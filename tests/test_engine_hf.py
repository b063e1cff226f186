"""The hf engine on the tiny synthetic Qwen3-VL model (CPU, fp32)."""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest

try:  # a missing hf extra skips; a broken install fails
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ModuleNotFoundError as exc:
    pytest.skip(f"needs the hf extra ({exc})", allow_module_level=True)

from densify.config.profiles import load_profile  # noqa: E402
from densify.engines import EngineBatch, PromptImage, Query, Sampling, create_engine  # noqa: E402
from densify.io.cameras import Camera, prepare_image  # noqa: E402
from densify.queries.plan import plan_queries  # noqa: E402
from densify.queries.prompts import depth_batch  # noqa: E402
from densify.synthetic.models import build_model_folder  # noqa: E402

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("tiny-hf"), shape="tiny", seed=0)


@pytest.fixture(scope="module")
def profile():
    return load_profile("vlm3-depth")


@pytest.fixture(scope="module")
def engine(folder, profile):
    eng = create_engine("hf", profile=profile, model=str(folder), device="cpu", batch_size=3)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def batch(profile):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    cam = Camera(1000.0, 1000.0, 32.0, 24.0, 64, 48)
    prep = prepare_image(rgb, cam, focal=profile.preprocess.focal, coord_range=profile.coord_range)
    plan = plan_queries(np.array([[10, 10], [32, 24], [60, 40]]), prep.pixel_map)
    b = depth_batch(prep, plan, profile, uid="img0")
    b.sampling = dataclasses.replace(b.sampling, max_tokens=MAX_TOKENS)
    return b


def _with(batch: EngineBatch, **sampling) -> EngineBatch:
    return EngineBatch(batch.images, batch.queries, dataclasses.replace(batch.sampling, **sampling), batch.tag)


@pytest.fixture(scope="module")
def first(engine, batch):
    """batch_size 3, with log-probs."""
    engine.batch_size = 3
    return engine.generate(_with(batch, logprobs=True))


def test_engine_registered(engine):
    from densify.engines.hf import HFEngine
    assert isinstance(engine, HFEngine) and engine.name == "hf"
    assert engine.device == "cpu" and str(engine.dtype) == "torch.float32"


def test_generate(first, batch):
    assert len(first) == len(batch.queries) == 3
    for c in first:
        assert c.text and c.error is None
        assert 1 <= c.n_generated_tokens <= MAX_TOKENS
        assert c.n_prompt_tokens > 70  # the 64x48 image becomes 320x224 -> 70 image tokens, plus the text


def test_logprobs(first, engine, batch):
    for c in first:
        assert c.logprob is not None and math.isfinite(c.logprob) and c.logprob <= 0


def test_greedy_deterministic_and_batch_invariant(first, engine, batch):
    engine.batch_size = 3
    again = engine.generate(batch)  # no logprobs: must not change the answers either
    assert [c.text for c in again] == [c.text for c in first]
    assert all(c.logprob is None for c in again)
    engine.batch_size = 1
    try:
        single = engine.generate(_with(batch, logprobs=True))
    finally:
        engine.batch_size = 3
    assert [c.text for c in single] == [c.text for c in first]
    assert [c.n_prompt_tokens for c in single] == [c.n_prompt_tokens for c in first]
    assert [c.n_generated_tokens for c in single] == [c.n_generated_tokens for c in first]
    for a, b in zip(single, first):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)


def test_inputs(engine, batch):
    """Placeholder expansion, left padding and pixel reuse, as the processor would build them."""
    cache: dict = {}
    inputs = engine.build_inputs(batch, batch.queries, cache)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert list(cache) == ["img0"]  # processed once for the three queries
    grid = inputs["image_grid_thw"]
    assert grid.tolist() == [[1, 14, 20]] * 3
    per_image = int(grid[0].prod())
    assert inputs["pixel_values"].shape[0] == 3 * per_image
    assert ((ids == 151655).sum(1) == per_image // 4).all()
    assert (mask[:, -1] == 1).all()  # left padding
    if "mm_token_type_ids" in inputs:
        assert (inputs["mm_token_type_ids"] == (ids == 151655).long()).all()
    text = engine.tokenizer.decode(ids[0][mask[0].bool()])
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert text.endswith(batch.queries[0].text + "<|im_end|>\n<|im_start|>assistant\n")


def test_two_image_inputs(engine):
    """Two images in one turn (the corr/pose layout): image 1, image 2, then the text."""
    rng = np.random.default_rng(1)
    a = PromptImage("a", rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    b = PromptImage("b", rng.integers(0, 256, (96, 64, 3), dtype=np.uint8))
    batch = EngineBatch({"a": a, "b": b}, [Query("Q1", ("a", "b")), Query("Q2", ("b", "a"))],
                        Sampling(max_tokens=4, system_prompt="SYS"))
    cache: dict = {}
    inputs = engine.build_inputs(batch, batch.queries, cache)
    assert sorted(cache) == ["a", "b"]
    ga, gb = (cache[u][0]["image_grid_thw"][0].tolist() for u in ("a", "b"))
    assert ga != gb
    assert inputs["image_grid_thw"].tolist() == [ga, gb, gb, ga]
    mask = inputs["attention_mask"]
    text = engine.tokenizer.decode(inputs["input_ids"][0][mask[0].bool()])
    na, nb = ga[0] * ga[1] * ga[2] // 4, gb[0] * gb[1] * gb[2] // 4
    assert text == ("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n"
                    f"<|vision_start|>{'<|image_pad|>' * na}<|vision_end|>"
                    f"<|vision_start|>{'<|image_pad|>' * nb}<|vision_end|>Q1<|im_end|>\n<|im_start|>assistant\n")


def test_prefill_and_structured_regex(first, engine, batch, caplog):
    import densify.engines.hf as hf

    hf._warned.discard("structured_regex")
    prefill = "<think> </think><answer>"
    with caplog.at_level(logging.WARNING, logger="densify.engines.hf"):
        out = engine.generate(_with(batch, prefill=prefill, structured_regex=r"<answer>[0-9.]+</answer>"))
        engine.generate(_with(batch, prefill=prefill, max_tokens=1, structured_regex="x"))
    assert sum("structured" in r.getMessage() for r in caplog.records) == 1  # warned once
    n_prefill = len(engine.tokenizer(prefill, add_special_tokens=False)["input_ids"])
    for c, base in zip(out, first):
        assert c.text.startswith(prefill) and len(c.text) > len(prefill)
        assert c.n_prompt_tokens == base.n_prompt_tokens + n_prefill
        assert 1 <= c.n_generated_tokens <= MAX_TOKENS


def test_bad_image_reference(engine, batch):
    bad = EngineBatch(batch.images, [Query("Q", ("missing",))], batch.sampling)
    with pytest.raises(ValueError, match="missing"):
        engine.generate(bad)


def test_dummy_load_format_builds_random_weights_without_weight_files(tmp_path, profile, batch):
    """load_format=dummy (benchmarks): the model is built from the folder's config alone, on the device, and
    answers (random text); the same folder without it and without weights cannot load."""
    bare = build_model_folder(tmp_path / "bare", shape="tiny", save_weights=False)
    assert not list(bare.glob("*.safetensors"))
    eng = create_engine("hf", profile=profile, model=str(bare), device="cpu", load_format="dummy", batch_size=3)
    try:
        outs = eng.generate(batch)
        assert len(outs) == len(batch.queries) and all(o.error is None and o.n_generated_tokens for o in outs)
        assert eng.options.load_format == "dummy"
    finally:
        eng.close()
    from densify.engines import EngineStartError

    with pytest.raises(EngineStartError, match="could not start"):
        create_engine("hf", profile=profile, model=str(bare), device="cpu")
