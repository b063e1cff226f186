"""Synthetic model folders: real file formats, fake weights, for the two families densify's profiles drive.

`build_model_folder(out, shape=...)` writes a folder that vLLM serves with `load_format="dummy"` and that
transformers loads (`AutoConfig`, `AutoTokenizer`, the image processor; `AutoModelForImageTextToText`
with the saved weights of the tiny shapes). The shapes (`SHAPES`):

  tiny, 4b                 Qwen3-VL (`Qwen3VLForConditionalGeneration`): the VLM3 checkpoints' architecture;
                           4b is the real Qwen3-VL-4B shape, so memory and speed are those of VLM3-depth.
  pixtral-tiny, pixtral-12b  Pixtral-12B in the LLaVA layout (`LlavaForConditionalGeneration`, text
                           Mistral-Nemo, vision Pixtral): the released DepthLM checkpoint's architecture.

The tiny shapes save seeded random weights that run on a CPU in about a second; the big ones are config,
tokenizer and processor files only. Each family's tokenizer is made here with the `tokenizers` library
(byte-level BPE trained on a small embedded corpus, digits split one by one), its special tokens at the
real ids and filler entries up to the real vocabulary size; the chat templates and processor configs
follow the real checkpoints'. See ../shared/reference/model-formats.md.

With `answer=TEXT` any shape gets real weights whose greedy answer to every prompt is TEXT (the transformer
blocks add nothing and the output layer maps each answer token to the next: `answer_chain`): forced and
free answers can then be compared on a real engine, and a real shape still costs its full GEMMs and attention.

    python -m densify.synthetic.models OUT_DIR --shape tiny|4b|pixtral-tiny|pixtral-12b [--seed 0] [--no-weights]
                                       [--answer TEXT]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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


# Pixtral-12B's (Tekken) control tokens at ids 0-19, then <SPECIAL_20> ... <SPECIAL_999>; text tokens from 1000
PIXTRAL_ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<unk>", True), ("<s>", True), ("</s>", True), ("[INST]", True), ("[/INST]", True),
    ("[AVAILABLE_TOOLS]", True), ("[/AVAILABLE_TOOLS]", True), ("[TOOL_RESULTS]", True), ("[/TOOL_RESULTS]", True),
    ("[TOOL_CALLS]", True), ("[IMG]", True), ("<pad>", True), ("[IMG_BREAK]", True), ("[IMG_END]", True),
    ("[PREFIX]", True), ("[MIDDLE]", True), ("[SUFFIX]", True), ("[SYSTEM_PROMPT]", True), ("[/SYSTEM_PROMPT]", True),
    ("[TOOL_CONTENT]", True),
] + [(f"<SPECIAL_{i}>", True) for i in range(20, 1000)]
PIXTRAL_TOKEN_IDS = {tok: i for i, (tok, _) in enumerate(PIXTRAL_ADDED_TOKENS)}
PIXTRAL_VOCAB_SIZE = 131072
# Tekken's pre-tokenizer (the pattern transformers restores for Mistral tokenizers): \p{N} alone splits digits
TEKKEN_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where a family's tokens sit: BPE entries from `first_bpe_id`, `added` tokens at their ids, filler
    entries for every other id below `base_size`; `bos` is prepended by the post-processor (Llama-style)."""

    added: tuple[tuple[str, int, bool], ...]
    base_size: int
    first_bpe_id: int
    regex: str
    normalize_nfc: bool
    bos: str | None = None


LAYOUTS = {
    "qwen3vl": TokenLayout(tuple((t, TOKEN_IDS[t], sp) for t, sp in ADDED_TOKENS), FIRST_SPECIAL_ID, 0,
                           PRETOKENIZE_REGEX, True),
    "pixtral": TokenLayout(tuple((t, i, sp) for i, (t, sp) in enumerate(PIXTRAL_ADDED_TOKENS)), PIXTRAL_VOCAB_SIZE,
                           len(PIXTRAL_ADDED_TOKENS), TEKKEN_REGEX, False, bos="<s>"),
}


