"""Answers that decode only what is unknown: the fixed text around the number is forced, not generated.

A point-query model writes the same words around every number (DepthLM's training answer: `<think> The point
is around 3.42 meters away from the camera. </think>\\n\\n<answer> 3.42 </answer>`, ~30 tokens for a 4-token
number). When that text is known, the engine appends its head to the assistant turn (`Sampling.prefill`) and
stops as soon as the number is written (`Sampling.stop`: the tail's first character), and the answer text is
completed here: head + number + tail (with the number again wherever the format repeats it), so the parser
sees the whole answer. A forced answer that is not a lone number (the model would have written something
else) is asked again unforced, so what it would have written is what the job keeps. Under greedy decoding this gives the same number whenever the model would have
written that text itself. Nothing guarantees that, so an **audit** asks a share of the queries also without
forcing (`audit_share` of each batch, at least `audit_min`: every round of an image), compares the two
numbers, keeps the unforced answer for those queries, records the agreement, and turns forcing off for the
rest of the job (with a warning) when the agreement falls below `threshold`.

Where the text is published, the profile declares it (`Question.answer_format`, the number as one Python
format field, e.g. `{d:.2f}`, repeated where the model repeats it). Where it is not (VLM3-depth's `<think>`
content), `learn_answer_format: true` lets the job learn it from its first unforced answers: the text before
the first number when every answer starts with the same one (else their common prefix, forced without a
stop), and the text after it when that is the same in every answer. Off where nothing is declared or learned,
or where the sampling already has a prefill or structured decoding (a regex constrains the whole answer).
Which queries are audited depends only on the batch, so a resumed label job asks the same ones (its answer
store replays them); a learned format depends on which answers came first, so `densify label` uses declared
formats only by default (`forcing.mode: declared`).

`ForcingEngine` wraps any engine (vllm, hf, openai, a Ray pool of them, the simulator): each batch is split into
its forced part and an unforced audit part, and put back together before it is returned.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from densify.engines.base import Completion, Engine, EngineBatch, Sampling
from densify.config.answer_format import NUMBER, AnswerFormat

__all__ = ["AnswerFormat", "ForcingEngine", "ForcingSettings", "NUMBER"]

log = logging.getLogger("densify.forcing")

class ForcingSettings(BaseModel):
    """Forced answers: the fixed text around the number is not generated (DepthConfig.forcing)."""
    model_config = ConfigDict(extra="forbid")

    mode: Literal["auto", "off", "declared", "learn"] = Field(
        "auto", description="auto: the profile's answer_format, else learn it where the profile allows "
                            "(learn_answer_format); off; declared: only a declared format; learn: learn it anyway")
    audit_share: float = Field(0.01, ge=0, le=1, description="share of each batch also asked unforced and compared")
    audit_min: int = Field(2, ge=0, description="at least this many audited queries per batch (each round of an image)")
    threshold: float = Field(0.95, ge=0, le=1, description="forcing goes off for the rest of the job when the audit "
                                                           "agreement falls below this")
    min_audits: int = Field(20, ge=1, description="audited answers before the threshold applies")
    learn_answers: int = Field(32, ge=2, description="learn: parsed unforced answers the format is learned from")
    max_tokens: int = Field(16, ge=1, description="tokens a forced answer may generate (the number and the stop)")


@dataclass
class _Parent:
    batch: EngineBatch
    parts: int
    forced: list | None = None
    audit: list | None = None
    audit_idx: list = field(default_factory=list)
    plain: list | None = None
    retry_idx: list = field(default_factory=list)
    """forced answers that were not a lone number: asked again unforced"""
    out: list | None = None


class ForcingEngine(Engine):
    """Forced answers with an audit around any engine (see the module docstring). `report()` is the
    job's record: format, forced and audited queries, agreement, and whether and why forcing went off."""

    def __init__(self, inner: Engine, profile, settings: ForcingSettings | None = None, question: str | None = None):
        from densify.queries.answers import parse_text

        self.inner = inner
        self.settings = s = settings or ForcingSettings()
        self._parse = parse_text
        self.question = profile.questions[question or profile.default_question]
        self.fmt: AnswerFormat | None = None
        self.learning = False
        self.off_reason: str | None = None
        declared = getattr(self.question, "answer_format", None)
        can_learn = bool(getattr(self.question, "learn_answer_format", False))
        if s.mode == "off":
            self.off_reason = "forcing.mode is off"
        elif declared and s.mode in ("auto", "declared"):
            self.fmt = AnswerFormat.parse(declared)
        elif s.mode == "learn" or (s.mode == "auto" and can_learn):
            self.learning = True
        else:
            self.off_reason = ("the profile declares no answer format" if s.mode == "declared" else
                               "the profile declares no answer format and does not allow learning one")
        self.forced = self.audited = self.agreed = self.same_text = self.retried = 0
        self.disagreements: list[dict] = []
        self.disabled_after: int | None = None
        self._learned_from: list[str] = []
        self._keys = itertools.count()

    # -- the engine protocol, passed through
    name = "forcing"

    @property
    def simulated(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.inner, "simulated", False))

    @property
    def stats(self):  # type: ignore[override]
        return self.inner.stats

    @property
    def capacity(self) -> int:
        return self.inner.capacity

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, item):  # the inner engine's own attributes (num_actors, memory_plan, ...)
        if item == "inner":
            raise AttributeError(item)
        return getattr(self.inner, item)

    @property
    def active(self) -> bool:
        return self.fmt is not None and self.off_reason is None

    def generate(self, batch: EngineBatch) -> list[Completion]:
        for _, completions in self.stream([batch]):
            return completions
        return []

    def stream(self, batches: Iterable[EngineBatch | None]) -> Iterator[tuple[EngineBatch, list[Completion]]]:
        parents: dict[int, _Parent] = {}
        queue: deque[EngineBatch] = deque()

        def feed():
            for b in batches:
                if b is not None:
                    queue.extend(self._split(b, parents))
                if queue:
                    while queue:
                        yield queue.popleft()
                elif b is None:
                    yield None
            while queue or parents:  # retries of forced answers that were not a number
                yield queue.popleft() if queue else None

        for sub, comps in self.inner.stream(feed()):
            key, part = sub.tag
            p = parents[key]
            if part == "retry":
                for j, i in enumerate(p.retry_idx):
                    p.out[i] = comps[j]
                del parents[key]
                yield p.batch, p.out
                continue
            setattr(p, part, comps)
            if p.plain is not None or (p.forced is not None and (p.parts == 1 or p.audit is not None)):
                out = self._merge(p)
                if p.retry_idx:
                    p.out = out
                    queue.append(replace(p.batch, queries=[p.batch.queries[i] for i in p.retry_idx],
                                         tag=(key, "retry")))
                    continue
                del parents[key]
                yield p.batch, out

    # -- splitting and merging
    def _usable(self, s: Sampling) -> str | None:
        if s.prefill:
            return "the sampling already has a prefill"
        if s.structured_regex:
            return "structured decoding constrains the whole answer"
        return None

    def _split(self, batch: EngineBatch, parents: dict) -> list[EngineBatch]:
        key = next(self._keys)
        why = self._usable(batch.sampling)
        if not self.active or why or not batch.queries:
            parents[key] = _Parent(batch, 1)
            return [replace(batch, tag=(key, "plain"))]
        n = len(batch.queries)
        # per batch, not per job: the same batch is audited the same way in a resumed job (answer store)
        k = min(n, max(math.ceil(self.settings.audit_share * n), self.settings.audit_min))
        idx = sorted({int(round(i * (n - 1) / max(k - 1, 1))) for i in range(k)}) if k else []
        s = batch.sampling
        forced_s = replace(s, prefill=self.fmt.head, stop=(self.fmt.stop,) if self.fmt.stop else (),
                           max_tokens=min(s.max_tokens, self.settings.max_tokens) if self.fmt.stop else s.max_tokens)
        p = _Parent(batch, 2 if idx else 1, audit_idx=idx)
        parents[key] = p
        subs = [replace(batch, sampling=forced_s, tag=(key, "forced"))]
        if idx:
            subs.append(replace(batch, queries=[batch.queries[i] for i in idx], tag=(key, "audit")))
        return subs

    def _merge(self, p: _Parent) -> list[Completion]:
        if p.plain is not None:
            if self.learning and self.fmt is None:
                self._learn(p.plain)
            return p.plain
        fmt = self.fmt
        head = fmt.head
        out = []
        audited = set(p.audit_idx)
        for i, c in enumerate(p.forced):
            if c.error is None:
                gen = c.text[len(head):] if c.text.startswith(head) else c.text
                if fmt.stop is not None and not NUMBER.fullmatch(gen.strip()) and i not in audited:
                    p.retry_idx.append(i)  # not the number the format expects: the model's own answer instead
                c = replace(c, text=fmt.complete(gen))
            out.append(c)
        self.forced += len(out)
        self.retried += len(p.retry_idx)
        for j, i in enumerate(p.audit_idx):
            free, forced = p.audit[j], out[i]
            if free.error is not None or forced.error is not None:
                continue
            self.audited += 1
            a, b = self._parse(self.question, free.text), self._parse(self.question, forced.text)
            agree = (a.value is None and b.value is None) or (a.value is not None and b.value is not None
                                                              and math.isclose(a.value, b.value, rel_tol=1e-9))
            self.agreed += agree
            self.same_text += free.text == forced.text
            if not agree and len(self.disagreements) < 5:
                self.disagreements.append({"free": free.text[:200], "forced": forced.text[:200]})
            out[i] = free  # the model's own answer
        self._check()
        return out

    def _learn(self, completions: list[Completion]) -> None:
        for c in completions:
            if c.error is None and self._parse(self.question, c.text).value is not None:
                self._learned_from.append(c.text)
        if len(self._learned_from) < self.settings.learn_answers:
            return
        self.learning = False
        self.fmt = AnswerFormat.learn(self._learned_from)
        if self.fmt is None:
            self.off_reason = (f"no fixed text around the number in the first {len(self._learned_from)} "
                               f"answers")
            log.info("answer forcing: %s; answers are generated in full", self.off_reason)
        else:
            log.info("answer forcing: learned from %d answers: head %r, stop %r", len(self._learned_from),
                     self.fmt.head, self.fmt.stop)

    def _check(self) -> None:
        s = self.settings
        if self.off_reason is None and self.audited >= s.min_audits and self.agreement < s.threshold:
            self.off_reason = (f"audit: {self.agreed} of {self.audited} forced answers agreed with the unforced "
                               f"ones ({self.agreement:.1%} < {s.threshold:.0%})")
            self.disabled_after = self.forced
            log.warning("answer forcing turned off for the rest of the job: %s", self.off_reason)

    @property
    def agreement(self) -> float:
        return self.agreed / self.audited if self.audited else float("nan")

    def report(self) -> dict:
        return {"mode": self.settings.mode, "active": self.active,
                "format": self.fmt.describe() if self.fmt is not None else None,
                "forced_queries": self.forced, "retried_unforced": self.retried, "audited": self.audited,
                "agreed": self.agreed,
                "agreement": None if not self.audited else round(self.agreement, 4),
                "same_text": self.same_text, "off_reason": self.off_reason,
                "forced_before_off": self.disabled_after, "disagreements": self.disagreements,
                "learning": self.learning}

