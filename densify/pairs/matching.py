"""Correspondences: corr-profile answers -> matches in original pixels of both images -> dense flow.

A pair is asked about a grid of pixels of image 1 (one VLM3-corr question each). Each answer is a point
in prompt coordinates of image 2 ([0, 1000] of the preprocessed image), mapped back through image 2's
PixelMap to its original pixels. The optional forward-backward check asks the reverse question at each
answered point (image 2 first, at exactly the answered prompt coordinates) and drops matches whose
round trip lands more than `fb_thresh_px` original pixels from where it started.

Match positions in image 1 are the positions the model was actually asked about (the prompt coordinates
mapped back), not the grid pixels they were rounded from: the difference is up to half a prompt unit.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from densify.config.profiles import Profile
from densify.engines.base import Completion, Engine, EngineBatch, ImageRef, generate_stream
from densify.fields import DenseField
from densify.io import outputs
from densify.io.cameras import Camera, PreparedImage, prepare_for
from densify.queries.answers import parse_completion
from densify.queries.plan import QueryPlan, grid_points, plan_queries
from densify.queries.prompts import corr_batch, image_ref, image_uid, sampling_for

log = logging.getLogger(__name__)

__all__ = ["CorrView", "Matches", "corr_view", "plan_pair", "track_points", "probe_subset",
           "collect_matches", "backward_plan", "apply_forward_backward", "match_pair", "match_pairs",
           "dense_flow", "sift_matches", "DEFAULT_GRID"]

DEFAULT_GRID = (24, 18)
"""Queries per pair (nx, ny): 432, each one a two-image prompt on a real model."""

# failure kinds beyond the parser's (densify.queries.answers)
OUT_OF_RANGE = "out_of_range"
FB_REJECTED = "fb_rejected"
FB_UNANSWERED = "fb_unanswered"


@dataclass
class CorrView:
    """One image as the corr profile sees it."""

    id: str
    camera: Camera
    prep: PreparedImage
    uid: str
    ref: ImageRef | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.camera.width, self.camera.height


def corr_view(image_id: str, rgb: np.ndarray, camera: Camera, profile: Profile, *, path=None,
              manifest=None) -> CorrView:
    prep = prepare_for(rgb, camera, profile)
    return CorrView(image_id, camera, prep, image_uid(prep, image_id), image_ref(image_id, prep, path, manifest))


# -- matches

@dataclass
class Matches:
    """Answers about one ordered pair: pixel xy1 of image 1 -> xy2 of image 2 (original pixels)."""

    id1: str
    id2: str
    xy1: np.ndarray
    """Nx2 float: the positions asked about (prompt coordinates mapped back to image 1)."""
    xy2: np.ndarray
    """Nx2 float: the answers in image 2's original pixels; NaN where there is none."""
    prompt1: np.ndarray
    """Nx2 int prompt coordinates asked."""
    prompt2: np.ndarray
    """Nx2 int prompt coordinates answered (-1 where none)."""
    failures: list
    """Per answer: None, or why it gives no match (parser kinds, out_of_range, fb_rejected, ...)."""
    texts: list = field(default_factory=list)
    fb_error: np.ndarray | None = None
    """N round-trip errors in image-1 pixels (NaN where not checked); None without the check."""
    size1: tuple[int, int] = (0, 0)
    size2: tuple[int, int] = (0, 0)
    backward_queries: int = 0
    """Reverse questions asked for the forward-backward check (each answered point once)."""

    def __len__(self) -> int:
        return len(self.xy1)

    @property
    def valid(self) -> np.ndarray:
        return np.array([f is None for f in self.failures], dtype=bool)

    @property
    def n_valid(self) -> int:
        return int(self.valid.sum())

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        v = self.valid
        return self.xy1[v], self.xy2[v]

    def failure_counts(self) -> dict[str, int]:
        return dict(Counter(f for f in self.failures if f is not None))

    def records(self):
        """One JSON-ready dict per answer (answers.jsonl)."""
        for i in range(len(self)):
            ok = self.failures[i] is None
            yield {"xy1": self.xy1[i].tolist(), "prompt1": self.prompt1[i].tolist(),
                   "text": self.texts[i] if i < len(self.texts) else None,
                   "xy2": self.xy2[i].tolist() if np.all(np.isfinite(self.xy2[i])) else None,
                   "prompt2": self.prompt2[i].tolist() if self.prompt2[i, 0] >= 0 else None,
                   "fb_error": None if self.fb_error is None or not np.isfinite(self.fb_error[i])
                   else float(self.fb_error[i]),
                   "valid": ok, "failure": self.failures[i]}

    def save(self, path: str | Path, **extra: np.ndarray) -> Path:
        """matches.npz: xy1, xy2, valid, prompt1, prompt2, fb_error, sizes, failures, ids (+ extra arrays)."""
        path = Path(path)
        with outputs.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, xy1=self.xy1, xy2=self.xy2, valid=self.valid, prompt1=self.prompt1,
                         prompt2=self.prompt2, size1=np.array(self.size1), size2=np.array(self.size2),
                         fb_error=self.fb_error if self.fb_error is not None else np.full(len(self), np.nan),
                         failures=np.array([f or "" for f in self.failures]), ids=np.array([self.id1, self.id2]),
                         **extra)
        return path

    @classmethod
    def concat(cls, parts: list["Matches"]) -> "Matches":
        """One pair's answers asked in parts (a probe, then the rest), as if asked at once."""
        a = parts[0]
        fb = None if all(p.fb_error is None for p in parts) else np.concatenate(
            [p.fb_error if p.fb_error is not None else np.full(len(p), np.nan) for p in parts])
        return cls(a.id1, a.id2, *(np.concatenate([getattr(p, k) for p in parts]) for k in
                                   ("xy1", "xy2", "prompt1", "prompt2")),
                   [f for p in parts for f in p.failures], [t for p in parts for t in p.texts], fb, a.size1, a.size2,
                   sum(p.backward_queries for p in parts))

    @classmethod
    def load(cls, path: str | Path) -> "Matches":
        z = np.load(path)
        ids = [str(s) for s in z["ids"]]
        return cls(ids[0], ids[1], z["xy1"], z["xy2"], z["prompt1"], z["prompt2"],
                   [str(f) or None for f in z["failures"]], [], z["fb_error"],
                   tuple(int(v) for v in z["size1"]), tuple(int(v) for v in z["size2"]))