@functools.lru_cache(maxsize=4)
def tokenizer_json(family: str = "qwen3vl") -> str:
    """The tokenizer.json text of a family (cached: training and padding take about a second)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    lay = LAYOUTS[family]
    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    # Qwen: the exact pipeline transformers' Qwen2Tokenizer builds (it replaces the loaded one with it)
    if lay.normalize_nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(lay.regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    if lay.bos is None:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:  # prepends the BOS token, as Llama-style tokenizers do (chat templates render it themselves)
        bos_id = next(i for t, i, _ in lay.added if t == lay.bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{lay.bos} $A", pair=f"{lay.bos} $A $B",
                                                           special_tokens=[(lay.bos, bos_id)])
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(_corpus(), trainer=trainer)
    data = json.loads(tok.to_str())
    learned: dict[str, int] = data["model"]["vocab"]
    n = len(learned)
    if sorted(learned.values()) != list(range(n)):
        raise RuntimeError("BPE vocabulary ids are not contiguous")
    added_at = {i: t for t, i, _ in lay.added}
    bpe_ids = range(lay.first_bpe_id, lay.first_bpe_id + n)
    if any(i in added_at for i in bpe_ids) or bpe_ids.stop > lay.base_size:
        raise RuntimeError("BPE vocabulary too large for the token layout")
    vocab = {t: i + lay.first_bpe_id for t, i in learned.items()}
    for i in range(lay.base_size):  # every other id below base_size: an added token's entry, else filler
        if not bpe_ids.start <= i < bpe_ids.stop:
            name = added_at.get(i, _filler_token(i))
            assert name not in vocab
            vocab[name] = i
    data["model"]["vocab"] = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    data["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": special}
        for t, i, special in lay.added
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
        "family": "qwen3vl",
        "text": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, mrope_section=[24, 20, 20]),
        "vision": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                       deepstack_visual_indexes=[5, 11, 17]),
        "dtype": "bfloat16", "initializer_range": 0.02, "save_weights": False,
    },
    "tiny": {
        "family": "qwen3vl",
        "text": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, mrope_section=[6, 5, 5]),
        "vision": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                       deepstack_visual_indexes=[1]),
        # weights are stored in bf16 (like the real checkpoint); a moderate std makes the residual stream
        # dominated by the layers rather than by the (tied) input embedding, so greedy decoding does not
        # just repeat the last prompt token
        "dtype": "bfloat16", "initializer_range": 0.25, "save_weights": True,
    },
    # Pixtral-12B (facebook/DepthLM's architecture): text Mistral-Nemo-12B, vision the Pixtral encoder
    "pixtral-12b": {
        "family": "pixtral",
        "text": dict(hidden_size=5120, intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128),
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       head_dim=64),
        "dtype": "bfloat16", "initializer_range": 0.02, "save_weights": False,
    },
    "pixtral-tiny": {
        "family": "pixtral",
        "text": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32),
        "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=16),
        "dtype": "bfloat16", "initializer_range": 0.25, "save_weights": True,
    },
}
FAMILY_NAMES = {"qwen3vl": "Qwen3-VL", "pixtral": "Pixtral (LLaVA)"}


def model_config(shape: str = "tiny") -> dict:
    """config.json in the form of the published checkpoint of the shape's family (Qwen3-VL-4B-Instruct,
    Pixtral-12B in the LLaVA layout)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    s = SHAPES[shape]
    if s["family"] == "pixtral":
        return _pixtral_config(s)
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


def _pixtral_config(s: dict) -> dict:
    ids = PIXTRAL_TOKEN_IDS
    text_config = {
        "bos_token_id": ids["<s>"],
        "eos_token_id": ids["</s>"],
        "hidden_act": "silu",
        "initializer_range": s["initializer_range"],
        "max_position_embeddings": 1024000,
        "model_type": "mistral",
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "vocab_size": PIXTRAL_VOCAB_SIZE,
        **s["text"],
    }
    vision_config = {
        "hidden_act": "silu",  # the Pixtral encoder's gated (SwiGLU) feed-forward
        "image_size": 1024,
        "initializer_range": s["initializer_range"],
        "model_type": "pixtral",
        "num_channels": 3,
        "patch_size": 16,
        "rope_theta": 10000.0,
        **s["vision"],
    }
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "image_seq_length": 1,
        "image_token_index": ids["[IMG]"],
        "model_type": "llava",
        "multimodal_projector_bias": True,
        "projector_hidden_act": "gelu",
        "text_config": dict(sorted(text_config.items())),
        "tie_word_embeddings": False,
        "vision_config": dict(sorted(vision_config.items())),
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "dtype": s["dtype"],
        "transformers_version": CHECKPOINT_TRANSFORMERS_VERSION,
    }


