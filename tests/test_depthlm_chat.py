"""DepthLM's chats as released, byte for byte, through the hf engine on tiny synthetic models (CPU):
Pixtral (the released facebook/DepthLM: no system message, image then question) and Qwen (the variants:
system `You are a helpful assistant.`); the hf engine builds any checkpoint's inputs (Pixtral included)."""

from __future__ import annotations

import json

import numpy as np
import pytest

try:  # a missing hf extra skips; a broken install fails
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ModuleNotFoundError as exc:
    pytest.skip(f"needs the hf extra ({exc})", allow_module_level=True)

from densify.config.profiles import load_profile  # noqa: E402
from densify.engines import create_engine  # noqa: E402
from densify.io.cameras import Camera, prepare_image  # noqa: E402
from densify.queries.plan import plan_queries  # noqa: E402
from densify.queries.prompts import depth_batch  # noqa: E402
from densify.synthetic.models import build_model_folder  # noqa: E402

QUESTION = ("Given this image, how far is the point pointed by the red arrow from the camera? Output the thinking "
            "process in <think> </think> and final answer (the meter number only, without the unit) in <answer> "
            "</answer> tags.")


@pytest.fixture(scope="module")
def pixtral(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("pixtral-tiny"), shape="pixtral-tiny")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("qwen-tiny"), shape="tiny")


def marked_batch(profile_name: str, n_points: int = 3, size=(96, 64)):
    p = load_profile(profile_name)
    w, h = size
    rgb = np.random.default_rng(0).integers(0, 200, (h, w, 3), dtype=np.uint8)
    cam = Camera(float(p.preprocess.focal), float(p.preprocess.focal), w / 2, h / 2, w, h)  # kept at its size
    prep = prepare_image(rgb, cam, coord_range=p.coord_range, **p.preprocess.image_options())
    pts = np.array([[20 + 10 * i, 30] for i in range(n_points)], float)
    plan = plan_queries(pts, prep.pixel_map, marker=p.marker)
    return p, prep, depth_batch(prep, plan, p, uid="img")


@pytest.fixture(scope="module")
def pixtral_engine(pixtral):
    eng = create_engine("hf", profile="depthlm", model=str(pixtral), device="cpu", batch_size=4)
    yield eng
    eng.close()


def test_pixtral_prompt_byte_for_byte(pixtral_engine):
    p, prep, b = marked_batch("depthlm")
    assert b.sampling.system_prompt is None
    assert pixtral_engine.prompt_text(b.queries[0], b.sampling) == f"<s>[INST][IMG]{QUESTION}[/INST]"
    inputs = pixtral_engine.build_inputs(b, b.queries)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    # 96x64 -> 6 columns x 4 rows of 16-px patches: [IMG] x 6 + [IMG_BREAK] per row, the last [IMG_END]
    image = ("[IMG]" * 6 + "[IMG_BREAK]") * 3 + "[IMG]" * 6 + "[IMG_END]"
    text = pixtral_engine.tokenizer.decode(ids[0][mask[0].bool()])
    assert text == f"<s>[INST]{image}{QUESTION}[/INST]"
    assert int((ids[0] == 1).sum()) == 1  # one BOS: the template's, none added by tokenising
    assert inputs["image_sizes"].tolist() == [[64, 96]] * 3
    assert tuple(inputs["pixel_values"].shape) == (3, 3, 64, 96)
    # each query shows its own marked image
    assert not torch.equal(inputs["pixel_values"][0], inputs["pixel_values"][1])