def plan_pair(v1: CorrView, points: np.ndarray | None = None, grid: tuple[int, int] = DEFAULT_GRID) -> QueryPlan:
    """Queries over image 1: the given points (original pixels) or a regular grid."""
    if points is None:
        points = grid_points(v1.camera.width, v1.camera.height, count=tuple(grid))
    return plan_queries(np.asarray(points, float), v1.prep.pixel_map)


def track_points(width: int, height: int, grid: tuple[int, int], carried: np.ndarray | None) -> np.ndarray:
    """A grid over the image where each cell that holds a carried point (where an earlier pair's answer
    landed in this image) asks about that point instead of the cell centre.

    Asking again exactly where an answer landed chains pairwise matches into multi-view tracks (i -> i+1 ->
    i+2) at no extra queries; the grid keeps the coverage even.
    """
    pts = grid_points(width, height, count=tuple(grid)).astype(np.float64)
    if carried is None or len(carried) == 0:
        return pts
    nx, ny = grid
    cw, ch = width / nx, height / ny
    c = np.asarray(carried, float).reshape(-1, 2)
    c = c[np.all(np.isfinite(c), 1) & (c[:, 0] >= 0) & (c[:, 0] < width) & (c[:, 1] >= 0) & (c[:, 1] < height)]
    if not len(c):
        return pts
    cx = np.minimum((c[:, 0] / cw).astype(int), nx - 1)
    cy = np.minimum((c[:, 1] / ch).astype(int), ny - 1)
    cell = cy * nx + cx
    centre = pts[cell]
    d = np.hypot(*(c - centre).T)
    order = np.lexsort((d, cell))  # per cell, the carried point nearest the centre first
    cell_s = cell[order]
    first = np.r_[True, cell_s[1:] != cell_s[:-1]]
    pts[cell_s[first]] = c[order][first]
    return pts


