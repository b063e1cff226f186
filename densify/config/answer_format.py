"""The fixed text around an answer's number (densify.queries.forcing forces it; profiles declare it).

Pure text, no other densify module imported: profiles validate their formats with it.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_NUMBER_CHARS = set("0123456789.-+eE")


@dataclass(frozen=True)
class AnswerFormat:
    """The fixed text around an answer's number: `head`, the number, then `tail` pieces with the number
    again between them (one piece: it is written once)."""

    head: str
    tail: tuple[str, ...] = ()
    """empty: only the head is known (forced without a stop; the model writes the rest)"""
    source: str = "declared"

    @classmethod
    def parse(cls, fmt: str, source: str = "declared") -> "AnswerFormat":
        """From a format string whose replacement fields are all the number (`{d:.2f}`)."""
        pieces, names = [], set()
        for literal, name, _spec, _conv in string.Formatter().parse(fmt):
            pieces.append(literal)
            if name is not None:
                names.add(name)
                pieces.append(None)
        if len(names) != 1 or None not in pieces:
            raise ValueError(f"an answer format needs exactly one replacement field (the number), used once or "
                             f"more: {fmt!r}")
        first = pieces.index(None)
        head = "".join(pieces[:first])
        tail = "".join(p if p is not None else "\x00" for p in pieces[first + 1:]).split("\x00")
        return cls(head, tuple(tail), source)

    @property
    def stop(self) -> str | None:
        """The stop string: the tail's leading whitespace and first character (never part of a number)."""
        if not self.tail:
            return None
        t = self.tail[0]
        core = t.lstrip()
        if not core or core[0] in _NUMBER_CHARS:
            return None
        return t[: len(t) - len(core) + 1]

    def complete(self, generated: str) -> str:
        """The whole answer from what the model wrote after the head."""
        if self.stop is None:
            return self.head + generated
        number = generated.strip()
        if not NUMBER.fullmatch(number):
            return self.head + generated  # not a lone number: left as written (the parser decides)
        return self.head + generated + number.join(self.tail)

    @classmethod
    def learn(cls, texts: list[str], min_head: int = 4) -> "AnswerFormat | None":
        """The fixed text of these answers (see the module docstring), or None when there is none."""
        heads, tails = [], []
        for t in texts:
            m = NUMBER.search(t)
            if m is None:
                continue
            heads.append(t[: m.start()])
            tails.append(tuple(t[m.end():].split(m.group())))
        if not heads:
            return None
        head = heads[0] if len(set(heads)) == 1 else _common_prefix(heads)
        if len(head) < min_head:
            return None
        tail = tails[0] if len(set(heads)) == 1 and len(set(tails)) == 1 else ()
        fmt = cls(head, tail, "learned")
        return fmt if fmt.stop is not None or not tail else cls(head, (), "learned")

    def describe(self) -> dict:
        return {"source": self.source, "head": self.head, "tail": list(self.tail), "stop": self.stop}


def _common_prefix(texts: list[str]) -> str:
    lo, hi = min(texts), max(texts)
    n = 0
    while n < len(lo) and lo[n] == hi[n]:
        n += 1
    return lo[:n]
