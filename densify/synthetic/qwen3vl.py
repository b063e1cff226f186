"""Synthetic Qwen3-VL model folders: real file formats, fake weights.

`build_model_folder(out, shape="4b")` writes a folder that vLLM serves with `load_format="dummy"` and that
transformers loads with `AutoProcessor` / `AutoConfig` (no weights): the real Qwen3-VL-4B shape, so memory
and speed measurements are those of VLM3-depth. `shape="tiny"` writes a small model with seeded random
weights that `AutoModelForImageTextToText.from_pretrained` loads and runs on a CPU in about a second.

The tokenizer is made here (byte-level BPE trained on a small embedded corpus, digits split one by one as
Qwen does), padded with filler entries so that Qwen's special tokens sit at their real ids; the processor
configs are those of the real checkpoint. See ../shared/reference/model-formats.md.

    python -m densify.synthetic.qwen3vl OUT_DIR --shape tiny|4b [--seed 0] [--no-weights]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- tokens
FIRST_SPECIAL_ID = 151643
VOCAB_SIZE = 151936
# Qwen3-VL's added tokens at their real ids; True = special (dropped by skip_special_tokens).
ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),        # 151643
    ("<|im_start|>", True),         # 151644
    ("<|im_end|>", True),           # 151645
    ("<|object_ref_start|>", True),  # 151646
    ("<|object_ref_end|>", True),   # 151647
    ("<|box_start|>", True),        # 151648
    ("<|box_end|>", True),          # 151649
    ("<|quad_start|>", True),       # 151650
    ("<|quad_end|>", True),         # 151651
    ("<|vision_start|>", True),     # 151652
    ("<|vision_end|>", True),       # 151653
    ("<|vision_pad|>", True),       # 151654
    ("<|image_pad|>", True),        # 151655
    ("<|video_pad|>", True),        # 151656
    ("<tool_call>", False),         # 151657
    ("</tool_call>", False),        # 151658
    ("<|fim_prefix|>", False),      # 151659
    ("<|fim_middle|>", False),      # 151660
    ("<|fim_suffix|>", False),      # 151661
    ("<|fim_pad|>", False),         # 151662
    ("<|repo_name|>", False),       # 151663
    ("<|file_sep|>", False),        # 151664
    ("<tool_response>", False),     # 151665
    ("</tool_response>", False),    # 151666
    ("<think>", False),             # 151667
    ("</think>", False),            # 151668
]
TOKEN_IDS = {tok: FIRST_SPECIAL_ID + i for i, (tok, _) in enumerate(ADDED_TOKENS)}
EXTRA_SPECIAL_TOKENS = [t for t, special in ADDED_TOKENS[1:14]]  # <|im_start|> .. <|video_pad|>

# Qwen2's pre-tokenizer regex (transformers' Qwen2Tokenizer rebuilds exactly this pipeline on load):
# \p{N} on its own splits every digit into its own pre-token.
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
BPE_VOCAB = 4000  # learned entries (bytes + merges); the rest up to FIRST_SPECIAL_ID is filler

CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0].content is string %}\n"
    "        {{- messages[0].content }}\n"
    "    {%- else %}\n"
    "        {%- for content in messages[0].content %}\n"
    "            {%- if 'text' in content %}\n"
    "                {{- content.text }}\n"
    "            {%- endif %}\n"
    "        {%- endfor %}\n"
    "    {%- endif %}\n"
    "    {{- '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- set image_count = namespace(value=0) %}\n"
    "{%- set video_count = namespace(value=0) %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n"
    "        {%- if message.content is string %}\n"
    "            {{- message.content }}\n"
    "        {%- else %}\n"
    "            {%- for content in message.content %}\n"
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}\n"
    "                    {%- set image_count.value = image_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|image_pad|><|vision_end|>\n"
    "                {%- elif content.type == 'video' or 'video' in content %}\n"
    "                    {%- set video_count.value = video_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|video_pad|><|vision_end|>\n"
    "                {%- elif 'text' in content %}\n"
    "                    {{- content.text }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == 'assistant' %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n"
    "        {%- if message.content is string %}\n"
    "            {{- message.content }}\n"
    "        {%- else %}\n"
    "            {%- for content_item in message.content %}\n"
    "                {%- if 'text' in content_item %}\n"
    "                    {{- content_item.text }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

_CORPUS_TEXT = """\
The quick brown fox jumps over the lazy dog. A picture of a room with a table, a chair, a window and a door.
Given this image, how far is the point from the camera? The wall is about three meters away from the camera.
The answer is the distance in meters. I think the point lies on the floor, close to the camera.
<think> The point is on the wall behind the sofa. </think><answer>3.42</answer>
<think> </think><answer>1.25</answer> <think> The table is near. </think> <answer> 0.87 </answer>
<think> [think process] </think>