def probe_subset(points: np.ndarray, width: int, height: int, grid: tuple[int, int]) -> np.ndarray:
    """Indices of a probe: per cell of a coarse grid, the point of `points` nearest its centre (each once).

    The probe asks a subset of the pair's own points, so a pair that verifies costs no extra query."""
    pts = np.asarray(points, float).reshape(-1, 2)
    centres = grid_points(width, height, count=tuple(grid)).astype(float)
    d = ((centres[:, None, :] - pts[None]) ** 2).sum(-1)
    return np.unique(np.argmin(d, 1))


def collect_matches(profile: Profile, plan: QueryPlan, v1: CorrView, v2: CorrView,
                    completions: list[Completion]) -> Matches:
    """Parse answers (xy parser) and map them: prompt coordinates of image 2 -> its original pixels."""
    q = profile.question
    n = len(completions)
    prompt2 = np.full((n, 2), -1, np.int64)
    raw = np.full((n, 2), np.nan)
    fails: list = []
    r = profile.coord_range
    for i, c in enumerate(completions):
        p = parse_completion(q, c)
        if p.failure is None:
            u, v = p.value
            if not (0 <= u <= r and 0 <= v <= r):
                fails.append(OUT_OF_RANGE)
                continue
            raw[i] = (u, v)
            prompt2[i] = (int(round(u)), int(round(v)))
        fails.append(p.failure)
    xy2 = np.stack(v2.prep.pixel_map.prompt_to_orig(raw[:, 0], raw[:, 1]), 1)
    xy1 = np.stack(v1.prep.pixel_map.prompt_to_orig(plan.prompt_xy[:, 0], plan.prompt_xy[:, 1]), 1)
    return Matches(v1.id, v2.id, xy1, xy2, np.asarray(plan.prompt_xy, np.int64), prompt2, fails,
                   [c.text for c in completions], None, v1.size, v2.size)


def backward_plan(fwd: Matches, v2: CorrView) -> tuple[QueryPlan, np.ndarray]:
    """Reverse questions at exactly the answered prompt coordinates of image 2 (each asked once);
    returns the plan and, per forward answer, its row in the plan (-1 when not asked)."""
    ok = fwd.valid & (fwd.prompt2[:, 0] >= 0)
    uniq, inv = np.unique(fwd.prompt2[ok], axis=0, return_inverse=True)
    row = np.full(len(fwd), -1, np.int64)
    row[np.flatnonzero(ok)] = inv.ravel()
    pix = np.stack(v2.prep.pixel_map.prompt_to_orig(uniq[:, 0], uniq[:, 1]), 1) if len(uniq) else np.zeros((0, 2))
    return QueryPlan(pix, uniq.astype(np.int64).reshape(-1, 2)), row


def apply_forward_backward(fwd: Matches, back: Matches, row: np.ndarray, thresh_px: float) -> Matches:
    """Round trip xy1 -> xy2 -> back into image 1; drop matches that land more than thresh_px away."""
    err = np.full(len(fwd), np.nan)
    fails = list(fwd.failures)
    for i in np.flatnonzero(row >= 0):
        b = back.xy2[row[i]]
        if back.failures[row[i]] is not None or not np.all(np.isfinite(b)):
            fails[i] = FB_UNANSWERED
            continue
        err[i] = float(np.hypot(*(b - fwd.xy1[i])))
        if err[i] > thresh_px:
            fails[i] = FB_REJECTED
    return Matches(fwd.id1, fwd.id2, fwd.xy1, fwd.xy2, fwd.prompt1, fwd.prompt2, fails, fwd.texts, err,
                   fwd.size1, fwd.size2, len(back))


@dataclass
class PairRequest:
    """One pair to match: views and optional query points in image 1."""

    v1: CorrView
    v2: CorrView
    points: np.ndarray | None = None
    key: object = None