# Pixtral's chat (Mistral instruct format): BOS, then per user turn [INST] (an optional system message
# joined to the last user turn), each image as [IMG] (the processor expands it into rows of [IMG] ended by
# [IMG_BREAK], the last by [IMG_END]) and each text as is, then [/INST]; nothing after the last [/INST].
# A text part may name its text `text` (the OpenAI / Qwen form) or `content` (DepthLM's eval.py form).
PIXTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- if messages[0]['content'] is string %}\n"
    "        {%- set system_message = messages[0]['content'] %}\n"
    "    {%- else %}\n"
    "        {%- set system_message = messages[0]['content'][0]['text'] %}\n"
    "    {%- endif %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.last and system_message is defined %}\n"
    "            {{- '[INST]' + system_message + '\\n\\n' }}\n"
    "        {%- else %}\n"
    "            {{- '[INST]' }}\n"
    "        {%- endif %}\n"
    "        {%- if message['content'] is string %}\n"
    "            {{- message['content'] }}\n"
    "        {%- else %}\n"
    "            {%- for chunk in message['content'] %}\n"
    "                {%- if chunk['type'] == 'text' %}\n"
    "                    {{- chunk['text'] if 'text' in chunk else chunk['content'] }}\n"
    "                {%- elif chunk['type'] == 'image' %}\n"
    "                    {{- '[IMG]' }}\n"
    "                {%- else %}\n"
    "                    {{- raise_exception('Unrecognized content type!') }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '[/INST]' }}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- message['content'] + eos_token }}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, after an optional system message') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

PIXTRAL_PREPROCESSOR_CONFIG = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "PixtralImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "patch_size": {"height": 16, "width": 16},
    "processor_class": "PixtralProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"longest_edge": 1024},
}

PIXTRAL_PROCESSOR_CONFIG = {
    "image_break_token": "[IMG_BREAK]",
    "image_end_token": "[IMG_END]",
    "image_token": "[IMG]",
    "patch_size": 16,
    "processor_class": "PixtralProcessor",
    "spatial_merge_size": 1,
}

PIXTRAL_GENERATION_CONFIG = {
    "bos_token_id": PIXTRAL_TOKEN_IDS["<s>"],
    "do_sample": False,
    "eos_token_id": PIXTRAL_TOKEN_IDS["</s>"],
    "pad_token_id": PIXTRAL_TOKEN_IDS["<pad>"],
    "transformers_version": CHECKPOINT_TRANSFORMERS_VERSION,
}


def pixtral_tokenizer_config() -> dict:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": special}
            for i, (t, special) in enumerate(PIXTRAL_ADDED_TOKENS)
        },
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "processor_class": "PixtralProcessor",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }


def family_files(family: str) -> dict[str, object]:
    """Every file of a family's folder but config.json and the weights: name -> text or JSON object."""
    if family == "qwen3vl":
        return {"tokenizer.json": tokenizer_json("qwen3vl"), "tokenizer_config.json": tokenizer_config(),
                "chat_template.jinja": CHAT_TEMPLATE, "preprocessor_config.json": PREPROCESSOR_CONFIG,
                "video_preprocessor_config.json": VIDEO_PREPROCESSOR_CONFIG,
                "generation_config.json": GENERATION_CONFIG}
    if family == "pixtral":
        return {"tokenizer.json": tokenizer_json("pixtral"), "tokenizer_config.json": pixtral_tokenizer_config(),
                "chat_template.jinja": PIXTRAL_CHAT_TEMPLATE, "preprocessor_config.json": PIXTRAL_PREPROCESSOR_CONFIG,
                "processor_config.json": PIXTRAL_PROCESSOR_CONFIG, "generation_config.json": PIXTRAL_GENERATION_CONFIG}
    raise ValueError(f"unknown model family {family!r}")


