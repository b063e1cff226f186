"""Adaptive query placement: a coarse grid first, then rounds that spend the rest of the budget where the
field is uncertain.

Queries are the cost, and a uniform grid spends most of them on smooth surfaces that a few answers
already describe, while every depth edge is smeared across a whole grid spacing. The planner asks a coarse
grid, then, round by round, scores every pixel by how much one more answer there would tell:

* **discontinuity**: a Delaunay triangle of answers whose corners disagree beyond what each corner's local
  plane explains (the local planes of `densify.fields.edge_aware`, compared in units of the image's own
  answer noise), i.e. large depth ratios (or flow differences) between neighbouring answers;
* **doubtful answers**: low answer log-probability, or (flow) a large forward-backward error;
* **image edges**: the local planes are fitted image-guided (they do not reach across object outlines),
  so a triangle across an outline shows its jump clearly; optionally (`edge_weight`) pixels near strong
  image edges inside uncertain triangles score higher;
* **gaps**: the distance to the nearest answer (a new answer next to an old one says little).

It picks the best-scoring pixels, spread out (one per cell, then thinned), as ONE batch per round, so a
prefix-caching engine computes the image tokens once per round. It never asks more than `budget` queries
and never asks the same pixel twice.

**When to stop** (`StopRule`, `plan.count: auto`): more answers improve a map by averaging the errors that
differ from answer to answer; errors that nearby answers share (a per-image scale, an object's bias, an error
field at the token scale, answers bled across an edge) stay however many are asked. After each refinement
round the planner compares two spreads of the answers, both measured on the answers themselves:
  * their own spread `s`: how much neighbouring answers disagree about their local surface (half the robust
    spread of nearest-neighbour differences of the residuals around the local planes): the independent part;
  * the disagreement `d` of the newest rounds' answers (the last `pool` rounds) with what the map predicted
    at their pixels before they came (the local planes of the answers so far).
The part of `d` that `s` does not explain, e = sqrt(d^2 - s^2), is what the new answers and the map disagree
about beyond independent scatter. Rounds go on while the answers' own spread is at least that (`s >= ratio *
e`: independent noise dominates, more answers average it down) and stop when it is not ("shared": the new
answers mostly re-measure errors they share, or structure that one more round will not settle). They also
stop when `s` itself is below `tolerance` ("precise"): the answers already agree to within that, so what
error the map keeps is what they all share (a scale, an object's bias), which no number of answers shows or
removes. Only after `min_rounds` refinement rounds, within [floor, cap] queries ("cap"). The result says how
many queries were asked and why the planner stopped (`report()`).

`tolerance` is the one absolute number: 0.09 (9% spread of log depth between neighbouring answers) lies
between the two error presets of the simulator (independent noise 0.125: on to the cap; shared errors with
0.06 independent: stop), which are models, not measurements of VLM3 (README, Performance).

    planner = AdaptivePlanner((h, w), budget=1024, rgb=rgb)
    pts = planner.first_points()
    while pts is not None:
        answers = ask(pts)                      # one engine call
        ...accumulate pixels / values / logprobs...
        pts = planner.next_points(pixels, values, logprobs)

`AdaptiveDepthImage` is this loop for one image of the depth stage, a round at a time (prompts, parsing);
the depth stage's round scheduler (densify.stages.rounds) drives it through the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy.spatial import Delaunay, cKDTree

from densify.fields.edge_aware import guide_maps, guided_planes
from densify.fields.interpolate import reject_outliers
from densify.queries.plan import grid_points

__all__ = ["AdaptiveDepthImage", "AdaptivePlanner", "AdaptiveRun", "StopRule", "round_sizes"]


def round_sizes(budget: int, coarse: float, rounds: int, min_coarse: int = 16) -> list[int]:
    """Queries per engine call: a coarse grid (coarse x budget, at least min_coarse), then the rest split
    evenly over `rounds` refinements (no rounds: the whole budget as one grid)."""
    budget = int(budget)
    if rounds <= 0:
        return [budget]
    first = min(budget, max(16, int(min_coarse), int(round(coarse * budget))))
    rest = budget - first
    sizes = [first]
    for r in range(rounds):
        n = rest // (rounds - r)
        if n > 0:
            sizes.append(n)
        rest -= n
    return sizes


def grid_within(width: int, height: int, n: int) -> np.ndarray:
    """The largest regular grid (aspect kept) with at most n points."""
    count = max(1, int(n))
    while True:
        pts = grid_points(width, height, count=count)
        if len(pts) <= n or count == 1:
            return pts[: max(int(n), 0)]
        count -= max(1, (len(pts) - n) // 2)


@dataclass(frozen=True)
class StopRule:
    """`plan.count: auto`: ask a `floor`-query grid, then rounds of `round` queries until the answers stop
    paying (see the module docstring) or `cap` queries are asked."""

    floor: int = 768
    cap: int = 4096
    round: int = 384
    ratio: float = 1.0
    """go on while the answers' own spread >= ratio x the disagreement it does not explain"""
    tolerance: float = 0.09
    """go on while the answers' own spread (log depth) is at least this: below it they already agree to
    within what averaging more of them could still remove"""
    pool: int = 2
    """refinement rounds whose answers are pooled for the disagreement (one round's median is noisy)"""
    min_rounds: int = 2
    """refinement rounds always asked after the grid (at least `pool`)"""

    def __post_init__(self):
        if not 1 <= self.floor <= self.cap:
            raise ValueError(f"need 1 <= floor <= cap, got floor={self.floor}, cap={self.cap}")
        if self.round < 1 or self.ratio <= 0 or self.min_rounds < 0 or self.pool < 1 or self.tolerance < 0:
            raise ValueError(f"round >= 1, ratio > 0, pool >= 1, min_rounds >= 0; got {self.round}, {self.ratio}, "
                             f"{self.pool}, {self.min_rounds}")

    def sizes(self) -> list[int]:
        sizes, left = [self.floor], self.cap - self.floor
        while left > 0:
            sizes.append(min(self.round, left))
            left -= sizes[-1]
        return sizes


