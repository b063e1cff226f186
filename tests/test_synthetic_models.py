"""Synthetic model folders (Qwen3-VL and Pixtral): tokenizer ids, chat templates, image token counts, config shapes, tiny weights."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

try:  # a missing hf extra skips; a broken install fails
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ModuleNotFoundError as exc:
    pytest.skip(f"needs the hf extra ({exc})", allow_module_level=True)

from densify.synthetic.models import TOKEN_IDS, build_model_folder, main  # noqa: E402

SPECIAL_IDS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655,
    "<|video_pad|>": 151656, "<think>": 151667, "</think>": 151668,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("tiny"), shape="tiny", seed=0)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("4b"), shape="4b")


@pytest.fixture(scope="module")
def tokenizer(big):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(big)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_folder_files(tiny, big):
    common = {"config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "preprocessor_config.json", "video_preprocessor_config.json", "generation_config.json"}
    assert common <= {p.name for p in big.iterdir()}
    assert not list(big.glob("*.safetensors"))  # 4b: served with load_format="dummy"
    assert common | {"model.safetensors"} <= {p.name for p in tiny.iterdir()}
    assert (tiny / "model.safetensors").stat().st_size < 60e6
    pre = json.loads((big / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "Qwen2VLImageProcessorFast"
    assert pre["processor_class"] == "Qwen3VLProcessor"
    assert (pre["patch_size"], pre["temporal_patch_size"], pre["merge_size"]) == (16, 2, 2)
    assert pre["image_mean"] == pre["image_std"] == [0.5, 0.5, 0.5]
    assert pre["size"] == {"shortest_edge": 65536, "longest_edge": 16777216}
    video = json.loads((big / "video_preprocessor_config.json").read_text())
    assert video["video_processor_type"] == "Qwen3VLVideoProcessor"
    gen = json.loads((big / "generation_config.json").read_text())
    assert gen["do_sample"] is False and gen["eos_token_id"] == [151645, 151643]
    # the tokenizer files are identical between shapes
    assert _sha(tiny / "tokenizer.json") == _sha(big / "tokenizer.json")


def test_special_token_ids(tokenizer):
    for tok, i in SPECIAL_IDS.items():
        assert TOKEN_IDS[tok] == i
        assert tokenizer.convert_tokens_to_ids(tok) == i
        assert tokenizer(tok, add_special_tokens=False)["input_ids"] == [i]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 151645
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 151643
    assert len(tokenizer) == 151669
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"


def test_tokenizer_roundtrip_and_digits(tokenizer):
    text = ("Given this image, how far is the point at coordinates (1234, 567) from the camera? "
            "<think> </think><answer>3.42</answer> Déjà vu 😀")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert all(i < 151643 or i in SPECIAL_IDS.values() for i in ids)
    pieces = [tokenizer.decode([i]) for i in tokenizer("3.42 1234", add_special_tokens=False)["input_ids"]]
    assert pieces == ["3", ".", "4", "2", " ", "1", "2", "3", "4"]  # digits one by one, as Qwen
    # trained words are single tokens
    assert len(tokenizer(" camera", add_special_tokens=False)["input_ids"]) == 1
    # special tokens are dropped by skip_special_tokens; <think> is not special (as in Qwen3-VL)
    ids = tokenizer("<|im_start|><think> </think>ok<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think> </think>ok"


def test_chat_template(tokenizer):
    msgs = [{"role": "system", "content": "You are a depth model."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How far?"}]}]
    out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert out == ("<|im_start|>system\nYou are a depth model.<|im_end|>\n"
                   "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How far?<|im_end|>\n"
                   "<|im_start|>assistant\n")
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q"}]}]
    out = tokenizer.apply_chat_template(two, add_generation_prompt=False, tokenize=False)
    assert out == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                   "<|vision_start|><|image_pad|><|vision_end|>Q<|im_end|>\n")


@pytest.mark.parametrize("shape", ["4b", "tiny"])
def test_image_token_count(shape, big, tiny):
    from PIL import Image

    from densify.engines.hf import load_image_processor

    ip = load_image_processor(str(big if shape == "4b" else tiny))
    img = Image.fromarray(np.zeros((750, 1000, 3), np.uint8))
    out = ip(images=[img], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 46, 62]]  # 736 x 992 after rounding to 32
    assert int(out["image_grid_thw"].prod()) // 4 == 713
    assert tuple(out["pixel_values"].shape) == (46 * 62, 3 * 2 * 16 * 16)


def test_auto_processor(big):
    # Qwen3VLProcessor always loads its video processor, which needs torchvision
    pytest.importorskip("torchvision", exc_type=ModuleNotFoundError)
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(big)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    out = proc(text=[text], images=[Image.fromarray(np.zeros((750, 1000, 3), np.uint8))], return_tensors="pt")
    assert int((out["input_ids"] == 151655).sum()) == 713


def test_4b_config(big):
    cfg = json.loads((big / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3VLForConditionalGeneration"] and cfg["model_type"] == "qwen3_vl"
    assert (cfg["image_token_id"], cfg["video_token_id"]) == (151655, 151656)
    assert (cfg["vision_start_token_id"], cfg["vision_end_token_id"]) == (151652, 151653)
    assert cfg["dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True
    t, v = cfg["text_config"], cfg["vision_config"]
    assert t["model_type"] == "qwen3_vl_text" and v["model_type"] == "qwen3_vl"
    assert {k: t[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "num_key_value_heads", "head_dim", "vocab_size", "rope_theta")} == {
        "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "rope_theta": 5000000}
    assert t["rope_scaling"]["mrope_section"] == [24, 20, 20] and t["rope_scaling"]["mrope_interleaved"] is True
    assert t["tie_word_embeddings"] is True
    assert {k: v[k] for k in ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size",
                              "spatial_merge_size", "temporal_patch_size", "out_hidden_size",
                              "deepstack_visual_indexes", "num_position_embeddings")} == {
        "depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 2560,
        "deepstack_visual_indexes": [5, 11, 17], "num_position_embeddings": 2304}

    from transformers import AutoConfig
    c = AutoConfig.from_pretrained(big)
    assert type(c).__name__ == "Qwen3VLConfig"
    assert c.text_config.hidden_size == 2560 and c.vision_config.depth == 24
    rope = getattr(c.text_config, "rope_parameters", None) or getattr(c.text_config, "rope_scaling", None)
    assert list(rope["mrope_section"]) == [24, 20, 20]


def test_tiny_seeded_weights(tiny, tmp_path):
    again = build_model_folder(tmp_path / "again", shape="tiny", seed=0)
    assert _sha(again / "model.safetensors") == _sha(tiny / "model.safetensors")
    other = build_model_folder(tmp_path / "other", shape="tiny", seed=1)
    assert _sha(other / "model.safetensors") != _sha(tiny / "model.safetensors")


def test_tiny_loads_and_generates(tiny):
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(tiny, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert model.config.text_config.hidden_size == 128
    tok = AutoTokenizer.from_pretrained(tiny)
    text = tok.apply_chat_template([{"role": "user", "content": "How far is the wall?"}],
                                   add_generation_prompt=True, tokenize=False)
    enc = tok([text], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    assert len(new) >= 1
    assert len(set(new)) > len(new) // 2  # varied tokens, not one repeated token
    assert tok.decode(new, skip_special_tokens=True)


def test_cli(tmp_path, capsys):
    assert main([str(tmp_path / "cli4b"), "--shape", "4b"]) == 0
    assert (tmp_path / "cli4b" / "config.json").is_file()
    assert not list((tmp_path / "cli4b").glob("*.safetensors"))
    assert str(tmp_path / "cli4b") in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- Pixtral
@pytest.fixture(scope="module")
def pixtral_tiny(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("pixtral-tiny"), shape="pixtral-tiny", seed=0)


@pytest.fixture(scope="module")
def pixtral_12b(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("pixtral-12b"), shape="pixtral-12b")


@pytest.fixture(scope="module")
def pixtral_tok(pixtral_12b):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(pixtral_12b)


def test_pixtral_12b_config_is_shape_faithful(pixtral_12b):
    cfg = json.loads((pixtral_12b / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"] and cfg["model_type"] == "llava"
    assert cfg["image_token_index"] == 10 and cfg["projector_hidden_act"] == "gelu"
    assert cfg["vision_feature_layer"] == -1 and cfg["vision_feature_select_strategy"] == "full"
    t, v = cfg["text_config"], cfg["vision_config"]
    assert {k: t[k] for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                              "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size", "rope_theta")} == {
        "model_type": "mistral", "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336, "vocab_size": 131072,
        "rope_theta": 1e9}
    assert {k: v[k] for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                              "image_size", "intermediate_size", "rope_theta")} == {
        "model_type": "pixtral", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
        "patch_size": 16, "image_size": 1024, "intermediate_size": 4096, "rope_theta": 1e4}
    assert not list(pixtral_12b.glob("*.safetensors"))  # served with load_format="dummy"

    from transformers import AutoConfig
    c = AutoConfig.from_pretrained(pixtral_12b)
    assert (type(c).__name__, type(c.text_config).__name__, type(c.vision_config).__name__) == (
        "LlavaConfig", "MistralConfig", "PixtralVisionConfig")
    assert c.image_token_id == 10 and c.text_config.hidden_size == 5120 and c.vision_config.num_hidden_layers == 24
    with torch.device("meta"):  # the parameter count of Pixtral-12B, without allocating it
        from transformers import AutoModelForImageTextToText
        model = AutoModelForImageTextToText.from_config(c)
    n = sum(p.numel() for p in model.parameters())
    assert type(model).__name__ == "LlavaForConditionalGeneration" and 12.3e9 < n < 12.8e9, n


def test_pixtral_tokens_and_chat(pixtral_tok):
    tok = pixtral_tok
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "<pad>",
                                                       "[IMG_BREAK]", "[IMG_END]")}
    assert ids == {"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4, "[IMG]": 10, "<pad>": 11,
                   "[IMG_BREAK]": 12, "[IMG_END]": 13}
    assert len(tok) == 131072 and (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    # a Llama-style tokenizer: plain tokenisation prepends <s>; a rendered chat already holds it
    assert tok("3.42")["input_ids"][0] == 1 and tok("3.42", add_special_tokens=False)["input_ids"][0] != 1
    pieces = [tok.decode([i]) for i in tok("3.42 1234", add_special_tokens=False)["input_ids"]]
    assert pieces == ["3", ".", "4", "2", " ", "1", "2", "3", "4"]
    text = "<think> The point is around 3.42 meters away from the camera. </think>\n\n<answer> 3.42 </answer>"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    q = "Given this image, how far is the point pointed by the red arrow from the camera?"
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == f"<s>[INST][IMG]{q}[/INST]"
    # DepthLM's eval.py names the text `content`: the same prompt
    msgs2 = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "content": q}]}]
    assert tok.apply_chat_template(msgs2, add_generation_prompt=True, tokenize=False) == f"<s>[INST][IMG]{q}[/INST]"
    sys_msgs = [{"role": "system", "content": "S"}] + msgs
    assert tok.apply_chat_template(sys_msgs, add_generation_prompt=True, tokenize=False) == f"<s>[INST]S\n\n[IMG]{q}[/INST]"


def test_pixtral_image_processor_and_token_rows(pixtral_12b):
    from PIL import Image

    from densify.engines.hf import load_image_processor

    ip = load_image_processor(str(pixtral_12b))
    out = ip(images=[Image.fromarray(np.zeros((360, 480, 3), np.uint8))], return_tensors="pt")
    # 480x360 -> patches of 16: 30 columns, ceil(360 / 16) = 23 rows
    assert [list(map(int, s)) for s in out["image_sizes"]] == [[368, 480]]
    big = ip(images=[Image.fromarray(np.zeros((1500, 2000, 3), np.uint8))], return_tensors="pt")
    assert [list(map(int, s)) for s in big["image_sizes"]] == [[768, 1024]]  # longest edge 1024


def test_pixtral_tiny_loads_and_generates(pixtral_tiny):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(pixtral_tiny, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlavaForConditionalGeneration" and model.config.text_config.hidden_size == 128
    assert (pixtral_tiny / "model.safetensors").stat().st_size < 80e6
    again = build_model_folder(pixtral_tiny.parent / "again", shape="pixtral-tiny", seed=0)
    assert _sha(again / "model.safetensors") == _sha(pixtral_tiny / "model.safetensors")


def test_make_model_command_builds_a_pixtral_folder(tmp_path, capsys):
    from pipelines.cli import main as cli

    assert cli(["make-model", str(tmp_path / "p12b"), "--shape", "pixtral-12b"]) == 0
    assert "pixtral-12b Pixtral (LLaVA) folder" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "p12b" / "config.json").read_text())
    assert cfg["text_config"]["hidden_size"] == 5120 and (tmp_path / "p12b" / "processor_config.json").is_file()
