"""The vllm engine's fast prompt path: the one place that uses vLLM internals (`LLM._preprocess_cmpl_one`,
`LLMEngine.add_request` with an already rendered engine input).

vLLM's offline renderer runs the multimodal processor for every prompt, even when the image is cached
(about 3 ms a query for Qwen3-VL: the frontend, not the GPU, then bounds throughput). Here the first two
queries of a batch are rendered by vLLM; the second one's engine input (image already cached, so its
multimodal data is a cache reference) is reused for the rest with only the token ids changed: expanded
image prefix + the query's own text tokens + the fixed suffix. The token ids are checked against vLLM's
own rendering of the first two queries before use; on any mismatch, or on a vLLM without these
internals, the rest goes through `LLM.enqueue` as usual.
"""

from __future__ import annotations

import logging
from typing import Any

from densify.engines.base import EngineBatch

log = logging.getLogger("densify.engines.vllm")

FAST = "fast"          # every query after the first two derived from vLLM's rendering
FALLBACK = "fallback"  # the check failed: the rest went through LLM.enqueue; do not try again
NOT_APPLICABLE = "n/a"  # nothing added (no internals, no shared images, no splittable template)


def set_final_only(params) -> bool:
    """LLM.enqueue sets FINAL_ONLY on the params; requests added directly need the same."""
    try:
        from vllm.sampling_params import RequestOutputKind

        params.output_kind = RequestOutputKind.FINAL_ONLY
        return True
    except Exception:  # noqa: BLE001
        return False


def add_fast(llm: Any, renderer, batch: EngineBatch, prompts: list[dict], params, seq: int) -> tuple[list[str] | None, str]:
    """Add a batch whose queries all show the same images. Returns (vLLM's request ids in query order,
    or None when nothing was added; FAST, FALLBACK or NOT_APPLICABLE)."""
    q0 = batch.queries[0]
    s = batch.sampling
    render = getattr(llm, "_preprocess_cmpl_one", None)
    add = getattr(getattr(llm, "llm_engine", None), "add_request", None)
    parts = renderer.parts(len(q0.image_uids), s.system_prompt, s.prefill)
    if render is None or add is None or parts is None or not q0.image_uids or len(prompts) < 3:
        return None, NOT_APPLICABLE
    if any(q.image_uids != q0.image_uids for q in batch.queries):
        return None, NOT_APPLICABLE
    if not set_final_only(params):
        return None, NOT_APPLICABLE
    e0 = render(prompts[0])
    e1 = render(prompts[1])
    ids: list[str] = []
    rid = lambda i: f"dz{seq}q{i}"  # noqa: E731 - no '-': vLLM appends '-<random>' to it
    ids.append(add(rid(0), e0, params))
    ids.append(add(rid(1), e1, params))
    fast = None
    try:
        tok = llm.get_tokenizer()
        enc = tok([q.text for q in batch.queries], add_special_tokens=False)["input_ids"]
        suffix = tok(parts[1], add_special_tokens=False)["input_ids"]
        p1 = list(e1["prompt_token_ids"])
        cut = len(p1) - len(suffix) - len(enc[1])
        prefix = p1[:cut]
        ok = (e1.get("type") == "multimodal" and cut > 0 and p1[cut:] == list(enc[1]) + list(suffix)
              and list(e0["prompt_token_ids"]) == prefix + list(enc[0]) + list(suffix))
        if ok:
            fast = (prefix, list(suffix), enc)
        else:
            log.warning("vllm engine: fast prompt path disabled (token ids differ from vLLM's rendering)")
    except Exception as exc:  # noqa: BLE001 - vLLM internals changed: fall back
        log.warning("vllm engine: fast prompt path disabled: %s: %s", type(exc).__name__, exc)
    if fast is None:
        rest = llm.enqueue(prompts[2:], params, use_tqdm=False)
        return ids + [str(r) for r in rest], FALLBACK
    prefix, suffix, enc = fast
    for i in range(2, len(prompts)):
        inp = dict(e1)
        inp["prompt_token_ids"] = prefix + list(enc[i]) + suffix
        inp["prompt"] = prompts[i]["prompt"]
        ids.append(add(rid(i), inp, params))
    return ids, FAST