def match_pairs(engine: Engine, profile: Profile, requests, *, grid: tuple[int, int] = DEFAULT_GRID,
                fb_check: bool = True, fb_thresh_px: float = 10.0):
    """Match pairs through an engine; yields (request, Matches) in order.

    Forward and backward questions of a pair go out as two batches (the backward one needs the forward
    answers). Requests are pulled lazily, so a caller may build request k+1 from request k's matches.
    """
    sampling = sampling_for(profile)
    for req in requests:
        plan = plan_pair(req.v1, req.points, grid)
        batch = corr_batch(req.v1.prep, req.v2.prep, plan, profile, uid1=req.v1.uid, uid2=req.v2.uid,
                           ref1=req.v1.ref, ref2=req.v2.ref, sampling=sampling)
        fwd = collect_matches(profile, plan, req.v1, req.v2, _generate(engine, batch))
        if fb_check and fwd.n_valid:
            bplan, row = backward_plan(fwd, req.v2)
            bbatch = corr_batch(req.v2.prep, req.v1.prep, bplan, profile, uid1=req.v2.uid, uid2=req.v1.uid,
                                ref1=req.v2.ref, ref2=req.v1.ref, sampling=sampling)
            back = collect_matches(profile, bplan, req.v2, req.v1, _generate(engine, bbatch))
            fwd = apply_forward_backward(fwd, back, row, fb_thresh_px)
        log.debug("%s -> %s: %d of %d answers kept (%s)", req.v1.id, req.v2.id, fwd.n_valid, len(fwd),
                  fwd.failure_counts() or "no failures")
        yield req, fwd


def match_pair(engine: Engine, profile: Profile, v1: CorrView, v2: CorrView, *, points=None,
               grid: tuple[int, int] = DEFAULT_GRID, fb_check: bool = True, fb_thresh_px: float = 10.0) -> Matches:
    req = PairRequest(v1, v2, points)
    return next(match_pairs(engine, profile, [req], grid=grid, fb_check=fb_check, fb_thresh_px=fb_thresh_px))[1]


def _generate(engine: Engine, batch: EngineBatch) -> list[Completion]:
    if not batch.queries:
        return []
    return next(generate_stream(engine, [batch]))[1]


def dense_flow(m: Matches, *, method: str = "linear", rgb1: np.ndarray | None = None, **options) -> DenseField:
    """Dense flow image 1 -> image 2 (HxWx2 target positions in image 2's original pixels), by a registered
    flow densifier (densify.fields.FLOW_METHODS): "linear" needs only the size, "edge" image 1's pixels."""
    from densify.fields import FLOW_METHODS

    if method not in FLOW_METHODS:
        raise ValueError(f"unknown flow method {method!r}; use one of {', '.join(FLOW_METHODS)}")
    if rgb1 is None and method != "linear":
        raise ValueError(f"flow method {method!r} needs image 1's pixels (rgb1)")
    xy1, xy2 = m.pairs()
    w, h = m.size1
    return FLOW_METHODS[method](xy1, xy2, rgb1, shape=(h, w), **options)


# -- a classical baseline

def sift_matches(rgb1: np.ndarray, rgb2: np.ndarray, *, ratio: float = 0.8, max_features: int = 4000,
                 cross_check: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV SIFT + Lowe's ratio test -> (Nx2 pixels in image 1, Nx2 in image 2)."""
    sift = cv2.SIFT_create(nfeatures=max_features)
    g1 = cv2.cvtColor(rgb1, cv2.COLOR_RGB2GRAY)
    g2 = cv2.cvtColor(rgb2, cv2.COLOR_RGB2GRAY)
    k1, d1 = sift.detectAndCompute(g1, None)
    k2, d2 = sift.detectAndCompute(g2, None)
    if d1 is None or d2 is None or len(k1) < 2 or len(k2) < 2:
        return np.zeros((0, 2)), np.zeros((0, 2))
    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(d1, d2, k=2)
    good = [m for m, n in (p for p in knn if len(p) == 2) if m.distance < ratio * n.distance]
    if cross_check and good:
        back = {m.queryIdx: m.trainIdx for m in cv2.BFMatcher(cv2.NORM_L2).match(d2, d1)}
        good = [m for m in good if back.get(m.trainIdx) == m.queryIdx]
    p1 = np.array([k1[m.queryIdx].pt for m in good], float).reshape(-1, 2)
    p2 = np.array([k2[m.trainIdx].pt for m in good], float).reshape(-1, 2)
    # cv2 keypoints use densify's pixel grid (pixel (0, 0)'s centre at 0.0): no shift needed.
    return p1, p2
