"""The `hf` engine: transformers' `generate`, greedy, batched with left padding.

The slow, simple baseline (no image-prefix reuse across batches), for any `AutoModelForImageTextToText`
checkpoint. It does what the releases' cookbooks do: one user turn holding the image(s) first and then
the text, an optional system turn, greedy decoding; the prompt is rendered by the checkpoint's own chat
template (the processor's: chat_template.jinja / .json, else the tokenizer's) and tokenised without adding
special tokens (the template renders them, as `processor.apply_chat_template` does).

Model inputs come from the checkpoint's processor (`AutoProcessor`) when it loads: its image processor and
its own placeholder expansion, whatever the architecture. Processors of Qwen-VL and Pixtral need
torchvision just to be built (video processors, torchvision image backends); without it the engine builds
the same inputs from the folder's tokenizer, chat template and PIL image processor, expanding each image
placeholder the way that processor family does (`_EXPANSIONS`):
  * Qwen-VL (`<|image_pad|>`): grid_t * grid_h * grid_w / merge_size**2 copies; `image_grid_thw` passed on;
    `mm_token_type_ids` (1 on image tokens) when the model's forward takes it (transformers 5.x needs it
    for the multimodal RoPE positions);
  * Pixtral (`[IMG]`): per row of patches `[IMG]` x columns then `[IMG_BREAK]`, the last break `[IMG_END]`;
    `image_sizes` passed on, pixel values zero-padded to the chunk's largest image as the processor does.
Each distinct image of a chunk goes through the image processor once and is reused by every query that
shows it. Other processors need torchvision installed.

Prefill (`sampling.prefill`) is appended after the generation prompt (`<|im_start|>assistant\\n`), and the
returned `Completion.text` starts with the prefill text, so answer parsers always see the whole answer
(e.g. `<answer>3.42</answer>` when the prefill is `<think> </think><answer>`). Token counts and log-probs
cover the generated tokens only; the prefill's tokens count as prompt tokens. Stop strings
(`sampling.stop`) end a sequence (transformers' `stop_strings`) and are cut from the answer with what
follows, as vLLM and OpenAI servers return it.

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
from densify.engines.base import (Completion, Engine, EngineBatch, EngineError, EngineStartError, PromptImage, Query,
                                  check_batch)
from densify.engines.chat import TEMPLATE_TEXT_KEYS, chat_messages
from densify.engines.options import HFOptions

log = logging.getLogger(__name__)

_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


def resolve_device(device: str = "auto") -> str:
    """The torch device to run on; a device this machine cannot give is refused before any model loads."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(str(device)).type
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"engine.options.device={device}: not a torch device ({exc}); use auto, cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        why = (f"this torch build ({torch.__version__}) has no CUDA support" if torch.version.cuda is None else
               "no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)")
        raise EngineStartError(f"engine.options.device={device}: {why}; use device=cpu (or auto), or install a CUDA "
                               f"build of torch on a machine with a GPU")
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

    The Qwen-VL checkpoints name `Qwen2VLImageProcessorFast`, Pixtral's `PixtralImageProcessor`, which
    transformers 5.x maps to the torchvision backend (what vLLM uses too). transformers 5.23 falls back to
    the PIL backend by itself when torchvision is absent; 5.4 to 5.17 raise ImportError, so load the PIL
    class of the same model directly. The two backends may differ slightly in their bicubic resampling (the
    rounding to patch multiples is the same).
    """
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path)
    except ImportError as exc:
        cls = _pil_image_processor_class(path)
        if cls is None:
            raise exc from None
        _warn_once("pil-image-processor", "%s: the configured image processor needs torchvision, which is not "
                   "installed; using %s (PIL resampling)", path, cls.__name__)
        return cls.from_pretrained(path)


def cut_at_stop(text: str, stop) -> str:
    """The text before the first stop string (what vLLM and OpenAI servers return)."""
    cut = min((i for i in (text.find(t) for t in stop if t) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def _pil_image_processor_class(path: str):
    """The PIL-backend class of the folder's image processor (e.g. Qwen2VLImageProcessorPil), or None."""
    import importlib
    import re

    name = (_folder_json(path, "preprocessor_config.json") or {}).get("image_processor_type") or ""
    base = re.sub(r"Fast$", "", name)
    m = re.fullmatch(r"(\w+?)ImageProcessor", base)
    if not m:
        return None
    for model in _MODEL_MODULES.get(m.group(1), (m.group(1).lower(),)):
        try:  # the module itself, not the top-level name (5.4 guards that one with torchvision too)
            mod = importlib.import_module(f"transformers.models.{model}.image_processing_pil_{model}")
            return getattr(mod, f"{base}Pil")
        except (ImportError, AttributeError):
            continue
    return None


