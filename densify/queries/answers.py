"""Answers: engine texts -> values, with a failure record for every answer that gives none."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from densify.config.profiles import Profile, Question
from densify.engines.base import Completion

THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL)

# failure kinds
MISSING_TAG = "missing_tag"
NOT_A_NUMBER = "not_a_number"
NON_POSITIVE = "non_positive"
NO_MATCH = "no_match"
ENGINE_ERROR = "engine_error"
UNMARKABLE = "unmarkable"  # not asked: too close to a border for the profile's marker


@dataclass
class Parsed:
    value: object | None
    failure: str | None = None


def _compiled(regex: str, flags=0) -> re.Pattern:
    return _cache.setdefault((regex, flags), re.compile(regex, flags))


_cache: dict = {}


def _num(s: str) -> float | None:
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


_BOX4_RE = re.compile(r"\(\s*\d+\s*,\s*\d+\s*,\s*\d+\s*,\s*\d+\s*\)|Region \[\d+\]")


# Object answers (VLM3-object, SpatialRGPT-Bench): the profile's regexes find the words and numbers.
UNITS_M = {"m": 1.0, "meter": 1.0, "meters": 1.0, "metre": 1.0, "metres": 1.0,
           "cm": 0.01, "centimeter": 0.01, "centimeters": 0.01, "centimetre": 0.01, "centimetres": 0.01,
           "mm": 0.001, "millimeter": 0.001, "millimeters": 0.001, "millimetre": 0.001, "millimetres": 0.001,
           "inch": 0.0254, "inches": 0.0254, "in": 0.0254, "foot": 0.3048, "feet": 0.3048, "ft": 0.3048}


def parse_predicate(q: Question, text: str) -> bool | None:
    """Yes/correct/indeed/true vs no/incorrect/actually/in fact: the earliest word decides."""
    pos = _compiled(q.regex, re.IGNORECASE).search(text)
    neg = _compiled(q.regex_negative or r"(?!)", re.IGNORECASE).search(text)
    if pos is None and neg is None:
        return None
    if neg is None:
        return True
    if pos is None:
        return False
    return pos.start() < neg.start()

def parse_choice(q: Question, text: str) -> tuple | None:
    """The first region the answer names: ('box', (x1, y1, x2, y2)) or ('index', i) for `Region [i]`."""
    m = _compiled(q.regex).search(text)
    if m is None:
        return None
    g = [x for x in m.groups() if x is not None]
    if len(g) == 4:
        return ("box", tuple(int(v) for v in g))
    return ("index", int(g[0]))

def parse_metric(q: Question, text: str) -> float | None:
    """The first number with a length unit, in metres."""
    m = _compiled(q.regex, re.IGNORECASE).search(text)
    if m is None:
        return None
    try:
        v = float(m.group(1))
    except ValueError:
        return None
    unit = UNITS_M.get(m.group(2).lower())
    if unit is None or not math.isfinite(v) or v < 0:
        return None
    return v * unit

def parse_clock(q: Question, text: str) -> int | None:
    m = _compiled(q.regex, re.IGNORECASE).search(text)
    if m is None:
        return None
    h = int(m.group(1))
    return h if 1 <= h <= 12 else None


def _parse_object(question: Question, body: str) -> Parsed:
    """Object answers: predicate -> bool, choice -> ('box', x1y1x2y2) | ('index', i), metric -> metres,
    clock -> 1..12. Region references are removed before looking for numbers."""
    kind = question.parser
    if kind == "choice":
        v = parse_choice(question, body)
    else:
        clean = _BOX4_RE.sub(" ", body)
        v = {"predicate": parse_predicate, "metric": parse_metric, "clock": parse_clock}[kind](question, clean)
    return Parsed(None, NO_MATCH) if v is None else Parsed(v)


def parse_text(question: Question, text: str) -> Parsed:
    body = THINK_RE.sub("", text) if question.strip_think else text
    kind = question.parser
    if kind in ("predicate", "choice", "metric", "clock"):
        return _parse_object(question, body)
    if kind == "depth":
        m = _compiled(question.regex).search(body)
        if m is None:
            return Parsed(None, NOT_A_NUMBER if "<answer>" in body else MISSING_TAG)
        v = _num(m.group(1))
        if v is None:
            return Parsed(None, NOT_A_NUMBER)
        if v <= 0:
            return Parsed(None, NON_POSITIVE)
        return Parsed(v)
    if kind == "euler":
        out = []
        for axis in ("yaw", "pitch", "roll"):
            m = _compiled(question.regex.replace("{axis}", axis), re.IGNORECASE).search(body)
            if m is None:
                return Parsed(None, NO_MATCH)
            out.append(float(m.group(1)))
        return Parsed(tuple(out))
    m = _compiled(question.regex, re.IGNORECASE if kind == "distance" else 0).search(body)
    if m is None:
        return Parsed(None, NO_MATCH)
    vals = [_num(g) for g in m.groups()]
    if any(v is None for v in vals):
        return Parsed(None, NOT_A_NUMBER)
    if kind in ("angle", "distance"):
        if kind == "distance" and vals[0] < 0:
            return Parsed(None, NON_POSITIVE)
        return Parsed(vals[0])
    return Parsed(tuple(vals))


def parse_completion(question: Question, c: Completion) -> Parsed:
    if c.error is not None:
        return Parsed(None, ENGINE_ERROR)
    return parse_text(question, c.text)


@dataclass
class PointAnswers:
    """Answers about points of one image (depth) or one pair (correspondences)."""

    pixels: np.ndarray            # Nx2 original pixels asked about
    prompt_xy: np.ndarray | None  # Nx2 prompt coordinates (None for marker profiles)
    texts: list[str]
    values: np.ndarray            # N (depth, metres) or Nx2 (matched pixel in image 2, original px); NaN = none
    failures: list[str | None]
    logprobs: np.ndarray          # N, NaN when not reported
    errors: list[str | None] = field(default_factory=list)

    @property
    def valid(self) -> np.ndarray:
        return np.array([f is None for f in self.failures], dtype=bool)

    def failure_counts(self) -> dict[str, int]:
        return dict(Counter(f for f in self.failures if f is not None))

    def records(self):
        """One JSON-ready dict per answer (for answers.jsonl)."""
        for i, text in enumerate(self.texts):
            v = self.values[i]
            val = None if np.any(np.isnan(v)) else (np.asarray(v).tolist())
            yield {"pixel": [float(p) for p in self.pixels[i]],
                   "prompt": None if self.prompt_xy is None else [int(p) for p in self.prompt_xy[i]],
                   "text": text, "value": val, "failure": self.failures[i],
                   "logprob": None if np.isnan(self.logprobs[i]) else float(self.logprobs[i])}


def collect_depth(profile: Profile, pixels: np.ndarray, prompt_xy, completions: list[Completion], *,
                  unmarkable: np.ndarray | None = None) -> PointAnswers:
    """Answers about `pixels` (one completion each, in order); `unmarkable` pixels (never asked: a marker
    cannot be drawn there) follow them, each with the failure kind `unmarkable`."""
    q = profile.question
    vals = np.full(len(completions), np.nan)
    fails: list[str | None] = []
    for i, c in enumerate(completions):
        p = parse_completion(q, c)
        fails.append(p.failure)
        if p.failure is None:
            vals[i] = p.value
    lps = np.array([np.nan if c.logprob is None else c.logprob for c in completions], dtype=float)
    texts, errors = [c.text for c in completions], [c.error for c in completions]
    pixels = np.asarray(pixels, float).reshape(-1, 2)
    n = 0 if unmarkable is None else len(unmarkable)
    if n:
        pixels = np.concatenate([pixels, np.asarray(unmarkable, float).reshape(-1, 2)])
        vals, lps = np.concatenate([vals, np.full(n, np.nan)]), np.concatenate([lps, np.full(n, np.nan)])
        fails, texts, errors = fails + [UNMARKABLE] * n, texts + [""] * n, errors + [None] * n
        if prompt_xy is not None:
            raise ValueError("unmarkable pixels belong to marker profiles, which have no prompt coordinates")
    return PointAnswers(pixels, prompt_xy, texts, vals, fails, lps, errors)
