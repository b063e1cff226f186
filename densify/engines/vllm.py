"""The `vllm` engine: an in-process `vllm.LLM` on one GPU (or one tensor-parallel group).

Built for this workload: thousands of short greedy questions about the same image. All queries of an
image are submitted together; their prompts share the image's tokens as a prefix, so with prefix caching
the image is encoded and prefilled once and every further query only prefills its own ~60 text tokens.
`stream(batches)` keeps the engine fed: the next image's queries are submitted while the last ones of the
current image are still decoding (no idle tail between images), but only once the current image is mostly
scheduled, so the running batch is dominated by one shared prefix.

Prompts are rendered with the model's chat template exactly as the hf engine does (optional system
message; one user turn holding the images, then the text; the generation prompt; then the optional
prefill, which is also put back at the start of each answer). vLLM tokenises a text prompt with the
tokenizer's special tokens, so when the tokenizer prepends a BOS itself (Pixtral's does) the rendered BOS
is left to it: the tokens are the hf engine's either way. Images go in as PIL images with a hash of
their pixels as `multi_modal_uuids` (computed once per image and batch), so vLLM's processor and encoder
caches key on the content: the image is neither re-hashed nor re-processed per query, and a uuid never
stands for other pixels, whatever uids the caller reuses.

Options (engine.options in a pipeline config) are `VLLMOptions`; `llm_kwargs` go to `vllm.LLM` unchanged.
vLLM is imported only when an engine is built. `stats` counts batches and queries and times where the
frontend's time goes: `submit_s` (rendering and adding requests, `submits` calls) and `step_s` (blocked
in engine steps, `steps` calls), so benchmarks read them instead of wrapping the engine.
"""

from __future__ import annotations

import collections
import gc
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from densify.config.profiles import Profile, load_profile
from densify.engines.base import (Completion, Engine, EngineBatch, EngineError, EngineStartError, PromptImage, Query,
                                  Sampling, check_batch, content_ids)
from densify.engines.chat import TEMPLATE_TEXT_KEYS, chat_messages
from densify.engines.options import VLLMOptions
from densify.engines.vllm_fast import FALLBACK, FAST, add_fast

log = logging.getLogger(__name__)

# Why VLLMOptions' defaults (densify.engines.options) are what they are, for thousands of short requests
# per image (benchmarks/engine_bench.py; numbers in
# benchmarks/results/engine_bench-H100-*.json, 4B shape, 1000x750 image, 12-token answers, H100):
# large running batches and prefill steps amortise per-step overhead; prefix caching makes per-image
# batching pay (388 q/s with it, 86 without); the fast prompt path lifts the frontend bound (325 -> 388);
# CUDA graphs up to max_num_seqs (388 -> 412); streaming the next image beats one image at a time;
# cascade attention (vLLM's default: off) and fp8 weights (changes numerics) are options, not defaults:
# cascade needs a running batch of one image, and one image per engine at a time cost more than it saved
# (H200 Ray pool, 2 engines: 540 vs 628 q/s); fp8 weights gave 735 q/s there.
# max_num_batched_tokens 65536 ran out of memory at gpu_memory_utilization 0.9 (FlashAttention's split
# workspace for a 64k-token step is not in vLLM's memory profile).

_OOM_WORDS = ("out of memory", "outofmemory", "cuda error: out of memory", "no available memory",
              "insufficient memory", "not enough memory", "cublas_status_alloc_failed",
              "less than desired gpu memory utilization", "kv cache", "cache blocks")


def _oom_advice(opts: dict) -> str:
    return (f"lower gpu_memory_utilization (now {opts.get('gpu_memory_utilization')}) if other processes use "
            f"the GPU, or lower max_num_seqs (now {opts.get('max_num_seqs')}), max_num_batched_tokens (now "
            f"{opts.get('max_num_batched_tokens')}) or max_model_len (now {opts.get('max_model_len')}); "
            f"a larger model needs quantization='fp8' or tensor_parallel_size > 1")