# ---------------------------------------------------------------------------------------------- folder
def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _init_context():
    """Skip transformers' own initialisation where it can (every parameter is set explicitly after it)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        return contextlib.nullcontext()
    return no_init_weights()


def _save_weights(out: Path, config: dict, seed: int, chain: dict[int, int] | None = None,
                  device: str | None = None) -> None:
    """Seeded random weights, saved as safetensors in the config's dtype. The tiny shapes are made in float32
    on the CPU (bit-for-bit the same everywhere); a real shape (only with a fixed answer) in its own dtype on
    `device` (CUDA when available: the 4B shape is about 9 GB)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    cfg = AutoConfig.from_pretrained(out)
    dtype = getattr(torch, config["dtype"])
    small = config["text_config"]["hidden_size"] <= 1024
    if device is None:
        device = "cpu" if small or not torch.cuda.is_available() else "cuda"
    make_dtype = torch.float32 if small else dtype
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        # (skipping transformers' init also skips its tying: only for the big, untied fixed-answer shapes)
        with torch.device(device), (contextlib.nullcontext() if small else _init_context()):
            model = AutoModelForImageTextToText.from_config(cfg, dtype=make_dtype)
        std = float(config["text_config"]["initializer_range"])
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            # explicit, version-independent initialisation: every matrix N(0, std) (1/sqrt(fan_in) for the
            # vision tower so patch features stay O(1)), norms 1, biases 0
            for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
                if p.dim() == 1:
                    p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
                    continue
                if ("visual" in name or "vision_tower" in name) and "pos_embed" not in name:
                    fan_in = p[0].numel()
                    s = 1.0 / fan_in ** 0.5
                else:
                    s = std
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=make_dtype) * s)
            if chain is not None:
                _apply_chain(model, chain)
        model = model.to(dtype)
        model.save_pretrained(out, safe_serialization=True)
    finally:
        torch.random.set_rng_state(state)


# ---------------------------------------------------------------------------------------------- fixed answer
FIXED_ANSWER_FILE = "fixed_answer.json"


def answer_chain(folder, answer: str) -> dict[int, int]:
    """The token successor map that makes a model folder's greedy answer `answer` to any prompt: the last
    token of the chat's generation prompt -> the answer's first token -> ... -> the end-of-turn token.
    Refused (ValueError naming the answer) when a token repeats before different successors, or when the
    text before the answer's number tokenizes differently on its own (a forced prompt ends there)."""
    from transformers import AutoTokenizer

    from densify.config.answer_format import NUMBER

    if not answer:
        raise ValueError("a fixed answer must not be empty")
    tok = AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    start = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    if tok.decode(ids) != answer:
        raise ValueError(f"fixed answer {answer!r}: its tokens do not decode to it; choose another text")
    number = NUMBER.search(answer)
    if number and number.start():
        head = tok(prompt + answer[: number.start()], add_special_tokens=False)["input_ids"]
        if head[: len(start)] != start or ids[: len(head) - len(start)] != head[len(start):]:
            raise ValueError(f"fixed answer {answer!r}: the text before its number tokenizes differently on its "
                             f"own, so a forced answer would not continue it; choose another text")
    end = json.loads((Path(folder) / "config.json").read_text())["text_config"]["eos_token_id"]
    chain = [start[-1], *ids, end]
    nxt: dict[int, int] = {}
    for a, b in zip(chain, chain[1:]):
        if nxt.setdefault(a, b) != b:
            raise ValueError(f"fixed answer {answer!r}: token {tok.convert_ids_to_tokens(a)!r} is followed by "
                             f"different tokens, which a model that sees only its last token cannot write; choose "
                             f"a text without a repeated token (e.g. 'Depth: 2.5 m')")
    return nxt


