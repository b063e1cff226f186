"""The conversation every engine sends: the releases' chat layout, shared by hf, vllm and openai."""

from __future__ import annotations

# Engines that render the model's own chat template give a text part its text under both names: the
# OpenAI / Qwen form reads `text`, DepthLM's eval.py hands Pixtral's template the question as `content`.
TEMPLATE_TEXT_KEYS = ("text", "content")


def chat_messages(n_images: int | list[dict], text: str, system_prompt: str | None = None, *,
                  text_keys: tuple[str, ...] = ("text",)) -> list[dict]:
    """The conversation the releases send: [system], then one user turn with the images first, then the
    text. n_images: a count (plain image placeholders) or the image content parts themselves. No system
    turn at all when system_prompt is None (DepthLM's Pixtral chat has none)."""
    parts = [{"type": "image"} for _ in range(n_images)] if isinstance(n_images, int) else list(n_images)
    msgs: list[dict] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    msgs.append({"role": "user", "content": parts + [{"type": "text", **{k: text for k in text_keys}}]})
    return msgs