_MODEL_MODULES = {"Qwen2VL": ("qwen2_vl",), "Pixtral": ("pixtral",)}


def _folder_json(path: str, name: str) -> dict | None:
    """A JSON file of a model folder (local or in the Hugging Face cache), or None."""
    import json

    try:
        from transformers.utils import cached_file

        f = cached_file(path, name, _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False)
    except Exception as exc:  # noqa: BLE001 - only a lookup
        log.debug("%s: no %s (%s)", path, name, exc)
        return None
    if not f:
        return None
    with open(f, encoding="utf-8") as fh:
        return json.load(fh)


# ------------------------------------------------------------------------------------------ inputs
class ProcessorInputs:
    """Model inputs through the checkpoint's own processor (any architecture; needs whatever it needs)."""

    how = "processor"

    def __init__(self, processor, image_token_id: int | None, wants_mm_types: bool):
        self.processor, self.image_token_id, self.wants_mm_types = processor, image_token_id, wants_mm_types

    def __call__(self, texts: list[str], images: list[list[PromptImage]], cache: dict) -> dict:
        from PIL import Image

        nested = [[Image.fromarray(_rgb(im), "RGB") for im in ims] for ims in images]
        kw = dict(text=texts, padding=True, return_tensors="pt", add_special_tokens=False)
        if all(nested):  # per text its images (what older and newer processors both read)
            kw["images"] = nested
        elif any(nested):
            kw["images"] = [im for ims in nested for im in ims]
        out = dict(self.processor(**kw))
        if self.wants_mm_types and "mm_token_type_ids" not in out and self.image_token_id is not None:
            out["mm_token_type_ids"] = (out["input_ids"] == self.image_token_id).long()
        return out


