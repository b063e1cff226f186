"""The `hf` engine: transformers' `generate`, greedy, batched with left padding.

The slow, simple baseline (no image-prefix reuse across batches). It does what the releases' cookbooks do:
one user turn holding the image(s) first and then the text, an optional system turn, greedy decoding.

Inputs are built the way `Qwen3VLProcessor.__call__` builds them, from the folder's own tokenizer, chat
template and image processor, without loading the processor object itself (that also loads the video
processor, which needs torchvision even though no video is ever sent):
  * the chat template is rendered with an `{"type": "image"}` item per image, and each image placeholder
    (`<|image_pad|>`) is expanded to the image's token count, grid_t * grid_h * grid_w / merge_size**2;
  * each distinct image of a batch goes through the image processor once (its smart_resize only rounds
    the already-preprocessed pixels to multiples of patch_size * merge_size = 32, as vLLM does), and its
    pixel_values are reused by every query that shows it;
  * `mm_token_type_ids` (1 on image tokens) is passed when the model's forward takes it (transformers 5.x
    needs it for the multimodal RoPE positions).

Prefill (`sampling.prefill`) is appended after the generation prompt (`<|im_start|>assistant\\n`), and the
returned `Completion.text` starts with the prefill text, so answer parsers always see the whole answer
(e.g. `<answer>3.42</answer>` when the prefill is `<think> </think><answer>`). Token counts and log-probs
cover the generated tokens only; the prefill's tokens count as prompt tokens.

`logprob` is the sum over the generated tokens (the end-of-sequence token included, as vLLM counts it) of
log softmax of the model's raw logits at the chosen token (`output_logits`; the same as
`compute_transition_scores(..., normalize_logits=True)` when no logits processor is active).

`structured_regex` (guided decoding) is not supported here: it is ignored, with a warning once.
"""

from __future__ import annotations

import copy
import gc
import inspect
import logging
from typing import Any

import numpy as np

from densify.config.profiles import Profile, load_profile
from densify.engines.base import Completion, Engine, EngineBatch, EngineError, PromptImage, Query, check_batch
from densify.engines.chat import chat_messages
from densify.engines.options import HFOptions

log = logging.getLogger(__name__)

