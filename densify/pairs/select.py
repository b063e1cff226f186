"""Which image pairs to relate: sequences, every pair, a cheap global similarity, or an hloc pairs file.

Modes (`PairsConfig.mode`):

* ``consecutive`` / ``consecutive+skip2``: images in input order, (i, i+1) [+ (i, i+2)] (a sequence).
* ``exhaustive``: every pair (small sets: n(n-1)/2 pairs).
* ``retrieval``: each image with its ``per_image`` most similar images by a global descriptor, plus the
  maximum spanning tree of the similarity (so no image is left out of the pair graph).
* ``file``: the pairs of an hloc-style text file (``name1 name2`` per line).

``loops`` adds, in the sequential modes, each image's most similar images at least ``loop_min_gap``
images away (loop-closure candidates for a sequence or video that comes back to where it started).

The global descriptor is VLAD (Jegou et al. 2010) over RootSIFT (OpenCV's SIFT, each descriptor
L1-normalised and square-rooted), with a k-means vocabulary (OpenCV) learnt from the image set itself,
intra- and power-normalised; similarity is the cosine. It needs only the pixels and costs ~0.1 s per
image on a CPU: no model query is spent on it.

Every selected pair carries a kind: ``sequential`` (a neighbour in a sequence: expected to overlap) or
``candidate`` (anything else: it is probed with a few queries before the full grid is asked).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from densify.config.loading import ConfigError

log = logging.getLogger(__name__)

__all__ = ["PairsConfig", "RetrievalConfig", "PairSelection", "sequential_pairs", "exhaustive_pairs",
           "global_descriptors", "retrieval_pairs", "read_pairs_file", "select_pairs", "SEQUENTIAL", "CANDIDATE",
           "MODES"]

MODES = ("consecutive", "consecutive+skip2", "exhaustive", "retrieval", "file")
SEQUENTIAL, CANDIDATE = "sequential", "candidate"


class RetrievalConfig(BaseModel):
    """The global image descriptor of `retrieval` (and of loop candidates)."""
    model_config = ConfigDict(extra="forbid")
    features: int = Field(1000, ge=50, description="SIFT features per image")
    vocabulary: int = Field(32, ge=2, description="VLAD vocabulary size (k-means over the set's descriptors)")
    max_side: int = Field(640, ge=64, description="images are reduced to this longest side for the descriptor")
    seed: int = Field(0, description="k-means seed (the selection is reproducible)")


class PairsConfig(BaseModel):
    """Which image pairs get correspondence questions (a plain string sets the mode)."""
    model_config = ConfigDict(extra="forbid")
    mode: Literal["consecutive", "consecutive+skip2", "exhaustive", "retrieval", "file"] = Field(
        "consecutive", description="consecutive: (i, i+1); consecutive+skip2: also (i, i+2); exhaustive: every "
        "pair; retrieval: the per_image most similar images by a global descriptor; file: an hloc pairs file")
    per_image: int = Field(5, ge=1, description="retrieval: pairs per image (its most similar images)")
    file: str | None = Field(None, description="file: text file with one 'name1 name2' per line (hloc format); "
                             "names are file names, paths relative to the images' common folder, or ids")
    loops: int = Field(0, ge=0, description="sequential modes: loop-closure candidates per image (its most "
                       "similar images at least loop_min_gap away in the sequence); 0: none")
    loop_min_gap: int = Field(3, ge=2, description="loop candidates are at least this many images apart")
    probe: list[int] | None = Field([8, 6], description="candidate pairs (not sequence neighbours) are first "
                                    "asked on this [nx, ny] subset of their grid; the rest only when the probe "
                                    "verifies (null: ask the whole grid at once)")
    probe_min_matches: int = Field(8, ge=5, description="a probe verifies with at least this many matches that "
                                   "pass the forward-backward check and the essential matrix's RANSAC")
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v):
        if isinstance(v, str):
            return {"mode": "consecutive+skip2" if v == "+skip2" else v}
        return v

    @field_validator("probe")
    @classmethod
    def _probe(cls, v):
        if v is not None and (len(v) != 2 or min(v) < 2):
            raise ValueError("probe must be [nx, ny] with both >= 2, or null")
        return v

    @model_validator(mode="after")
    def _file(self):
        if self.mode == "file" and not self.file:
            raise ValueError("mode 'file' needs pairs.file (--pairs-file FILE)")
        return self


@dataclass
class PairSelection:
    """The pairs to relate (i < j, sorted), the kind of each, and how they were chosen."""

    pairs: list[tuple[int, int]]
    kinds: dict[tuple[int, int], str]
    report: dict = field(default_factory=dict)

    def kind(self, i: int, j: int) -> str:
        return self.kinds.get((i, j), CANDIDATE)


def sequential_pairs(n: int, skip2: bool = False) -> list[tuple[int, int]]:
    pairs = [(i, i + 1) for i in range(n - 1)]
    if skip2:
        pairs += [(i, i + 2) for i in range(n - 2)]
    return sorted(pairs)


def exhaustive_pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


# -- the global descriptor

def _sift(gray: np.ndarray, n: int) -> np.ndarray:
    """Raw OpenCV SIFT descriptors as uint8 (OpenCV rounds them to integers in [0, 255])."""
    _, d = cv2.SIFT_create(nfeatures=n).detectAndCompute(gray, None)
    return np.zeros((0, 128), np.uint8) if d is None else np.clip(np.rint(d), 0, 255).astype(np.uint8)


def _rootsift(d: np.ndarray) -> np.ndarray:
    d = d.astype(np.float32)
    return np.sqrt(d / (d.sum(1, keepdims=True) + 1e-7))


def _gray(rgb: np.ndarray, max_side: int) -> np.ndarray:
    g = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if rgb.ndim == 3 else rgb
    s = max_side / max(g.shape)
    return cv2.resize(g, None, fx=s, fy=s, interpolation=cv2.INTER_AREA) if s < 1 else g


def _vocabulary(descs: list[np.ndarray], k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    allx = np.concatenate([d for d in descs if len(d)]) if any(len(d) for d in descs) else np.zeros((0, 128))
    if len(allx) > 50_000:
        allx = allx[rng.choice(len(allx), 50_000, replace=False)]
    x = _rootsift(allx)
    k = max(1, min(k, len(x)))
    cv2.setRNGSeed(seed)
    crit = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 30, 1e-4)
    _, _, centres = cv2.kmeans(x, k, None, crit, 1, cv2.KMEANS_PP_CENTERS)
    return centres


def _vlad(d: np.ndarray, centres: np.ndarray) -> np.ndarray:
    k = len(centres)
    v = np.zeros((k, centres.shape[1]), np.float32)
    if len(d):
        x = _rootsift(d)
        a = np.argmin(((x[:, None, :] - centres[None]) ** 2).sum(-1), 1)
        np.add.at(v, a, x - centres[a])
    v /= np.linalg.norm(v, axis=1, keepdims=True) + 1e-12  # intra-normalisation: no word dominates
    v = v.ravel()
    v = np.sign(v) * np.sqrt(np.abs(v))
    return v / (np.linalg.norm(v) + 1e-12)


def global_descriptors(images: Iterable[np.ndarray | None], cfg: RetrievalConfig | None = None) -> np.ndarray:
    """One unit VLAD vector per image (rows; zeros for an image that is None: it matches nothing)."""
    cfg = cfg or RetrievalConfig()
    descs = [_sift(_gray(im, cfg.max_side), cfg.features) if im is not None else np.zeros((0, 128), np.uint8)
             for im in images]
    if not any(len(d) for d in descs):
        return np.zeros((len(descs), 1), np.float32)
    centres = _vocabulary(descs, cfg.vocabulary, cfg.seed)
    return np.stack([_vlad(d, centres) if len(d) else np.zeros(centres.size, np.float32) for d in descs])


def retrieval_pairs(sim: np.ndarray, k: int, *, min_gap: int = 1, spanning_tree: bool = True) -> list[tuple[int, int]]:
    """Each image with its k most similar others (at least min_gap apart in index), plus the maximum spanning
    tree of the similarity (min_gap 1 only), as sorted (i < j) pairs."""
    from scipy.sparse.csgraph import minimum_spanning_tree

    n = len(sim)
    s = np.array(sim, float)
    idx = np.arange(n)
    far = np.abs(idx[:, None] - idx[None]) >= min_gap
    s[~far] = -np.inf
    out = set()
    for i in range(n):
        order = [j for j in np.argsort(-s[i], kind="stable") if np.isfinite(s[i, j])][:k]
        out |= {(int(min(i, j)), int(max(i, j))) for j in order}
    if spanning_tree and min_gap <= 1 and n > 1:
        cost = np.triu(2.0 - np.clip(np.array(sim, float), -1, 1), 1) + np.triu(np.full((n, n), 1e-9), 1)
        tree = minimum_spanning_tree(cost).tocoo()
        out |= {(int(min(a, b)), int(max(a, b))) for a, b in zip(tree.row, tree.col)}
    return sorted(out)


# -- pairs files

def _name_index(paths: list[Path], ids: list[str]) -> dict[str, int]:
    """Every name an image may go by in a pairs file that points at one image only."""
    import os

    root = Path(os.path.commonpath([str(Path(p).resolve().parent) for p in paths])) if paths else Path(".")
    cands: dict[str, set[int]] = {}
    for k, (p, i) in enumerate(zip(paths, ids)):
        p = Path(p)
        names = {str(p), p.name, i, Path(os.path.relpath(p.resolve(), root)).as_posix()}
        for nm in names:
            cands.setdefault(nm, set()).add(k)
    return {nm: next(iter(ks)) for nm, ks in cands.items() if len(ks) == 1}


def read_pairs_file(path: str | Path, paths: list[Path], ids: list[str]) -> tuple[list[tuple[int, int]], dict]:
    """The pairs of an hloc pairs file (one 'name1 name2' per line; '#' comments and blank lines skipped).

    Lines naming an image that is not among the inputs are skipped and counted; a malformed line, or a file
    none of whose pairs are among the inputs, is an error naming the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--pairs-file {path}: cannot be read ({exc}); give a text file of 'name1 name2' lines")
    index = _name_index(paths, ids)
    pairs, unknown, lines = set(), [], 0
    for no, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"--pairs-file {path} line {no}: expected 'name1 name2', got {line[:80]!r}")
        lines += 1
        a, b = (index.get(x) for x in parts)
        if a is None or b is None:
            unknown += [x for x, k in zip(parts, (a, b)) if k is None]
            continue
        if a != b:
            pairs.add((min(a, b), max(a, b)))
    if not pairs:
        raise ConfigError(f"--pairs-file {path}: none of its {lines} pair(s) names two of the input images "
                          f"(names are file names, paths relative to the images' folder, or ids; e.g. "
                          f"{paths[0].name if paths else 'img.jpg'})")
    if unknown:
        log.warning("--pairs-file %s: %d name(s) are not among the inputs (skipped), e.g. %s", path,
                    len(set(unknown)), sorted(set(unknown))[:3])
    return sorted(pairs), {"file": str(path), "lines": lines, "unknown_names": sorted(set(unknown))[:20],
                           "unknown_count": len(set(unknown))}