class _QwenGrid:
    """Qwen-VL processors: one placeholder token -> grid.prod() / merge_size**2 copies."""

    tensors = ("pixel_values", "image_grid_thw")

    def __init__(self, image_processor, tokenizer, image_token: str, proc_cfg: dict):
        self.image_token = image_token
        self.merge = int(getattr(image_processor, "merge_size", proc_cfg.get("merge_size", 2)))

    def replacement(self, out: dict) -> str:
        return self.image_token * (int(out["image_grid_thw"][0].prod()) // self.merge ** 2)

    @staticmethod
    def stack(torch, outs: list[dict]) -> dict:
        return {"pixel_values": torch.cat([o["pixel_values"] for o in outs], 0),
                "image_grid_thw": torch.cat([o["image_grid_thw"] for o in outs], 0)}


class _PixtralRows:
    """Pixtral processors: one [IMG] -> per row of patches [IMG] x columns + [IMG_BREAK], the last [IMG_END]."""

    tensors = ("pixel_values", "image_sizes")

    def __init__(self, image_processor, tokenizer, image_token: str, proc_cfg: dict):
        self.image_token = image_token
        self.brk = proc_cfg.get("image_break_token", "[IMG_BREAK]")
        self.end = proc_cfg.get("image_end_token", "[IMG_END]")
        self.patch = int(proc_cfg.get("patch_size", 16)) * int(proc_cfg.get("spatial_merge_size", 1))

    def replacement(self, out: dict) -> str:
        h, w = (int(v) for v in out["image_sizes"][0])
        rows = [self.image_token * (w // self.patch) + self.brk] * (h // self.patch)
        return "".join(rows)[: -len(self.brk)] + self.end

    @staticmethod
    def stack(torch, outs: list[dict]) -> dict:
        pvs = [o["pixel_values"][0] for o in outs]
        H, W = max(p.shape[-2] for p in pvs), max(p.shape[-1] for p in pvs)
        pad = torch.zeros((len(pvs), pvs[0].shape[0], H, W), dtype=pvs[0].dtype)
        for i, p in enumerate(pvs):  # zeros beyond each image, as the processor pads a batch
            pad[i, :, : p.shape[-2], : p.shape[-1]] = p
        return {"pixel_values": pad, "image_sizes": torch.cat([torch.as_tensor(o["image_sizes"]) for o in outs], 0)}


# processor class -> how its placeholder expands (what the processor would do; used without torchvision)
_EXPANSIONS = {"Qwen2VLProcessor": _QwenGrid, "Qwen2_5_VLProcessor": _QwenGrid, "Qwen3VLProcessor": _QwenGrid,
               "PixtralProcessor": _PixtralRows}


class FolderInputs:
    """Model inputs from the folder's tokenizer, chat template and (PIL) image processor, each image
    placeholder expanded the way its processor family does (`_EXPANSIONS`)."""

    how = "folder"

    def __init__(self, path: str, tokenizer, image_token_id: int, wants_mm_types: bool, processor_class: str):
        import torch

        self.torch, self.tokenizer, self.wants_mm_types = torch, tokenizer, wants_mm_types
        self.image_token_id = int(image_token_id)
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.image_processor = load_image_processor(path)
        cfg = _folder_json(path, "processor_config.json") or {}
        self.rule = _EXPANSIONS[processor_class](self.image_processor, tokenizer, self.image_token, cfg)

    def _image(self, img: PromptImage, cache: dict) -> tuple[dict, str]:
        if img.uid not in cache:
            from PIL import Image

            out = self.image_processor(images=[Image.fromarray(_rgb(img), "RGB")], return_tensors="pt")
            out = {k: out[k] for k in self.rule.tensors}
            cache[img.uid] = (out, self.rule.replacement(out))
        return cache[img.uid]

    def expand(self, text: str, replacements: list[str]) -> str:
        parts = text.split(self.image_token)
        if len(parts) - 1 != len(replacements):
            raise ValueError(f"the chat template rendered {len(parts) - 1} image placeholders for "
                             f"{len(replacements)} images")
        pieces = [parts[0]]
        for rep, rest in zip(replacements, parts[1:]):
            pieces += [rep, rest]
        return "".join(pieces)

    def __call__(self, texts: list[str], images: list[list[PromptImage]], cache: dict) -> dict:
        torch = self.torch
        outs, expanded = [], []
        for text, ims in zip(texts, images):
            got = [self._image(im, cache) for im in ims]
            outs += [o for o, _ in got]
            expanded.append(self.expand(text, [r for _, r in got]))
        enc = self.tokenizer(expanded, padding=True, return_tensors="pt", add_special_tokens=False)
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if outs:
            inputs.update(self.rule.stack(torch, outs))
        if self.wants_mm_types:
            inputs["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).to(torch.long)
        return inputs


def _rgb(img: PromptImage) -> np.ndarray:
    pix = np.ascontiguousarray(img.pixels)
    if pix.ndim != 3 or pix.shape[2] != 3 or pix.dtype != np.uint8:
        raise ValueError(f"image {img.uid}: pixels must be HxWx3 uint8 RGB, got {pix.shape} {pix.dtype}")
    return pix


def processor_chat_template(path: str) -> str | None:
    """The checkpoint's processor-level chat template (chat_template.jinja, chat_template.json, or in
    processor_config.json), or None."""
    from transformers.utils import cached_file

    try:
        f = cached_file(path, "chat_template.jinja", _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False)
    except Exception as exc:  # noqa: BLE001 - only a lookup
        log.debug("%s: no chat_template.jinja (%s)", path, exc)
        f = None
    if f:
        with open(f, encoding="utf-8") as fh:
            return fh.read()
    for name in ("chat_template.json", "processor_config.json"):
        t = (_folder_json(path, name) or {}).get("chat_template")
        if t:
            return t
    return None


def model_inputs(path: str, tokenizer, model, chat_template: str | None):
    """How this checkpoint's inputs are built: its processor when it loads, else from the folder."""
    cfg = model.config
    wants = "mm_token_type_ids" in inspect.signature(model.forward).parameters
    token_id = getattr(cfg, "image_token_id", None)
    if token_id is None:
        token_id = getattr(cfg, "image_token_index", None)
    proc_cls = ((_folder_json(path, "processor_config.json") or {}).get("processor_class")
                or (_folder_json(path, "preprocessor_config.json") or {}).get("processor_class") or "")
    try:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(path)
        if not hasattr(proc, "image_processor"):
            raise TypeError(f"{type(proc).__name__} is not a multimodal processor")
        proc.tokenizer.padding_side = "left"
        if chat_template:
            proc.chat_template = chat_template
        return ProcessorInputs(proc, token_id, wants)
    except ImportError as exc:
        if token_id is None or proc_cls not in _EXPANSIONS:
            raise EngineError(f"{path}: its processor ({proc_cls or 'unknown class'}) cannot be built here "
                              f"({exc}); install torchvision, or use a Qwen-VL or Pixtral checkpoint, whose "
                              f"inputs the hf engine builds without it") from exc
        log.debug("%s: processor unavailable (%s); building %s inputs from the folder", path, exc, proc_cls)
        return FolderInputs(path, tokenizer, token_id, wants, proc_cls)


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
        self.chat_template = processor_chat_template(self.model_path) or self.tokenizer.chat_template
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

        self.inputs = model_inputs(self.model_path, self.tokenizer, self.model, self.chat_template)

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
        cache: dict = {}  # uid -> an image's processed tensors and placeholder text, once per batch
        out: list[Completion] = []
        for start in range(0, len(batch.queries), self.batch_size):
            chunk = batch.queries[start:start + self.batch_size]
            out.extend(self._generate_chunk(batch, chunk, cache))
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
    def prompt_text(self, query: Query, sampling) -> str:
        """The rendered prompt of one query, one image placeholder per image (before expansion)."""
        messages = chat_messages(len(query.image_uids), query.text, sampling.system_prompt,
                                 text_keys=TEMPLATE_TEXT_KEYS)
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)
        return text + (sampling.prefill or "")

    def build_inputs(self, batch: EngineBatch, chunk: list[Query], cache: dict | None = None) -> dict:
        """Model inputs for a chunk of queries (left-padded), as the checkpoint's processor makes them."""
        cache = {} if cache is None else cache
        texts = [self.prompt_text(q, batch.sampling) for q in chunk]
        return self.inputs(texts, [[batch.images[u] for u in q.image_uids] for q in chunk], cache)

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
        extra = {}
        if s.stop:
            gen.stop_strings = list(s.stop)
            extra["tokenizer"] = self.tokenizer
        try:
            with torch.inference_mode():
                res = self.model.generate(**moved, generation_config=gen, **extra)
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
            if s.stop:
                text = cut_at_stop(text, s.stop)
            lp = float(logp[i, :n].sum()) if logp is not None else None
            out.append(Completion(text=(s.prefill or "") + text, logprob=lp, n_prompt_tokens=int(n_prompt[i]),
                                  n_generated_tokens=n))
        return out