_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def resolve_dtype(dtype: Any, device: str):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    names = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = names.get(str(dtype), str(dtype))
    out = getattr(torch, name, None)
    if not isinstance(out, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32")
    return out


def load_image_processor(path: str):
    """The folder's image processor; its PIL backend when torchvision is missing.

    The Qwen-VL checkpoints name `Qwen2VLImageProcessorFast`, which transformers 5.x maps to the torchvision
    backend (`Qwen2VLImageProcessor`, what vLLM uses too). transformers 5.23 falls back to the PIL backend by
    itself when torchvision is absent; 5.4 to 5.17 raise ImportError, so load the PIL class directly. The
    two backends may differ slightly in their bicubic resampling (the 32-pixel rounding is the same).
    """
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path)
    except ImportError as exc:
        import importlib

        try:  # the module itself, not the top-level name (5.4 guards that one with torchvision too)
            mod = importlib.import_module("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
            cls = mod.Qwen2VLImageProcessorPil
        except (ImportError, AttributeError):
            raise exc from None
        _warn_once("pil-image-processor", "%s: the configured image processor needs torchvision, which is not "
                   "installed; using Qwen2VLImageProcessorPil (PIL resampling)", path)
        return cls.from_pretrained(path)


class HFEngine(Engine):
    name = HFOptions.engine_name

    def __init__(self, profile: Profile | str, options: HFOptions | None = None, **kwargs):
        """Options: densify.engines.options.HFOptions (typed, as a config holds them, or the same as keywords)."""
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

        self.options = opts = HFOptions.given(options, kwargs)
        self.profile = load_profile(profile)
        self.model_path = str(opts.model or self.profile.model)
        self.batch_size = int(opts.batch_size)
        self.device = resolve_device(opts.device)
        self.dtype = resolve_dtype(opts.dtype, self.device)

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.tokenizer.padding_side = "left"
        self.image_processor = load_image_processor(self.model_path)
        self.chat_template = self.tokenizer.chat_template or self._processor_chat_template()
        if not self.chat_template:
            raise EngineError(f"{self.model_path}: no chat template (neither chat_template.jinja nor the "
                              f"tokenizer's or processor's config has one)")

        load: dict[str, Any] = {"dtype": self.dtype}
        if opts.attn_implementation:
            load["attn_implementation"] = opts.attn_implementation
        if opts.load_format == "dummy":  # random weights, made on the device (a benchmark's folder has none)
            with torch.device(self.device):
                self.model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(self.model_path),
                                                                     **load)
        else:
            self.model = AutoModelForImageTextToText.from_pretrained(self.model_path, **load)
        self.model.to(self.device)
        self.model.eval()

        cfg = self.model.config
        if getattr(cfg, "image_token_id", None) is None or not hasattr(self.image_processor, "merge_size"):
            raise EngineError(f"{self.model_path}: the hf engine builds inputs the Qwen-VL way (an image "
                              f"placeholder token expanded to grid/merge_size**2 tokens); this model "
                              f"({type(self.model).__name__}) is not a Qwen-VL model")
        self.image_token_id = int(cfg.image_token_id)
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.merge_size = int(self.image_processor.merge_size)
        self._wants_mm_types = "mm_token_type_ids" in inspect.signature(self.model.forward).parameters

        gen = copy.deepcopy(self.model.generation_config)
        if gen.pad_token_id is None:
            gen.pad_token_id = self.tokenizer.pad_token_id
        eos = gen.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        gen.eos_token_id = eos
        self._eos = set(eos)
        self._generation_config = gen
        self._torch = torch
        self.queries_answered = 0

    # -- the protocol
    def generate(self, batch: EngineBatch) -> list[Completion]:
        check_batch(batch)
        s = batch.sampling
        if s.structured_regex:
            _warn_once("structured_regex", "the hf engine does not support structured (guided) decoding; "
                       "ignoring structured_regex")
        pixels: dict[str, tuple[Any, Any]] = {}  # uid -> (pixel_values, image_grid_thw), once per batch
        out: list[Completion] = []
        for start in range(0, len(batch.queries), self.batch_size):
            chunk = batch.queries[start:start + self.batch_size]
            out.extend(self._generate_chunk(batch, chunk, pixels))
        self.queries_answered += len(out)
        return out

    def close(self) -> None:
        model = getattr(self, "model", None)
        if model is None:
            return
        self.model = None
        del model
        gc.collect()
        torch = self._torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- internals
    def _processor_chat_template(self) -> str | None:
        """The processor-level template (chat_template.jinja / chat_template.json) when the tokenizer has none."""
        import json

        try:
            from transformers.utils import cached_file
        except ImportError:  # pragma: no cover
            cached_file = None
        for name in ("chat_template.jinja", "chat_template.json"):
            try:
                path = cached_file(self.model_path, name, _raise_exceptions_for_missing_entries=False,
                                   _raise_exceptions_for_connection_errors=False) if cached_file else None
            except Exception as exc:  # noqa: BLE001 - only a fallback
                log.debug("%s: no %s (%s)", self.model_path, name, exc)
                path = None
            if path:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                return text if name.endswith(".jinja") else json.loads(text).get("chat_template")
        return None

    def prompt_text(self, query: Query, sampling) -> str:
        """The rendered prompt of one query, one image placeholder per image (before expansion)."""
        messages = chat_messages(len(query.image_uids), query.text, sampling.system_prompt)
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)
        return text + (sampling.prefill or "")

    def _image_inputs(self, img: PromptImage, cache: dict):
        if img.uid not in cache:
            from PIL import Image

            pix = np.ascontiguousarray(img.pixels)
            if pix.ndim != 3 or pix.shape[2] != 3 or pix.dtype != np.uint8:
                raise ValueError(f"image {img.uid}: pixels must be HxWx3 uint8 RGB, got {pix.shape} {pix.dtype}")
            proc = self.image_processor(images=[Image.fromarray(pix, "RGB")], return_tensors="pt")
            cache[img.uid] = (proc["pixel_values"], proc["image_grid_thw"])
        return cache[img.uid]

    def _expand(self, text: str, grids: list) -> str:
        parts = text.split(self.image_token)
        if len(parts) - 1 != len(grids):
            raise ValueError(f"the chat template rendered {len(parts) - 1} image placeholders for "
                             f"{len(grids)} images")
        pieces = [parts[0]]
        for grid, rest in zip(grids, parts[1:]):
            n = int(grid.prod()) // self.merge_size ** 2
            pieces.append(self.image_token * n)
            pieces.append(rest)
        return "".join(pieces)

    def build_inputs(self, batch: EngineBatch, chunk: list[Query], cache: dict | None = None) -> dict:
        """Model inputs for a chunk of queries (left-padded), as the processor would make them."""
        torch = self._torch
        cache = {} if cache is None else cache
        texts, pvs, grids = [], [], []
        for q in chunk:
            q_grids = []
            for uid in q.image_uids:
                pv, grid = self._image_inputs(batch.images[uid], cache)
                pvs.append(pv)
                grids.append(grid)
                q_grids.append(grid[0])
            texts.append(self._expand(self.prompt_text(q, batch.sampling), q_grids))
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if pvs:
            inputs["pixel_values"] = torch.cat(pvs, 0)
            inputs["image_grid_thw"] = torch.cat(grids, 0)
        if self._wants_mm_types:
            inputs["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).to(torch.long)
        return inputs

    def _generate_chunk(self, batch: EngineBatch, chunk: list[Query], cache: dict) -> list[Completion]:
        torch = self._torch
        s = batch.sampling
        inputs = self.build_inputs(batch, chunk, cache)
        n_prompt = inputs["attention_mask"].sum(1).tolist()
        prompt_len = inputs["input_ids"].shape[1]
        moved = {}
        for k, v in inputs.items():
            v = v.to(self.device)
            if k == "pixel_values":
                v = v.to(self.dtype)
            moved[k] = v
        gen = copy.deepcopy(self._generation_config)
        gen.do_sample = False
        gen.num_beams = 1
        gen.max_new_tokens = int(s.max_tokens)
        for attr in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
            if hasattr(gen, attr):
                setattr(gen, attr, None)
        gen.return_dict_in_generate = True
        gen.output_logits = bool(s.logprobs)
        try:
            with torch.inference_mode():
                res = self.model.generate(**moved, generation_config=gen)
        except torch.cuda.OutOfMemoryError as exc:
            raise EngineError(f"hf engine out of GPU memory on a chunk of {len(chunk)} queries "
                              f"(batch_size={self.batch_size}); lower batch_size") from exc
        seqs = res.sequences[:, prompt_len:].cpu()
        logp = None
        if s.logprobs and getattr(res, "logits", None):
            cols = []  # one step at a time: B x T x vocab would not fit for long answers
            for t, lg in enumerate(res.logits):
                tok = res.sequences[:, prompt_len + t, None]
                cols.append(torch.log_softmax(lg.float(), -1).gather(-1, tok).squeeze(-1).cpu())
            logp = torch.stack(cols, 1)  # B x T
        out = []
        for i in range(len(chunk)):
            toks = seqs[i].tolist()
            n = len(toks)
            for j, t in enumerate(toks):
                if t in self._eos:
                    n = j + 1
                    break
            text = self.tokenizer.decode(toks[:n], skip_special_tokens=True)
            lp = float(logp[i, :n].sum()) if logp is not None else None
            out.append(Completion(text=(s.prefill or "") + text, logprob=lp, n_prompt_tokens=int(n_prompt[i]),
                                  n_generated_tokens=n))
        return out