# -- the selection

def select_pairs(cfg: PairsConfig, paths: list[Path], ids: list[str],
                 load: Callable[[int], np.ndarray | None] | None = None) -> PairSelection:
    """The pairs of `cfg` over images given by path and id; `load(k)` gives image k's pixels (or None when it
    cannot be read) for the global descriptor of `retrieval` and `loops`."""
    import time

    n = len(paths)
    seq = cfg.mode in ("consecutive", "consecutive+skip2")
    report: dict = {"mode": cfg.mode}
    if seq:
        pairs = sequential_pairs(n, cfg.mode == "consecutive+skip2")
        kinds = {p: SEQUENTIAL for p in pairs}
    elif cfg.mode == "exhaustive":
        pairs, kinds = exhaustive_pairs(n), {}
    elif cfg.mode == "file":
        pairs, rep = read_pairs_file(cfg.file, paths, ids)
        report.update(rep)
        kinds = {}
    if cfg.mode == "retrieval" or (seq and cfg.loops):
        if load is None:
            raise ValueError("retrieval needs the images' pixels (load)")
        t0 = time.perf_counter()
        desc = global_descriptors((load(k) for k in range(n)), cfg.retrieval)
        sim = desc @ desc.T
        if cfg.mode == "retrieval":
            pairs, kinds = retrieval_pairs(sim, cfg.per_image), {}
        else:
            extra = retrieval_pairs(sim, cfg.loops, min_gap=cfg.loop_min_gap, spanning_tree=False)
            report["loop_candidates"] = len(set(extra) - set(pairs))
            pairs = sorted(set(pairs) | set(extra))
        report["descriptor"] = "VLAD over RootSIFT (OpenCV), vocabulary %d" % cfg.retrieval.vocabulary
        report["descriptor_s"] = round(time.perf_counter() - t0, 3)
    report["pairs"] = len(pairs)
    report["candidates"] = sum(kinds.get(p) != SEQUENTIAL for p in pairs)
    return PairSelection(pairs, {p: kinds.get(p, CANDIDATE) for p in pairs}, report)