(440, 60) (1024, 683) (0, 39, 652, 999) Rotation angle: 89.7 degrees. Translation distance: 1.98 meters
Yaw=+89.6°, Pitch=+2.6°, Roll=+6.1° The camera moves left, forward, unit vector (-0.69, +0.02, +0.72).
Report the answer as (x, y). Give a qualitative direction and the precise unit direction vector (x, y, z).
what is the relative rotation angle (in degrees) between the two camera poses? left right up down forward
backward near far above below inside outside image images pixel pixels point points depth distance metre
camera cameras first second width height normalised coordinates format relative final number only unit
user assistant system you are a helpful assistant. Output the thinking process and the final answer in tags.
one two three four five six seven eight nine ten hundred thousand zero half quarter meter meters degrees
0 1 2 3 4 5 6 7 8 9 10 12 25 50 75 99 100 125 250 500 750 1000 1500 2000 0.5 1.0 2.5 3.14 3.42 10.75 42.0
the of and to in is it that for on with as was at by this be are from or an have not which but they his
her she he we our their there what when where who how why can will would could should may might must do
"""


def _profile_texts() -> list[str]:
    """Every profile's prompts (with example coordinates), so their words are single tokens or close."""
    texts = []
    try:
        from densify.config.profiles import available_profiles, load_profile
        for name in available_profiles():
            prof = load_profile(name)
            for q in prof.questions.values():
                t = q.template.replace("{x}", "1234").replace("{y}", "567")
                t = t.replace("{x1}", "440").replace("{y1}", "60").replace("{axis}", "yaw")
                texts.append(t + prof.suffix)
            for extra in (prof.system_prompt, prof.prefill):
                if extra:
                    texts.append(extra)
    except Exception as exc:  # the tokenizer must still build outside a source checkout
        log.warning("could not read the profile templates for the tokenizer corpus: %s", exc)
    return texts


def _corpus() -> list[str]:
    lines = [ln for ln in _CORPUS_TEXT.splitlines() if ln.strip()]
    texts = lines + _profile_texts()
    # numbers as the models write them
    texts += [f"{i / 100:.2f}" for i in range(0, 2000, 7)] + [f"({i}, {2000 - i})" for i in range(0, 2000, 37)]
    return texts * 4  # repetition makes the frequent pairs win the merges


def _filler_token(i: int) -> str:
    return f"<|filler_{i}|>"


@functools.lru_cache(maxsize=2)
def tokenizer_json() -> str:
    """The tokenizer.json text (cached: training and padding take about a second)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    # the exact pipeline transformers' Qwen2Tokenizer builds (it replaces the loaded one with it)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(_corpus(), trainer=trainer)
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    if len(vocab) >= FIRST_SPECIAL_ID:
        raise RuntimeError("BPE vocabulary too large")
    taken = set(vocab)
    next_id = len(vocab)
    if sorted(vocab.values()) != list(range(next_id)):
        raise RuntimeError("BPE vocabulary ids are not contiguous")
    for i in range(next_id, FIRST_SPECIAL_ID):
        name = _filler_token(i)
        assert name not in taken
        vocab[name] = i
    data["added_tokens"] = [
        {"id": TOKEN_IDS[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": special}
        for t, special in ADDED_TOKENS
    ]
    data["model"]["dropout"] = None
    data["model"]["ignore_merges"] = False
    return json.dumps(data, ensure_ascii=False)


def tokenizer_config() -> dict:
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(TOKEN_IDS[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                "single_word": False, "special": special}
            for t, special in ADDED_TOKENS
        },
        "additional_special_tokens": EXTRA_SPECIAL_TOKENS,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


# ---------------------------------------------------------------------------------------------- shapes
CHECKPOINT_TRANSFORMERS_VERSION = "4.57.1"
SHAPES = {
    "4b": {
        "text": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, mrope_section=[24, 20, 20]),
        "vision": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                       deepstack_visual_indexes=[5, 11, 17]),
        "dtype": "bfloat16", "initializer_range": 0.02, "save_weights": False,
    },
    "tiny": {
        "text": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, mrope_section=[6, 5, 5]),
        "vision": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                       deepstack_visual_indexes=[1]),
        # weights are stored in bf16 (like the real checkpoint); a moderate std makes the residual stream
        # dominated by the layers rather than by the (tied) input embedding, so greedy decoding does not
        # just repeat the last prompt token
        "dtype": "bfloat16", "initializer_range": 0.25, "save_weights": True,
    },
}


def model_config(shape: str = "tiny") -> dict:
    """config.json in the form of the published Qwen3-VL-4B-Instruct checkpoint."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    s = SHAPES[shape]
    t, v = dict(s["text"]), dict(s["vision"])
    mrope = t.pop("mrope_section")
    if sum(mrope) * 2 != t["head_dim"]:
        raise ValueError("mrope_section must sum to head_dim / 2")
    text_config = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": TOKEN_IDS["<|endoftext|>"],
        "dtype": s["dtype"],
        "eos_token_id": TOKEN_IDS["<|im_end|>"],
        "hidden_act": "silu",
        "initializer_range": s["initializer_range"],
        "max_position_embeddings": 262144,
        "model_type": "qwen3_vl_text",
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": mrope, "rope_type": "default"},
        "rope_theta": 5000000,
        "tie_word_embeddings": True,
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
        **t,
    }
    vision_config = {
        "hidden_act": "gelu_pytorch_tanh",
        "in_channels": 3,
        "initializer_range": s["initializer_range"],
        "model_type": "qwen3_vl",
        "num_position_embeddings": 2304,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        **v,
    }
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "image_token_id": TOKEN_IDS["<|image_pad|>"],
        "model_type": "qwen3_vl",
        "text_config": dict(sorted(text_config.items())),
        "tie_word_embeddings": True,
        "video_token_id": TOKEN_IDS["<|video_pad|>"],
        "vision_config": dict(sorted(vision_config.items())),
        "vision_end_token_id": TOKEN_IDS["<|vision_end|>"],
        "vision_start_token_id": TOKEN_IDS["<|vision_start|>"],
        "dtype": s["dtype"],
        # as in the published checkpoint; transformers 5.4 also reads it (without it, it suspects a Mistral
        # tokenizer and warns about its regex)
        "transformers_version": CHECKPOINT_TRANSFORMERS_VERSION,
    }