def test_pixtral_pads_images_of_different_sizes(pixtral_engine):
    from densify.engines.base import EngineBatch, PromptImage, Query, Sampling

    rng = np.random.default_rng(2)
    a = PromptImage("a", rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    b = PromptImage("b", rng.integers(0, 256, (48, 32, 3), dtype=np.uint8))
    batch = EngineBatch({"a": a, "b": b}, [Query("Q1", ("a", "b"))], Sampling(max_tokens=2))
    inputs = pixtral_engine.build_inputs(batch, batch.queries)
    assert inputs["image_sizes"].tolist() == [[64, 96], [48, 32]]
    pv = inputs["pixel_values"]
    assert tuple(pv.shape) == (2, 3, 64, 96) and float(pv[1, :, 48:, :].abs().sum()) == 0.0
    text = pixtral_engine.tokenizer.decode(inputs["input_ids"][0])
    assert text == ("<s>[INST]" + ("[IMG]" * 6 + "[IMG_BREAK]") * 3 + "[IMG]" * 6 + "[IMG_END]"
                    + ("[IMG]" * 2 + "[IMG_BREAK]") * 2 + "[IMG]" * 2 + "[IMG_END]Q1[/INST]")


def test_pixtral_generates_greedy_answers(pixtral_engine):
    _, _, b = marked_batch("depthlm", n_points=4)
    b.sampling = type(b.sampling)(max_tokens=6, logprobs=True)
    out = pixtral_engine.generate(b)
    assert len(out) == 4 and all(c.error is None and c.text for c in out)
    assert all(1 <= c.n_generated_tokens <= 6 and c.logprob <= 0 for c in out)
    # 24 image tokens + 4 breaks/end + BOS, [INST], the question, [/INST]
    n_q = len(pixtral_engine.tokenizer(QUESTION, add_special_tokens=False)["input_ids"])
    assert {c.n_prompt_tokens for c in out} == {1 + 1 + 28 + n_q + 1}
    pixtral_engine.batch_size = 1
    try:
        again = pixtral_engine.generate(b)
    finally:
        pixtral_engine.batch_size = 4
    assert [c.text for c in again] == [c.text for c in out]  # greedy and batch-invariant


def test_qwen_variant_prompt_byte_for_byte(qwen):
    eng = create_engine("hf", profile="depthlm-qwen", model=str(qwen), device="cpu", batch_size=4)
    try:
        p, prep, b = marked_batch("depthlm-qwen", size=(320, 224))
        assert eng.prompt_text(b.queries[0], b.sampling) == (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
        inputs = eng.build_inputs(b, b.queries)
        text = eng.tokenizer.decode(inputs["input_ids"][0][inputs["attention_mask"][0].bool()])
        # 320x224 -> 20x14 patches of 16 -> merged 2x2: 70 image tokens
        assert inputs["image_grid_thw"].tolist() == [[1, 14, 20]] * 3
        assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                        f"<|vision_start|>{'<|image_pad|>' * 70}<|vision_end|>{QUESTION}<|im_end|>\n"
                        "<|im_start|>assistant\n")
    finally:
        eng.close()


def test_densify_depth_with_the_depthlm_profile_on_pixtral_tiny(pixtral, tmp_path):
    """`densify depth --profile depthlm --engine hf` on the Pixtral-shaped model: every query is asked
    (random weights answer garbage, so the image fails for its answers, not for the engine)."""
    from pipelines.cli import main
    from densify.synthetic.scenes import SceneSpec, make_scene

    paths = make_scene(SceneSpec(seed=0, n_views=1, width=96, height=64)).save(tmp_path / "scene")
    out = tmp_path / "out"
    rc = main(["depth", str(paths[0]), "--out", str(out), "--profile", "depthlm", "--engine", "hf",
               "--model", str(pixtral), "--count", "4", "--intrinsics", "300,300,48,32", "--set", "plan.mode=grid", "--set", "densify.method=linear",
               "--set", "engine.options.device=cpu", "--set", "engine.options.batch_size=4",
               "--set", "outputs.ply=false"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 1 and summary["queries"] == 4, summary
    assert set(summary["answer_failures"]) <= {"missing_tag", "not_a_number"}, summary
    assert [f["kind"] for f in summary["failed_images"]] == ["answers"] and rc == 1
    recs = [json.loads(line) for line in (out / "view_000" / "answers.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(r["prompt"] is None and r["text"] for r in recs)


class _Model:
    """What model_inputs reads of a model: its config's image token and its forward's arguments."""

    def __init__(self, token_id):
        self.config = type("Config", (), {"image_token_index": token_id})()

    def forward(self, input_ids=None, pixel_values=None):
        pass


def test_inputs_go_through_the_processor_when_it_loads(pixtral, monkeypatch):
    """Where the processor can be built (torchvision installed) it makes the inputs, any architecture."""
    import transformers as tf

    from densify.engines.base import EngineBatch, PromptImage, Query, Sampling
    from densify.engines.hf import ProcessorInputs, model_inputs

    calls = []

    class FakeProcessor:
        image_processor = object()
        tokenizer = type("T", (), {"padding_side": "right"})()
        chat_template = None

        def __call__(self, **kw):
            calls.append(kw)
            return {"input_ids": torch.tensor([[5, 10, 6]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}

    monkeypatch.setattr(tf.AutoProcessor, "from_pretrained", classmethod(lambda cls, path, **kw: FakeProcessor()))
    inp = model_inputs(str(pixtral), None, _Model(10), "TEMPLATE")
    assert isinstance(inp, ProcessorInputs) and inp.processor.tokenizer.padding_side == "left"
    assert inp.processor.chat_template == "TEMPLATE"
    a = PromptImage("a", np.zeros((32, 48, 3), np.uint8))
    b = PromptImage("b", np.full((16, 16, 3), 7, np.uint8))
    batch = EngineBatch({"a": a, "b": b}, [Query("Q", ("a", "b"))], Sampling())
    inp(["<s>[INST][IMG][IMG]Q[/INST]"], [[batch.images["a"], batch.images["b"]]], {})
    [kw] = calls
    assert kw["add_special_tokens"] is False and kw["padding"] is True and kw["text"] == ["<s>[INST][IMG][IMG]Q[/INST]"]
    assert [[im.size for im in ims] for ims in kw["images"]] == [[(48, 32), (16, 16)]]  # per text, in order


def test_an_unknown_processor_without_torchvision_is_one_clear_error(pixtral, tmp_path, monkeypatch):
    import shutil

    import transformers as tf

    from densify.engines.base import EngineError
    from densify.engines.hf import model_inputs

    other = tmp_path / "other"
    shutil.copytree(pixtral, other)
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        cfg = json.loads((other / name).read_text())
        cfg["processor_class"] = "FooProcessor"
        (other / name).write_text(json.dumps(cfg))

    def no_torchvision(cls, path, **kw):
        raise ImportError("FooProcessor requires the Torchvision library")

    monkeypatch.setattr(tf.AutoProcessor, "from_pretrained", classmethod(no_torchvision))
    with pytest.raises(EngineError, match="FooProcessor.*install torchvision"):
        model_inputs(str(other), None, _Model(10), None)