def _apply_chain(model, nxt: dict[int, int]) -> None:
    """The transformer blocks add nothing (attention and MLP outputs zero), so the last position's state is its
    token's embedding; each chain token's embedding is its own basis vector and the untied output layer maps it
    to its successor. The GEMMs and attention still run at full cost."""
    import torch

    lm = model.model.language_model
    if len(nxt) > model.config.text_config.hidden_size:
        raise ValueError(f"a fixed answer of {len(nxt)} tokens needs a hidden size at least that large")
    for layer in lm.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    emb = lm.embed_tokens.weight
    head = torch.zeros_like(emb)
    for slot, (a, b) in enumerate(nxt.items()):
        emb[a] = 0.0
        emb[a, slot] = 1.0
        head[b, slot] = 10.0  # x sqrt(hidden) after the final norm: a clear margin over every other logit
    model.lm_head.weight = torch.nn.Parameter(head)
    model.config.tie_word_embeddings = False
    model.config.text_config.tie_word_embeddings = False


def build_model_folder(out_dir, *, shape: str = "tiny", save_weights: bool | None = None, seed: int = 0,
                       answer: str | None = None, device: str | None = None) -> Path:
    """Write a model folder of the given shape (`SHAPES`: tiny, 4b, pixtral-tiny, pixtral-12b) to out_dir;
    return its path.

    save_weights defaults to True for the tiny shapes (seeded random weights, bf16 safetensors) and False
    for the real ones (config, tokenizer and processor files only: serve them with vLLM's load_format="dummy").
    `answer`: real weights, any shape, whose greedy answer to every prompt is this text (`answer_chain`,
    `_apply_chain`; recorded in fixed_answer.json), e.g. for forced-answer benchmarks at full model cost;
    a real shape is made on `device` (default CUDA when available).
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    config = model_config(shape)
    family = SHAPES[shape]["family"]
    if answer is not None:
        if save_weights is False:
            raise ValueError("a fixed answer needs saved weights")
        save_weights = True
        config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = False  # lm_head of its own
    if save_weights is None:
        save_weights = SHAPES[shape]["save_weights"]
    files = family_files(family)

    def write_files(dest: Path):
        for name, body in files.items():
            if isinstance(body, str):
                (dest / name).write_text(body)
            else:
                _write_json(dest / name, body)
        _write_json(dest / "config.json", config)

    chain = None
    if answer is not None:  # checked on the tokenizer in a scratch folder: refused before anything is written
        import tempfile

        with tempfile.TemporaryDirectory(prefix="densify-answer-") as tmp:
            write_files(Path(tmp))
            chain = answer_chain(tmp, answer)
    out.mkdir(parents=True, exist_ok=True)
    (out / FIXED_ANSWER_FILE).unlink(missing_ok=True)
    write_files(out)
    if save_weights:
        _save_weights(out, config, seed, chain, device)
        # save_pretrained rewrites some of these in the running transformers' own form; keep the checkpoint's
        write_files(out)
    if answer is not None:
        _write_json(out / FIXED_ANSWER_FILE, {"answer": answer, "shape": shape, "seed": seed})
    log.info("built %s %s folder %s in %.1f s%s", shape, FAMILY_NAMES[family], out, time.perf_counter() - t0,
             f" (fixed answer {answer!r})" if answer is not None else "")
    return out


def fixed_answer_of(folder) -> str | None:
    """The fixed answer a folder was built with (build_model_folder(answer=...)), or None."""
    path = Path(folder) / FIXED_ANSWER_FILE
    return json.loads(path.read_text())["answer"] if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m densify.synthetic.models", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    w = ap.add_mutually_exclusive_group()
    w.add_argument("--weights", dest="save_weights", action="store_true", default=None,
                   help="save random weights (default for the tiny shapes)")
    w.add_argument("--no-weights", dest="save_weights", action="store_false",
                   help="config, tokenizer and processor files only (default for 4b and pixtral-12b)")
    ap.add_argument("--answer", help="real weights whose greedy answer to every prompt is this text")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = build_model_folder(args.out_dir, shape=args.shape, save_weights=args.save_weights, seed=args.seed,
                                  answer=args.answer)
    except ValueError as exc:
        ap.error(str(exc))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