PREPROCESSOR_CONFIG = {
    "crop_size": None,
    "data_format": "channels_first",
    "default_to_square": True,
    "device": None,
    "do_center_crop": None,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "image_std": [0.5, 0.5, 0.5],
    "input_data_format": None,
    "merge_size": 2,
    "patch_size": 16,
    "processor_class": "Qwen3VLProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "return_tensors": None,
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "temporal_patch_size": 2,
}

VIDEO_PREPROCESSOR_CONFIG = {
    "crop_size": None,
    "data_format": "channels_first",
    "default_to_square": True,
    "device": None,
    "do_center_crop": None,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "do_sample_frames": True,
    "fps": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "input_data_format": None,
    "max_frames": 768,
    "merge_size": 2,
    "min_frames": 4,
    "num_frames": None,
    "patch_size": 16,
    "processor_class": "Qwen3VLProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "return_metadata": False,
    "size": {"longest_edge": 25165824, "shortest_edge": 4096},
    "temporal_patch_size": 2,
    "video_metadata": None,
    "video_processor_type": "Qwen3VLVideoProcessor",
}

GENERATION_CONFIG = {
    "bos_token_id": TOKEN_IDS["<|endoftext|>"],
    "do_sample": False,
    "eos_token_id": [TOKEN_IDS["<|im_end|>"], TOKEN_IDS["<|endoftext|>"]],
    "pad_token_id": TOKEN_IDS["<|endoftext|>"],
    "transformers_version": CHECKPOINT_TRANSFORMERS_VERSION,
}


# ---------------------------------------------------------------------------------------------- folder
def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _save_tiny_weights(out: Path, config: dict, seed: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    cfg = AutoConfig.from_pretrained(out)
    dtype = getattr(torch, config["dtype"])
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
        std = float(config["text_config"]["initializer_range"])
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            # explicit, version-independent initialisation: every matrix N(0, std) (1/sqrt(fan_in) for the
            # vision tower so patch features stay O(1)), norms 1, biases 0
            for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
                if p.dim() == 1:
                    p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
                    continue
                if "visual" in name and "pos_embed" not in name:
                    fan_in = p[0].numel()
                    s = 1.0 / fan_in ** 0.5
                else:
                    s = std
                p.copy_(torch.randn(p.shape, generator=gen) * s)
        model = model.to(dtype)
        model.save_pretrained(out, safe_serialization=True)
    finally:
        torch.random.set_rng_state(state)


def build_model_folder(out_dir, *, shape: str = "tiny", save_weights: bool | None = None, seed: int = 0) -> Path:
    """Write a Qwen3-VL model folder of the given shape ("tiny" or "4b") to out_dir; return its path.

    save_weights defaults to True for "tiny" (seeded random weights, bf16 safetensors) and False for "4b"
    (config, tokenizer and processor files only: serve it with vLLM's load_format="dummy").
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model_config(shape)
    if save_weights is None:
        save_weights = SHAPES[shape]["save_weights"]

    (out / "tokenizer.json").write_text(tokenizer_json())
    _write_json(out / "tokenizer_config.json", tokenizer_config())
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    _write_json(out / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    _write_json(out / "video_preprocessor_config.json", VIDEO_PREPROCESSOR_CONFIG)
    _write_json(out / "generation_config.json", GENERATION_CONFIG)
    _write_json(out / "config.json", config)
    if save_weights:
        _save_tiny_weights(out, config, seed)
        # save_pretrained rewrites these in the running transformers' own form; keep the checkpoint's form
        _write_json(out / "config.json", config)
        _write_json(out / "generation_config.json", GENERATION_CONFIG)
    log.info("built %s Qwen3-VL folder %s in %.1f s", shape, out, time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m densify.synthetic.qwen3vl", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    w = ap.add_mutually_exclusive_group()
    w.add_argument("--weights", dest="save_weights", action="store_true", default=None,
                   help="save random weights (default for tiny)")
    w.add_argument("--no-weights", dest="save_weights", action="store_false",
                   help="config, tokenizer and processor files only (default for 4b)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = build_model_folder(args.out_dir, shape=args.shape, save_weights=args.save_weights, seed=args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