class AdaptivePlanner:
    """Chooses where to ask next from the answers so far (see module docstring).

    shape: (H, W) of the image (original pixels). budget: total queries for the image.
    coarse: share of the budget spent on the first uniform grid, and at least min_coarse queries (a grid
    must be dense enough to show the scene's layout and average the answer noise: below ~256 answers on a
    640x480 image a plain grid is better). rounds: refinement rounds after it.
    rgb: the image (optional): the local planes are fitted image-guided, as in `densify_depth_edge`, so a
    triangle across an object outline shows its jump. kind: "depth" or "flow".
    base: score of a pixel with no sign of trouble, relative to a clear discontinuity (keeps some
    density everywhere). edge_weight: how much image edges also attract samples inside uncertain
    triangles (off by default: on textured images surface patterns attract as much as outlines, and the
    benchmark is better without). z0, z1: a triangle's disagreement counts from z0 to z0 + z1 times the
    typical one. logprob_scale: log-probability below the image's median at which an answer is doubtful.
    stop: a `StopRule` (depth only): budget, coarse and rounds then come from it (budget = its cap).
    """

    def __init__(self, shape: tuple[int, int], budget: int, *, coarse: float = 0.5, rounds: int = 4,
                 rgb: np.ndarray | None = None, kind: str = "depth", base: float = 0.05,
                 edge_weight: float = 0.0, tau: float | None = None, logprob_scale: float = 2.0,
                 min_gap: float = 2.0, z0: float = 1.5, z1: float = 2.5, min_coarse: int = 256,
                 stop: StopRule | None = None):
        if kind not in ("depth", "flow"):
            raise ValueError(f"kind must be 'depth' or 'flow', got {kind!r}")
        if stop is not None:
            if kind != "depth":
                raise ValueError("the stopping rule is for depth planners")
            budget = stop.cap
        if budget < 1:
            raise ValueError(f"budget must be positive, got {budget}")
        if not 0 < coarse <= 1:
            raise ValueError(f"coarse must be in (0, 1], got {coarse}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.budget = int(budget)
        self.coarse = float(coarse)
        self.rounds = max(0, int(rounds))
        self.rgb = rgb
        self.kind = kind
        self.base = float(base)
        self.edge_weight = float(edge_weight)
        self.tau = tau if tau is not None else (0.3 if kind == "depth" else 6.0)
        self.logprob_scale = float(logprob_scale)
        self.min_gap = float(min_gap)
        self.z0, self.z1 = float(z0), float(z1)
        self.stop = stop
        if stop is not None:
            self.sizes = stop.sizes()
            self.rounds = len(self.sizes) - 1
        else:
            self.sizes = round_sizes(self.budget, self.coarse, self.rounds, min_coarse)
        self.round = 0
        self.last_uncertainty: np.ndarray | None = None
        self.stop_reason: str | None = None
        self.history: list[dict] = []
        """per refinement round: queries so far, own spread, disagreement, ratio (stopping rule)"""
        self._fit = None   # (xy, planes, own spread) of the last scoring: predicts the next round's answers
        self._seen = 0     # answers the planner has seen
        self._residuals: list[np.ndarray] = []  # |log answer - log predicted| of each refinement round

    # -- rounds
    def first_points(self) -> np.ndarray:
        """The coarse grid (Nx2 integer pixels, N <= budget)."""
        h, w = self.shape
        self.round = 1
        return grid_within(w, h, self.sizes[0])

    def next_points(self, pixels, values, logprobs=None, *, fb_error=None) -> np.ndarray | None:
        """Pixels for the next round, given every pixel asked so far and its answer (NaN = no answer), or
        None when the budget or the rounds are spent.

        values: N depths (depth) or Nx2 target pixels (flow). logprobs: N answer log-probabilities (NaN =
        unknown). fb_error: N forward-backward errors in pixels (flow; NaN = unknown).
        """
        pixels = np.asarray(pixels, float).reshape(-1, 2)
        asked = len(pixels)
        left = self.budget - asked
        fresh = slice(self._seen, asked)
        self._seen = asked
        if self.round >= len(self.sizes) or left <= 0:
            self.stop_reason = self.stop_reason or ("cap" if self.stop is not None else "budget")
            return None
        if self.stop is not None and self.round >= 2 and self._stop_now(pixels[fresh],
                                                                        np.asarray(values, float)[fresh]):
            return None
        n = min(left, self.sizes[self.round]) if self.round < len(self.sizes) - 1 else left
        self.round += 1
        if n <= 0:
            self.stop_reason = self.stop_reason or "budget"
            return None
        score = self.uncertainty(pixels, values, logprobs, fb_error=fb_error)
        pts = self._pick(score, n, pixels)
        if not len(pts):
            self.stop_reason = "nothing left to ask"
            return None
        return pts

    # -- stopping rule
    def _stop_now(self, new_xy: np.ndarray, new_vals: np.ndarray) -> bool:
        """Whether the newest round's answers say to stop (records the round in `history`)."""
        if self._fit is None:
            return False
        xy, planes, own = self._fit
        ok = np.isfinite(new_vals) & (new_vals > 0)
        if ok.sum() < 8 or not np.isfinite(own):
            return False
        q = new_xy[ok]
        k = min(4, len(xy))
        dist, idx = cKDTree(xy).query(q, k=k)
        dist, idx = dist.reshape(len(q), k), idx.reshape(len(q), k)
        pred = np.log(np.maximum(planes.predict(idx, q[:, :1], q[:, 1:])[..., 0], 1e-9))  # log inverse depth
        w = np.exp(-0.5 * (dist / planes.spacing[idx]) ** 2) + 1e-9
        r = np.log(new_vals[ok]) + (w * pred).sum(1) / w.sum(1)    # log answer - log predicted depth
        self._residuals.append(np.abs(r))
        d = 1.4826 * float(np.median(np.concatenate(self._residuals[-self.stop.pool:])))
        unexplained = math.sqrt(max(d * d - own * own, 0.0))
        # below 1e-6 (log depth) it is rounding, e.g. answers that agree exactly: nothing is unexplained
        ratio = own / unexplained if unexplained > 1e-6 else math.inf
        self.history.append({"queries": int(self._seen), "own_spread": round(own, 4), "disagreement": round(d, 4),
                             "ratio": round(min(ratio, 1e3), 3)})
        if len(self._residuals) < self.stop.pool or self.round - 1 < self.stop.min_rounds:
            return False
        if ratio < self.stop.ratio:
            self.stop_reason = "shared"
        elif own < self.stop.tolerance:
            self.stop_reason = "precise"
        return self.stop_reason is not None

    @staticmethod
    def _own_spread(xy: np.ndarray, vals: np.ndarray, planes) -> float:
        """Half the robust spread of nearest-neighbour differences of the residuals (log depth) around
        each answer's local plane: what averaging can remove (shared errors cancel in the difference)."""
        if len(xy) < 8:
            return float("nan")
        u = np.log(np.maximum(vals, 1e-9)) + np.log(np.maximum(planes.center[:, 0], 1e-9))
        _, j = cKDTree(xy).query(xy, k=2)
        return 1.4826 * float(np.median(np.abs(u - u[j[:, 1]]))) / math.sqrt(2.0)

    def report(self) -> dict:
        """How the plan went: mode, rounds asked, why it stopped, and (auto) the last round's spreads."""
        out = {"mode": "auto" if self.stop is not None else "adaptive", "rounds": int(self.round),
               "stop": self.stop_reason or "budget"}
        if self.history:
            out.update({k: v for k, v in self.history[-1].items() if k != "queries"})
        return out

    # -- scoring
    def uncertainty(self, pixels, values, logprobs=None, *, fb_error=None) -> np.ndarray:
        """HxW score of asking at each pixel (also kept as `last_uncertainty`)."""
        h, w = self.shape
        pixels = np.asarray(pixels, float).reshape(-1, 2)
        if self.kind == "depth":
            v = np.asarray(values, float).reshape(-1)
            ok = np.isfinite(v) & (v > 0)
        else:
            v = np.asarray(values, float).reshape(-1, 2)
            ok = np.all(np.isfinite(v), axis=1)
        xy = pixels[ok]
        gap = self._gap(xy)
        if ok.sum() < 4 or np.linalg.matrix_rank(np.c_[xy, np.ones(len(xy))]) < 3:
            self.last_uncertainty = gap
            return gap
        if self.kind == "depth":
            vals = 1.0 / v[ok]
            keep = reject_outliers(xy, v[ok]) if ok.sum() > 8 else np.ones(len(xy), bool)
        else:
            vals = v[ok] - xy
            keep = np.ones(len(xy), bool)
        doubt = np.zeros(len(xy))
        if logprobs is not None:
            lp = np.asarray(logprobs, float).reshape(-1)
            if len(lp) == len(pixels) and np.isfinite(lp[ok]).any():
                lpo = lp[ok]
                med = float(np.nanmedian(lpo))
                lpo = np.where(np.isfinite(lpo), lpo, med)
                # Doubt: how much less likely than the image's typical answer (0 at or above it).
                doubt = np.maximum(doubt, np.clip(1.0 - np.exp((lpo - med) / self.logprob_scale), 0, 1))
        if fb_error is not None:
            fb = np.asarray(fb_error, float).reshape(-1)
            if len(fb) == len(pixels):
                fbo = np.nan_to_num(fb[ok], nan=0.0)
                doubt = np.maximum(doubt, np.clip(fbo / (2 * self.tau), 0, 1))
        # Answers flagged as outliers are left out (one stray answer is not a reason to ask around it).
        xy, vals, doubt = xy[keep], vals[keep], doubt[keep]
        if len(xy) < 4 or np.linalg.matrix_rank(np.c_[xy, np.ones(len(xy))]) < 3:
            self.last_uncertainty = gap
            return gap
        planes = guided_planes(xy, vals, self.rgb, (h, w), kind=self.kind, tau=self.tau, iters=2)
        if self.stop is not None:
            self._fit = (xy, planes, self._own_spread(xy, 1.0 / vals, planes))
        tri = Delaunay(xy)
        simp = tri.simplices
        # Disagreement across each triangle edge: one corner's plane against the other corner's denoised
        # value (a discontinuity between them shows however the planes fall).
        cv = self._feat(planes.center)
        disc = np.zeros(len(simp))
        for a in range(3):
            for b in range(3):
                if a == b:
                    continue
                i, j = simp[:, a], simp[:, b]
                pred = planes.predict(i, xy[j, 0], xy[j, 1])
                disc = np.maximum(disc, self._dist(self._feat(pred), cv[j]))
        # In units of the typical disagreement (most triangles are smooth: that is the answer noise).
        sig = max(float(np.median(disc)), 1e-6)
        z = np.clip((disc / sig - self.z0) / self.z1, 0.0, 1.0)
        if doubt.any():
            z = np.maximum(z, doubt[simp].max(axis=1))
        tri_score = self._raster(xy, simp, z)
        score = self.base + tri_score
        if self.rgb is not None and self.edge_weight > 0:
            edges, _ = guide_maps(self.rgb, (h, w))
            near = cv2.GaussianBlur(edges, (0, 0), 2.0)
            near = near / max(float(near.max()), 1e-6)
            score = score * (1.0 + self.edge_weight * near * (tri_score > 0))
        score = (score * gap).astype(np.float32)
        self.last_uncertainty = score
        return score

    def _feat(self, vals):
        vals = np.asarray(vals, float)
        if self.kind == "depth":
            return np.log(np.maximum(vals.reshape(len(vals), -1)[:, :1], 1e-9))
        return vals.reshape(len(vals), -1)

    @staticmethod
    def _dist(a, b):
        return np.sqrt(((a - b) ** 2).sum(-1))

    def _gap(self, xy) -> np.ndarray:
        """HxW in [0, 1]: distance to the nearest answer relative to the current mean spacing."""
        h, w = self.shape
        mask = np.full((h, w), 255, np.uint8)
        if len(xy):
            xi = np.clip(np.rint(xy[:, 0]).astype(int), 0, w - 1)
            yi = np.clip(np.rint(xy[:, 1]).astype(int), 0, h - 1)
            mask[yi, xi] = 0
        d = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
        s = math.sqrt(h * w / max(len(xy), 1))
        g = np.clip(d / (0.5 * s), 0, 1)
        g[d < self.min_gap] = 0.0
        return g.astype(np.float32)

    def _raster(self, xy, simp, z) -> np.ndarray:
        h, w = self.shape
        out = np.zeros((h, w), np.float32)
        shift = 4
        verts = np.round(xy * (1 << shift)).astype(np.int32)
        for k in np.flatnonzero(z > 0):
            cv2.fillConvexPoly(out, verts[simp[k]], float(z[k]), cv2.LINE_8, shift)
        return out

    def _pick(self, score: np.ndarray, n: int, asked: np.ndarray) -> np.ndarray:
        """The n best pixels, at most one per cell, thinned so that no two are closer than half a cell."""
        h, w = self.shape
        s = score.copy()
        if len(asked):
            xi = np.clip(np.rint(asked[:, 0]).astype(int), 0, w - 1)
            yi = np.clip(np.rint(asked[:, 1]).astype(int), 0, h - 1)
            s[yi, xi] = 0.0
        pos = float((s > 0.2 * max(float(s.max()), 1e-9)).sum())
        cell = int(np.clip(math.sqrt(max(pos, 1.0) / (1.5 * n)), 2, 64))
        H, W = (h + cell - 1) // cell * cell, (w + cell - 1) // cell * cell
        pad = np.zeros((H, W), np.float32)
        pad[:h, :w] = s
        blocks = pad.reshape(H // cell, cell, W // cell, cell).transpose(0, 2, 1, 3).reshape(-1, cell * cell)
        arg = blocks.argmax(axis=1)
        val = blocks[np.arange(len(blocks)), arg]
        bi, bj = np.divmod(np.arange(len(blocks)), W // cell)
        ys = bi * cell + arg // cell
        xs = bj * cell + arg % cell
        good = (val > 0) & (ys < h) & (xs < w)
        order = np.argsort(-val[good], kind="stable")
        cand = np.stack([xs[good], ys[good]], 1)[order]
        cval = val[good][order]
        if len(cand) > 1:
            # Thin pairs closer than half a cell: the lower-scoring one goes.
            pairs = cKDTree(cand).query_pairs(max(cell / 2, self.min_gap), output_type="ndarray")
            if len(pairs):
                drop = np.zeros(len(cand), bool)
                drop[np.maximum(pairs[:, 0], pairs[:, 1])] = True  # sorted by score: larger index is worse
                cand, cval = cand[~drop], cval[~drop]
        return cand[:n].astype(np.int64)


# ---------------------------------------------------------------------------------------------- running

@dataclass
class AdaptiveRun:
    """Everything asked about one image, in the order asked."""

    pixels: np.ndarray
    prompt_xy: np.ndarray | None
    completions: list = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    """Queries per engine call (one call per round)."""
    unmarkable: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    """Pixels planned but not asked: too close to a border for the profile's marker."""


class AdaptiveDepthImage:
    """One image's adaptive depth run, a round at a time: `next_batch()` gives the round's single batch
    (or None when done), `receive(completions)` takes its answers. Callers can keep many images in
    flight, one batch each per round (densify.stages.rounds).

    first_batch / first_plan: an already built first-round batch and its query plan (the depth stage's
    `prepare` builds it with this planner's `first_points`); otherwise the planner's coarse grid is asked
    first.
    """

    def __init__(self, planner: AdaptivePlanner, prep, profile, *, uid: str, ref=None, sampling=None,
                 tag=None, first_batch=None, first_plan=None):
        self.planner, self.prep, self.profile = planner, prep, profile
        self.uid, self.ref, self.sampling, self.tag = uid, ref, sampling, tag
        self.run = AdaptiveRun(np.zeros((0, 2), np.int64), None)
        self.seen: set = set()
        self._plan = None
        self._prebuilt = first_batch if first_plan is not None else None
        if first_plan is not None:
            self._points = np.asarray(first_plan.pixels).reshape(-1, 2)[: planner.budget]
            self._first_plan = first_plan
            planner.round = max(planner.round, 1)  # the first round is this plan (as first_points() would give)
        else:
            self._points = planner.first_points()
            self._first_plan = None
        self.done = self._points is None or len(self._points) == 0

    def next_batch(self):
        """The next round's batch, or None (and `done`) when the planner has nothing more to ask."""
        from densify.queries.plan import plan_queries
        from densify.queries.prompts import depth_batch

        while not self.done:
            if self._prebuilt is not None:
                batch, plan = self._prebuilt, self._first_plan
                self._prebuilt = None
                if len(plan.unmarkable):
                    self.run.unmarkable = np.concatenate([self.run.unmarkable, plan.unmarkable])
            else:
                plan = plan_queries(self._points, self.prep.pixel_map, marker=self.profile.marker)
                keys = _keys(plan)
                fresh = np.array([k not in self.seen for k in keys], bool)
                if not fresh.all():
                    plan.pixels = plan.pixels[fresh]
                    if plan.prompt_xy is not None:
                        plan.prompt_xy = plan.prompt_xy[fresh]
                    if plan.marked is not None:
                        plan.marked = plan.marked[fresh]
                if len(plan.unmarkable):
                    self.run.unmarkable = np.concatenate([self.run.unmarkable, plan.unmarkable])
                if len(plan) == 0:
                    self.done = True
                    return None
                batch = depth_batch(self.prep, plan, self.profile, uid=self.uid, ref=self.ref,
                                    sampling=self.sampling, tag=self.tag)
            self.seen.update(_keys(plan))
            self._plan = plan
            return batch
        return None

    def receive(self, completions) -> None:
        from densify.queries import answers as answers_mod
        plan, run = self._plan, self.run
        run.pixels = np.concatenate([run.pixels, np.asarray(plan.pixels).reshape(-1, 2)])
        if plan.prompt_xy is not None:
            run.prompt_xy = plan.prompt_xy if run.prompt_xy is None else np.concatenate([run.prompt_xy,
                                                                                          plan.prompt_xy])
        run.completions.extend(completions)
        run.calls.append(len(completions))
        ans = answers_mod.collect_depth(self.profile, run.pixels, run.prompt_xy, run.completions,
                                        unmarkable=run.unmarkable)
        self._points = self.planner.next_points(ans.pixels, ans.values, ans.logprobs)
        self.done = self._points is None or len(self._points) == 0


def _keys(plan) -> list[tuple[int, int]]:
    """What makes two queries the same prompt: prompt coordinates, the marked pixel, else the (rounded) pixel."""
    src = plan.prompt_xy if plan.prompt_xy is not None else plan.marked if plan.marked is not None \
        else np.rint(plan.pixels)
    return [tuple(map(int, p)) for p in src]
