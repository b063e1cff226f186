"""The engine protocol: a batch of text queries over shared images in, answer texts out.

Every engine (simulated, hf, vllm, openai, the Ray pool) implements `generate(batch)`. A batch holds the
prompt images once, keyed by a stable id, and many queries that refer to them; all queries of one image
travel together so a prefix-caching engine computes that image's tokens once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass
class GroundTruth:
    """What is known about a prompt image, in its preprocessed pixel frame. Only the simulated engine
    reads it; real engines ignore it."""

    depth: np.ndarray | None = None
    """HxW metric depth (0 or NaN = unknown)."""
    label_xy: np.ndarray | None = None
    """Nx2 preprocessed pixel positions of sparse depth labels (with `label_depth`)."""
    label_depth: np.ndarray | None = None
    matches_to: dict[str, np.ndarray] = field(default_factory=dict)
    """other image uid -> HxWx2 preprocessed pixel in that image (NaN where not visible)."""
    pose_to: dict[str, np.ndarray] = field(default_factory=dict)
    """other image uid -> 4x4 transform from this camera's frame to the other's (x_other = T @ x_this)."""
    object_ids: np.ndarray | None = None
    """HxW int object id per pixel in the same frame as `depth` (-1 = none); the structured error model's
    per-object bias (without it, depth-continuous segments stand in)."""


@dataclass
class PromptImage:
    """One preprocessed image as the model sees it."""

    uid: str
    pixels: np.ndarray  # HxWx3 uint8 RGB
    truth: GroundTruth | None = None

    @staticmethod
    def content_uid(pixels: np.ndarray, salt: str = "") -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(salt.encode())
        h.update(np.ascontiguousarray(pixels).tobytes())
        h.update(str(pixels.shape).encode())
        return h.hexdigest()


@dataclass
class Query:
    """One question: its exact text and the images it shows, in order."""

    text: str
    image_uids: tuple[str, ...]
    question: str = "depth"
    """The profile question name (engines ignore it except the simulated one)."""
    hint: dict | None = None
    """Facts a simulator may use when the text does not carry them (e.g. a marker's pixel)."""


@dataclass(frozen=True)
class Sampling:
    """Per-request generation options (greedy decoding always)."""

    max_tokens: int = 256
    system_prompt: str | None = None
    prefill: str | None = None
    structured_regex: str | None = None
    logprobs: bool = False


@dataclass
class EngineBatch:
    images: dict[str, PromptImage]
    queries: list[Query]
    sampling: Sampling = field(default_factory=Sampling)
    tag: object = None
    """Caller's key for this batch (e.g. the image id); engines pass it through."""


@dataclass
class Completion:
    text: str
    logprob: float | None = None
    """Sum of the generated tokens' log-probabilities, when asked for."""
    n_prompt_tokens: int | None = None
    n_generated_tokens: int | None = None
    cached_prompt_tokens: int | None = None
    error: str | None = None
    """Set when the engine failed on this query (the text is then empty)."""


class EngineError(RuntimeError):
    """An engine failed as a whole (not one answer): out of memory, unreachable server, ..."""


@runtime_checkable
class Engine(Protocol):
    """What every engine does. Engines that keep several batches in flight also have
    `stream(batches) -> Iterator[(batch, completions)]`, yielding each batch (tag included) as it finishes.
    Its source may yield None, meaning "no new batch right now": the engine goes on with the batches it
    holds (without blocking on them for long) and asks the source again; a source that is fed from another
    thread uses this to keep the engine busy without blocking it."""

    name: str

    def generate(self, batch: EngineBatch) -> list[Completion]:
        """Answer every query of the batch, in order."""
        ...

    def close(self) -> None: ...


def generate_stream(engine: Engine, batches: Iterable[EngineBatch]) -> Iterator[tuple[EngineBatch, list[Completion]]]:
    """Run batches through an engine, yielding each batch with its answers as it finishes.

    Engines that keep several batches in flight (vllm, openai, the Ray pool) provide their own `stream`.
    `batches` may yield None ("no new batch right now", see `Engine`); without a `stream` it is skipped.
    """
    stream = getattr(engine, "stream", None)
    if stream is not None:
        yield from stream(batches)
        return
    for batch in batches:
        if batch is not None:
            yield batch, engine.generate(batch)


def check_batch(batch: EngineBatch) -> None:
    for q in batch.queries:
        for uid in q.image_uids:
            if uid not in batch.images:
                raise ValueError(f"query refers to image {uid!r} which is not in the batch")


def batch_sizes(batches: Sequence[EngineBatch]) -> int:
    return sum(len(b.queries) for b in batches)