def _looks_like_oom(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = type(exc).__name__.lower()
        if "outofmemory" in name or any(w in str(exc).lower() for w in _OOM_WORDS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# ---------------------------------------------------------------------------------------------- prompts
_SENTINEL = "\x00DENSIFY_QUERY_TEXT\x00"


class PromptRenderer:
    """Chat-template rendering, cached per (images, system prompt, prefill).

    The template is rendered once around a sentinel text and split there; each query's prompt is then
    prefix + text + suffix. The split is checked against a full rendering of the first real query, and
    a template that changes the text (or does not contain it once) falls back to full rendering.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._parts: dict[tuple, tuple[str, str] | None] = {}
        self.bos = tokenizer_adds_bos(tokenizer)

    def full(self, n_images: int, text: str, system_prompt: str | None, prefill: str | None) -> str:
        out = self.tokenizer.apply_chat_template(chat_messages(n_images, text, system_prompt,
                                                               text_keys=TEMPLATE_TEXT_KEYS), tokenize=False,
                                                 add_generation_prompt=True)
        if not isinstance(out, str):
            raise EngineError(f"the tokenizer's chat template returned {type(out).__name__}, not text")
        if self.bos and out.startswith(self.bos):
            # vLLM tokenizes a text prompt with the tokenizer's special tokens, which prepend this BOS
            # again (Llama-style tokenizers, e.g. Pixtral's): leave it to the tokenizer, once
            out = out[len(self.bos):]
        return out + (prefill or "")

    def parts(self, n_images: int, system_prompt: str | None = None,
              prefill: str | None = None) -> tuple[str, str] | None:
        """(text before the query text, text after it), or None when the template cannot be split."""
        self(n_images, "x", system_prompt, prefill)
        return self._parts[(n_images, system_prompt, prefill)]

    def __call__(self, n_images: int, text: str, system_prompt: str | None = None,
                 prefill: str | None = None) -> str:
        key = (n_images, system_prompt, prefill)
        if key not in self._parts:
            parts = None
            whole = self.full(n_images, _SENTINEL, system_prompt, prefill)
            if whole.count(_SENTINEL) == 1:
                pre, post = whole.split(_SENTINEL)
                if pre + text + post == self.full(n_images, text, system_prompt, prefill):
                    parts = (pre, post)
            if parts is None:
                log.warning("chat template does not render query text verbatim; rendering every prompt in full")
            self._parts[key] = parts
        parts = self._parts[key]
        if parts is None:
            return self.full(n_images, text, system_prompt, prefill)
        return parts[0] + text + parts[1]


def tokenizer_adds_bos(tokenizer) -> str | None:
    """The BOS text a tokenizer prepends by itself when it tokenizes with special tokens, else None."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not isinstance(bos, str) or not bos or bos_id is None:
        return None
    try:
        plain = tokenizer("x")["input_ids"]
        bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer without these calls adds nothing we know of
        return None
    return bos if list(plain[:1]) == [bos_id] and list(bare[:1]) != [bos_id] else None


class _PILCache:
    """content uuid -> PIL image for the last few images (a batch shows the same image thousands of times).

    Keyed by a hash of the pixels, not the caller's uid: vLLM caches an image's features under its
    uuid, so a uuid that once stood for other pixels would answer about the wrong image."""

    def __init__(self, size: int = 64):
        self.size = size
        self._d: collections.OrderedDict[str, Any] = collections.OrderedDict()

    @staticmethod
    def uuids(images: dict[str, PromptImage]) -> dict[str, str]:
        """Each image's vLLM uuid (a shared base hashed once)."""
        return {u: "px-" + c for u, c in content_ids(images).items()}

    def get(self, img: PromptImage, key: str):
        pil = self._d.get(key)
        if pil is None:
            from PIL import Image

            pil = Image.fromarray(img.pixels).convert("RGB")
            self._d[key] = pil
            while len(self._d) > self.size:
                self._d.popitem(last=False)
        else:
            self._d.move_to_end(key)
        return pil


def llm_arguments(opts: VLLMOptions, model: str, images_per_query: int = 1) -> dict:
    """The keyword arguments of `vllm.LLM` for these options: the one step from densify's typed options to
    vLLM's names (`llm_kwargs` go through as they are, and win)."""
    kw = dict(model=model, gpu_memory_utilization=float(opts.gpu_memory_utilization), max_model_len=opts.max_model_len,
              tensor_parallel_size=int(opts.tensor_parallel_size), dtype=opts.dtype, max_num_seqs=int(opts.max_num_seqs),
              max_num_batched_tokens=opts.max_num_batched_tokens, enable_prefix_caching=bool(opts.enable_prefix_caching),
              load_format=opts.load_format, enforce_eager=bool(opts.enforce_eager), quantization=opts.quantization,
              limit_mm_per_prompt=opts.limit_mm_per_prompt or {"image": images_per_query, "video": 0})
    if opts.cascade_attention is not None:
        kw["disable_cascade_attn"] = not opts.cascade_attention
    if not opts.enforce_eager and "compilation_config" not in opts.llm_kwargs:
        # vLLM captures CUDA graphs for at most 512 requests; a full decode batch of a dense grid is
        # max_num_seqs, and eager decode steps left the GPU idle (388 -> 412 q/s, one image)
        kw["compilation_config"] = {"max_cudagraph_capture_size": int(opts.max_num_seqs)}
    kw.update(opts.llm_kwargs)
    return {k: v for k, v in kw.items() if v is not None}


# ---------------------------------------------------------------------------------------------- engine
@dataclass
class _InFlight:
    seq: int
    batch: EngineBatch
    completions: list
    remaining: int
    request_ids: list = field(default_factory=list)
    """vLLM's internal request ids"""
    started: float = 0.0
    token_ids: list | None = None
    """answers' token ids, when the engine (not vLLM) detokenizes them"""


class VLLMEngine(Engine):
    """Point queries through an in-process vLLM engine (one GPU, or one tensor-parallel group).

    Options: densify.engines.options.VLLMOptions (typed, as a config holds them, or the same as keywords;
    `llm_arguments` turns them into vllm.LLM's):
      model: checkpoint folder or name (default: the profile's `model`).
      gpu_memory_utilization: share of the GPU's memory vLLM may take (weights + activations + KV cache).
        Several engines on one GPU: `RayPoolEngine(engines_per_gpu=K)` sizes this, max_num_batched_tokens
        and the CUDA-graph sizes for each (`VLLMOptions.for_shared_gpu`).
      max_model_len: longest prompt + answer in tokens (a 1000x750 image is ~713 tokens; two 1024-wide
        images ~1400); small values keep the memory profile small.
      tensor_parallel_size, dtype, quantization (e.g. "fp8": online fp8 weights, ~2x matmul rate),
      load_format ("dummy": random weights, for benchmarks), enforce_eager (off: CUDA graphs on,
        captured up to max_num_seqs requests unless a compilation_config is given).
      max_num_seqs: requests decoded together (1024: a whole image's answers in a few waves).
      max_num_batched_tokens: tokens per engine step (32768: ~500 queries' prompt suffixes per step).
      enable_prefix_caching: reuse an image's KV across its queries (the point of per-image batches).
      cascade_attention: let vLLM use cascade attention when the running batch shares a long prefix
        (None: vLLM's default, which is off).
      limit_mm_per_prompt: default {"image": profile.images_per_query, "video": 0}.
      queries_in_flight: `stream` submits the next batch once fewer than this many queries are
        unfinished (default 2 * max_num_seqs; 0: one batch at a time).
      batches_in_flight: at most this many batches submitted at once (for many small batches).
      min_tokens, ignore_eos: benchmark only - force every answer to a fixed length.
      fast_prompts: render only two prompts of an image through vLLM's (slow, per-request) multimodal
        processor and derive the others' token ids (checked against vLLM's; see `_add_fast`).
      read_prefix_cache: False makes every request skip prefix-cache reads (benchmark: the cost without
        prefix reuse, on the same engine).
      detokenize: False: vLLM returns token ids only (no incremental detokenization per request and
        step) and the engine decodes each finished batch's answers at once.
      mm_uuids: pass each image's content hash as `multi_modal_uuids` (False: vLLM hashes every
        request's image itself; for benchmarks).
      llm_kwargs: passed to `vllm.LLM` as is (e.g. mm_processor_cache_gb, kv_cache_dtype, seed,
        prefix_caching_hash_algo="xxhash", which needs the xxhash package).
    In Python also `llm`: an already built `vllm.LLM` to use (the engine then does not own it).
    """

    name = VLLMOptions.engine_name

    def __init__(self, profile: Profile | str, options: VLLMOptions | None = None, *, llm: Any = None, **kwargs):
        self.options = opts = VLLMOptions.given(options, kwargs)
        self.profile = load_profile(profile)
        self.model = str(opts.model or self.profile.model)
        self.max_num_seqs = int(opts.max_num_seqs)
        self.queries_in_flight = 2 * self.max_num_seqs if opts.queries_in_flight is None else int(opts.queries_in_flight)
        self.batches_in_flight = int(opts.batches_in_flight)
        self.min_tokens = int(opts.min_tokens)
        self.ignore_eos = bool(opts.ignore_eos)
        self.read_prefix_cache = bool(opts.read_prefix_cache)
        self.fast_prompts = bool(opts.fast_prompts)
        self.detokenize = bool(opts.detokenize)
        self.mm_uuids = bool(opts.mm_uuids)
        self.dead = False  # the engine core died: this engine cannot answer again (the Ray actor restarts)
        self.llm_options = llm_arguments(opts, self.model, self.profile.images_per_query)
        self._own_llm = llm is None
        self.llm = llm if llm is not None else self._start()
        try:
            self._renderer = PromptRenderer(self.llm.get_tokenizer())
        except Exception as exc:
            raise EngineError(f"vllm engine: cannot get the tokenizer of {self.model}: {exc}") from exc
        self._images = _PILCache()
        self._params: dict[tuple, Any] = {}
        self._seq = 0
        self.stats = collections.Counter()

    # -- lifecycle
    def _start(self):
        try:
            from vllm import LLM
        except ImportError as exc:
            raise EngineStartError("the vllm engine needs vLLM: pip install 'densify[vllm]' (vllm>=0.26, a CUDA "
                              f"GPU); import failed: {exc}") from exc
        self._check_free_memory()
        # fork is unsafe once this process has touched CUDA (torch.cuda.is_available() is enough)
        import os

        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        opts = dict(self.llm_options)
        log.info("starting vLLM: %s", {k: v for k, v in opts.items() if k != "model"})
        t0 = time.perf_counter()
        try:
            llm = LLM(**opts)
        except Exception as exc:
            if _looks_like_oom(exc):
                raise EngineError(f"vllm engine: out of GPU memory while starting {self.model}: "
                                  f"{_oom_advice(opts)}. ({type(exc).__name__}: {exc})") from exc
            raise EngineError(f"vllm engine: could not start {self.model}: {type(exc).__name__}: {exc}. If the "
                              f"log above shows CUDA out of memory or 'No available memory for the cache blocks', "
                              f"{_oom_advice(opts)}.") from exc
        log.info("vLLM ready in %.1f s", time.perf_counter() - t0)
        return llm

    def _check_free_memory(self) -> None:
        """Fail fast (instead of a hung or dead engine) when the GPU lacks the memory asked for."""
        want = float(self.llm_options.get("gpu_memory_utilization", self.options.gpu_memory_utilization))
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                h = pynvml.nvmlDeviceGetHandleByIndex(0)
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            finally:
                pynvml.nvmlShutdown()
        except Exception:  # no NVML (not an NVIDIA GPU, or no GPU): vLLM reports it
            return
        import os

        if os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] not in ("", "0"):
            return  # device 0 is not the one vLLM will use
        free, total = mem.free / 2**30, mem.total / 2**30
        if free < want * total - 0.5:
            raise EngineError(f"vllm engine: gpu_memory_utilization={want} asks for {want * total:.1f} GiB but only "
                              f"{free:.1f} of {total:.1f} GiB are free on GPU 0 (other processes hold the rest): "
                              f"lower gpu_memory_utilization to at most {max(0.05, free / total - 0.02):.2f} or free "
                              f"the GPU")

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None or not self._own_llm:
            return
        try:
            core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        except Exception as exc:  # pragma: no cover - best effort
            log.warning("vLLM shutdown: %s", exc)
        del llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # pragma: no cover
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def start_profile(self, prefix: str | None = None) -> None:
        """Start vLLM's worker profiler (the engine must be started with llm_kwargs.profiler_config)."""
        self.llm.start_profile(prefix) if prefix else self.llm.start_profile()

    def stop_profile(self) -> None:
        """Stop it: the worker writes its trace under profiler_config.torch_profiler_dir."""
        self.llm.stop_profile()

    # -- requests
    def sampling_params(self, s: Sampling):
        """The vLLM SamplingParams for a batch's Sampling (greedy; cached)."""
        key = (s, self.min_tokens, self.ignore_eos, self.read_prefix_cache, self.detokenize)
        sp = self._params.get(key)
        if sp is None:
            from vllm import SamplingParams

            kw: dict[str, Any] = dict(max_tokens=int(s.max_tokens), temperature=0.0)
            if s.logprobs:
                kw["logprobs"] = 1
            if s.stop:
                kw["stop"] = list(s.stop)
            if self.min_tokens:
                kw["min_tokens"] = min(self.min_tokens, int(s.max_tokens))
            if self.ignore_eos:
                kw["ignore_eos"] = True
            if not self.read_prefix_cache:
                kw["skip_reading_prefix_cache"] = True
            if not self.detokenize:
                kw["detokenize"] = False
            if s.structured_regex:
                from vllm.sampling_params import StructuredOutputsParams

                kw["structured_outputs"] = StructuredOutputsParams(regex=s.structured_regex)
            sp = SamplingParams(**kw)
            self._params[key] = sp
        return sp

    def prompt(self, batch: EngineBatch, q: Query, uuids: dict[str, str] | None = None) -> dict:
        """One query as a vLLM prompt dict (text, PIL images, their content uuids)."""
        s = batch.sampling
        text = self._renderer(len(q.image_uids), q.text, s.system_prompt, s.prefill)
        p: dict[str, Any] = {"prompt": text}
        if q.image_uids:
            if uuids is None:
                uuids = self._images.uuids({u: batch.images[u] for u in q.image_uids})
            ids = [uuids[u] for u in q.image_uids]
            p["multi_modal_data"] = {"image": [self._images.get(batch.images[u], i) for u, i in zip(q.image_uids, ids)]}
            if self.mm_uuids:
                p["multi_modal_uuids"] = {"image": ids}
        return p

    def prompts(self, batch: EngineBatch) -> list[dict]:
        check_batch(batch)
        uuids = self._images.uuids(batch.images)
        return [self.prompt(batch, q, uuids) for q in batch.queries]

    @staticmethod
    def _completion(out, s: Sampling, text: str | None = None) -> Completion:
        c = out.outputs[0] if getattr(out, "outputs", None) else None
        if c is None:
            return Completion("", error="vLLM returned no output for this query")
        text = (c.text or "") if text is None else text
        if s.prefill:
            text = s.prefill + text
        n_gen = len(c.token_ids) if c.token_ids is not None else None
        lp = None
        if s.logprobs:
            lp = getattr(c, "cumulative_logprob", None)
            if lp is None and c.logprobs is not None:
                lp = _sum_chosen_logprobs(c.token_ids, c.logprobs)
            lp = None if lp is None or not math.isfinite(lp) else float(lp)
        ptoks = getattr(out, "prompt_token_ids", None)
        err = None
        if getattr(c, "finish_reason", None) == "abort":
            err = "vLLM aborted this request"
        return Completion(text=text, logprob=lp, n_prompt_tokens=len(ptoks) if ptoks is not None else None,
                          n_generated_tokens=n_gen, cached_prompt_tokens=getattr(out, "num_cached_tokens", None),
                          error=err)

    # -- the protocol
    def generate(self, batch: EngineBatch) -> list[Completion]:
        out = None
        for _, completions in self._stream([batch], self.queries_in_flight):
            out = completions
        return out if out is not None else []

    def stream(self, batches: Iterable[EngineBatch]) -> Iterator[tuple[EngineBatch, list[Completion]]]:
        """Answer batches with several in flight; yields each batch with its answers as it finishes.

        `batches` may yield None for "nothing new yet": the engine goes on stepping what it holds (or, holding
        nothing, asks again after a millisecond) instead of waiting on the source."""
        yield from self._stream(batches, self.queries_in_flight)

    def _stream(self, batches: Iterable[EngineBatch], queries_in_flight: int):
        if self.llm is None:
            raise EngineError("vllm engine is closed")
        engine = self.llm.llm_engine
        it = iter(batches)
        inflight: dict[int, _InFlight] = {}
        by_id: dict[str, tuple[_InFlight, int]] = {}
        unfinished = 0
        exhausted = False
        try:
            while True:
                while not exhausted and (not inflight or (unfinished < queries_in_flight
                                                          and len(inflight) < self.batches_in_flight)):
                    try:
                        batch = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    if batch is None:  # the source has nothing new right now
                        if inflight:
                            break  # go on stepping what is in flight
                        time.sleep(0.001)  # nothing to step: ask again shortly
                        continue
                    t = time.perf_counter()
                    fl = self._submit(batch, by_id)
                    self.stats["submit_s"] += time.perf_counter() - t
                    self.stats["submits"] += 1
                    if fl.remaining == 0:  # empty batch, or failed as a whole before reaching the engine
                        yield fl.batch, fl.completions
                        continue
                    inflight[fl.seq] = fl
                    unfinished += fl.remaining
                if not inflight:
                    return
                if not engine.has_unfinished_requests():
                    raise EngineError(f"vllm engine lost {unfinished} queries (no unfinished requests left)")
                t = time.perf_counter()
                try:
                    outs = engine.step()
                except Exception as exc:
                    raise self._generation_error(exc) from exc
                finally:
                    self.stats["step_s"] += time.perf_counter() - t
                    self.stats["steps"] += 1
                finished: list[_InFlight] = []
                for o in outs:
                    if not getattr(o, "finished", True):
                        continue
                    ent = by_id.pop(str(o.request_id), None)
                    if ent is None:
                        continue
                    fl, i = ent
                    if fl.token_ids is not None:  # decoded with the rest of the batch, below
                        c = o.outputs[0] if getattr(o, "outputs", None) else None
                        fl.token_ids[i] = list(c.token_ids or []) if c is not None else None
                        fl.completions[i] = o
                    else:
                        fl.completions[i] = self._completion(o, fl.batch.sampling)
                    fl.remaining -= 1
                    unfinished -= 1
                    if fl.remaining == 0:
                        finished.append(fl)
                for fl in finished:
                    if fl.token_ids is not None:
                        self._decode(fl)
                    del inflight[fl.seq]
                    for rid in fl.request_ids:
                        by_id.pop(rid, None)
                        by_id.pop(_external_id(rid), None)
                    self.stats["batches"] += 1
                    self.stats["queries"] += len(fl.completions)
                    yield fl.batch, fl.completions
        finally:
            if inflight:  # the caller stopped early or an error: drop what is still queued
                try:
                    engine.abort_request([rid for fl in inflight.values() for rid in fl.request_ids], internal=True)
                except Exception as exc:  # pragma: no cover
                    log.warning("could not abort unfinished vLLM requests: %s", exc)

    def _submit(self, batch: EngineBatch, by_id: dict) -> _InFlight:
        self._seq += 1
        n = len(batch.queries)
        fl = _InFlight(self._seq, batch, [None] * n, n, started=time.perf_counter(),
                       token_ids=None if self.detokenize else [None] * n)
        if n == 0:
            return fl
        prompts = self.prompts(batch)
        params = self.sampling_params(batch.sampling)
        try:
            ids = None
            if self.fast_prompts and n >= 3:
                ids = self._add_fast(batch, prompts, params, fl.seq)
            if ids is None:
                ids = self.llm.enqueue(prompts, params, use_tqdm=False)
        except ValueError as exc:  # e.g. prompt longer than max_model_len: this batch fails, the run goes on
            log.error("vllm engine: batch %r rejected: %s", batch.tag if isinstance(batch.tag, str) else fl.seq, exc)
            fl.completions = [Completion("", error=f"rejected by vLLM: {exc}") for _ in range(n)]
            fl.remaining = 0
            fl.token_ids = None
            return fl
        except Exception as exc:
            raise self._generation_error(exc) from exc
        if len(ids) != n:
            raise EngineError(f"vllm engine: enqueued {len(ids)} requests for {n} queries")
        for i, rid in enumerate(ids):
            rid = str(rid)
            fl.request_ids.append(rid)
            by_id[rid] = (fl, i)
            # outputs carry the caller-side id; vLLM appends '-<random>' to make its internal one
            by_id[_external_id(rid)] = (fl, i)
        return fl

    # -- fast prompt path (densify/engines/vllm_fast.py: the code that uses vLLM internals)
    def _add_fast(self, batch: EngineBatch, prompts: list[dict], params, seq: int) -> list[str] | None:
        ids, how = add_fast(self.llm, self._renderer, batch, prompts, params, seq)
        if how == FALLBACK:
            self.fast_prompts = False
        elif how == FAST:
            self.stats["fast_prompt_batches"] += 1
        return ids

    def _decode(self, fl: _InFlight) -> None:
        """Answer texts of a finished batch from their token ids, in one call (detokenize=False)."""
        tok = self._renderer.tokenizer
        have = [i for i, ids in enumerate(fl.token_ids) if ids is not None]
        seqs = [fl.token_ids[i] for i in have]
        if hasattr(tok, "batch_decode"):
            texts = tok.batch_decode(seqs, skip_special_tokens=True)
        else:
            texts = [tok.decode(ids, skip_special_tokens=True) for ids in seqs]
        decoded = dict(zip(have, texts))
        s = fl.batch.sampling
        fl.completions = [self._completion(o, s, decoded.get(i, "")) for i, o in enumerate(fl.completions)]
        fl.token_ids = None

    def _generation_error(self, exc: BaseException) -> EngineError:
        if isinstance(exc, EngineError):
            return exc
        # the engine core process is gone (vLLM's EngineDeadError, or a CUDA OOM that killed it): no later
        # request can succeed in this process, so a Ray actor holding this engine restarts itself
        if _looks_like_oom(exc) or "dead" in type(exc).__name__.lower() or "dead" in str(exc).lower():
            self.dead = True
        if _looks_like_oom(exc):
            return EngineError(f"vllm engine: out of GPU memory while generating: {_oom_advice(self.llm_options)}. "
                               f"({type(exc).__name__}: {exc})")
        if "dead" in type(exc).__name__.lower() or "dead" in str(exc).lower():
            return EngineError(f"vllm engine died while generating ({type(exc).__name__}: {exc}); its log above "
                               f"has the cause. If that is CUDA out of memory, {_oom_advice(self.llm_options)}.")
        return EngineError(f"vllm engine failed while generating: {type(exc).__name__}: {exc}")


def _external_id(rid: str) -> str:
    return rid.rsplit("-", 1)[0] if "-" in rid else rid


def _sum_chosen_logprobs(token_ids, logprobs) -> float | None:
    total = 0.0
    for tok, pos in zip(token_ids, logprobs):
        try:
            entry = pos[tok]
        except (KeyError, IndexError, TypeError):
            return None
        total += float(getattr(entry, "logprob", entry))
    return total

