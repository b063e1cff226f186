"""The conversation every engine sends: the releases' chat layout, shared by hf, vllm and openai."""

from __future__ import annotations


def chat_messages(n_images: int | list[dict], text: str, system_prompt: str | None = None) -> list[dict]:
    """The conversation the releases send: [system], then one user turn with the images first, then the
    text. n_images: a count (plain image placeholders) or the image content parts themselves."""
    parts = [{"type": "image"} for _ in range(n_images)] if isinstance(n_images, int) else list(n_images)
    msgs: list[dict] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    msgs.append({"role": "user", "content": parts + [{"type": "text", "text": text}]})
    return msgs
