"""The engine protocol: a batch of text queries over shared images in, answer texts out.

Every engine (simulated, hf, vllm, openai, the Ray pool) subclasses `Engine` and implements
`generate(batch)` or `stream(batches)` (each has a default in terms of the other). A batch holds the
prompt images once, keyed by a stable id, and many queries that refer to them; all queries of one image
travel together so a prefix-caching engine computes that image's tokens once.
"""

from __future__ import annotations

import hashlib
import types
from dataclasses import dataclass, field
from typing import ClassVar, Iterable, Iterator, Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class ImageRef:
    """Where a prompt image comes from: the source image's id and file, and the exact resize from its
    original pixels. Real engines ignore it; the simulated engine uses it to look up ground truth."""

    id: str
    path: str = ""
    manifest: str | None = None
    """The JSONL/Parquet manifest that listed the image, if any."""
    size: tuple[int, int] = (0, 0)
    """Original (width, height)."""
    scale: tuple[float, float] = (1.0, 1.0)
    """Prompt-image pixel = original pixel * scale (per axis, the profile's exact resize factors)."""
    marker: tuple[int, int] | None = None
    """The prompt-image pixel a marker was drawn to point at (marker profiles), else None."""


@dataclass
class PromptImage:
    """One preprocessed image as the model sees it.

    A marked image (marker profiles draw one per query) keeps the unmarked pixels it shares with the
    image's other queries and its own marks, and `pixels` paints them when read: a batch of thousands of
    marked images holds, hashes and ships one image plus a few pixels each (benchmarks/marked_batch.py:
    2.1 MB pickled instead of 2.6 GB for 1,536 DepthLM queries at 866x649)."""

    uid: str
    base: np.ndarray
    """HxWx3 uint8 RGB, before any marks."""
    ref: ImageRef | None = None
    marks: np.ndarray | None = None
    """Kx2 integer (x, y) pixels painted `mark_color` on `base` when `pixels` is read."""
    mark_color: tuple[int, int, int] = (255, 0, 0)

    @property
    def pixels(self) -> np.ndarray:
        """The image as the model sees it (a new array when marked; `base` itself otherwise)."""
        if self.marks is None:
            return self.base
        out = np.array(self.base, copy=True)
        out[self.marks[:, 1], self.marks[:, 0]] = self.mark_color
        return out

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    @property
    def source_uid(self) -> str:
        """The uid of the image this one was drawn from (a marked image is `<source uid>:m<x>,<y>`)."""
        return self.uid.split(":", 1)[0]

    @staticmethod
    def content_uid(pixels: np.ndarray, salt: str = "") -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(salt.encode())
        h.update(np.ascontiguousarray(pixels).tobytes())
        h.update(str(pixels.shape).encode())
        return h.hexdigest()


def content_ids(images: Mapping[str, PromptImage]) -> dict[str, str]:
    """Each image's key -> a hash naming its pixels as the model sees them. Images that share a base (one
    image's marked copies) hash it once; a marked image's id adds its marks, so two ids differ whenever
    the pixels do."""
    bases: dict[int, str] = {}
    out = {}
    for key, img in images.items():
        b = bases.get(id(img.base))
        if b is None:
            b = bases[id(img.base)] = PromptImage.content_uid(img.base)
        if img.marks is None:
            out[key] = b
        else:
            h = hashlib.blake2b(b.encode(), digest_size=16)
            h.update(np.ascontiguousarray(img.marks, np.int64).tobytes())
            h.update(bytes(img.mark_color))
            out[key] = h.hexdigest()
    return out


@dataclass
class Query:
    """One question: its exact text and the images it shows, in order."""

    text: str
    image_uids: tuple[str, ...]
    question: str = "depth"
    """The profile question name (engines ignore it except the simulated one)."""


@dataclass(frozen=True)
class Sampling:
    """Per-request generation options (greedy decoding always)."""

    max_tokens: int = 256
    system_prompt: str | None = None
    prefill: str | None = None
    """Text appended to the assistant turn (the model continues it); answers start with it."""
    structured_regex: str | None = None
    logprobs: bool = False
    stop: tuple[str, ...] = ()
    """Generation ends at the first of these strings, which the answer does not include (forced answers:
    densify.queries.forcing)."""


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


class EngineStartError(EngineError):
    """An engine could not start: missing package, model not found, server unreachable, key refused.
    The message names the fix; commands exit with their 'engine unavailable' code."""


class Engine:
    """The base of every engine.

    Subclasses implement `generate(batch)` (answer every query of one batch, in order) or
    `stream(batches)` (yield `(batch, completions)` as batches finish, tags passed through), or both; each
    has a default in terms of the other. A `stream` source may yield None, meaning "no new batch right now":
    the engine goes on with the batches it holds (without blocking on them for long) and asks again; a
    source fed from another thread uses this to keep the engine busy without blocking it.
    """

    name: ClassVar[str] = "engine"
    simulated: ClassVar[bool] = False
    """True for engines that answer from ground truth (tests and demos), never from a model."""
    stats: Mapping = types.MappingProxyType({})
    """Counters and seconds an engine chooses to report (engines assign their own dict)."""

    def generate(self, batch: EngineBatch) -> list[Completion]:
        """Answer every query of the batch, in order."""
        if type(self).stream is Engine.stream:
            raise NotImplementedError(f"{type(self).__name__} must implement generate() or stream()")
        for _, completions in self.stream([batch]):
            return completions
        raise EngineError(f"{self.name} engine returned no answers")

    def stream(self, batches: Iterable[EngineBatch | None]) -> Iterator[tuple[EngineBatch, list[Completion]]]:
        """Answer batches, yielding each with its answers as it finishes (one at a time by default)."""
        for batch in batches:
            if batch is not None:
                yield batch, self.generate(batch) if batch.queries else []

    @property
    def capacity(self) -> int:
        """Batches worth keeping in flight at once (several images inside a streaming engine or pool)."""
        return 1

    def close(self) -> None:
        """Free what the engine holds (GPU memory, threads, actors); idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def generate_stream(engine: Engine, batches: Iterable[EngineBatch]) -> Iterator[tuple[EngineBatch, list[Completion]]]:
    """Run batches through an engine, yielding each batch with its answers as it finishes."""
    return engine.stream(batches)


def check_batch(batch: EngineBatch) -> None:
    for q in batch.queries:
        for uid in q.image_uids:
            if uid not in batch.images:
                raise ValueError(f"query refers to image {uid!r} which is not in the batch")


def batch_sizes(batches: Sequence[EngineBatch]) -> int:
    return sum(len(b.queries) for b in batches)
