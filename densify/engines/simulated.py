"""A simulated point-query model: answers from ground truth through a seeded error model
(densify.engines.errors: presets `iid`, the default, and `structured`; engine option `error`).

It writes answers as text, the way the model would, so the profile's parser is always exercised, and it
reads the queried coordinates back out of the prompt text, so a wrong prompt gives wrong answers.
Each answer's randomness is seeded by (seed, images, text): answers do not depend on batching or order.
"""

from __future__ import annotations

import hashlib
import math
import re
import cv2
import numpy as np

from densify.cameras import PreparedImage
from densify.engines import register_engine
from densify.engines.base import Completion, EngineBatch, GroundTruth, PromptImage, Query, check_batch
from densify.engines.errors import ErrorModel, ErrorState, corr_answer, depth_answer
from densify.geometry.rotations import euler_from_matrix, relative_from_T, rotation_angle_deg
from densify.profiles import Profile, load_profile

COORD_RE = re.compile(r"\((\d+), (\d+)\)")


def depth_truth(prep: PreparedImage, depth: np.ndarray, object_ids: np.ndarray | None = None) -> GroundTruth:
    """Dense ground truth (and object ids) at the original resolution -> the prompt image's frame (nearest)."""
    w, h = prep.pixel_map.pre_size
    d = np.asarray(depth, np.float32)
    ids = None
    if object_ids is not None:  # int16 is not resizable by OpenCV; ids fit in int32
        ids = cv2.resize(np.asarray(object_ids, np.int32), (w, h), interpolation=cv2.INTER_NEAREST)
    return GroundTruth(depth=cv2.resize(d, (w, h), interpolation=cv2.INTER_NEAREST), object_ids=ids)


def label_truth(prep: PreparedImage, pixels: np.ndarray, depth: np.ndarray) -> GroundTruth:
    """Sparse labelled points (original pixels) -> the prompt image's frame."""
    xp, yp = prep.pixel_map.to_pre(np.asarray(pixels)[:, 0], np.asarray(pixels)[:, 1])
    return GroundTruth(label_xy=np.stack([xp, yp], 1), label_depth=np.asarray(depth, float))


class SimulatedEngine:
    name = "simulated"
    uses_truth = True

    def __init__(self, profile: Profile | str, *, seed: int = 0, error: ErrorModel | dict | str | None = None,
                 noise: bool = True):
        """error: a preset name ("iid" default, "structured", "exact"), a dict of ErrorModel parameters
        (optional "preset" key for the base), or an ErrorModel; noise=False means exact answers."""
        self.profile = load_profile(profile)
        self.error = ErrorModel.from_option(error) if noise else ErrorModel.exact()
        self.seed = int(seed)
        self._errors = ErrorState(self.error, self.seed)  # per-image/pair shared errors, built on first use
        self.queries_answered = 0
        self._bitgen = np.random.PCG64(0)
        self._gen = np.random.Generator(self._bitgen)

    def close(self) -> None:
        pass

    # -- the protocol
    def generate(self, batch: EngineBatch) -> list[Completion]:
        check_batch(batch)
        out = []
        for q in batch.queries:
            rng = self._rng(batch, q)
            text = self._answer(batch, q, rng)
            lp = None
            if batch.sampling.logprobs and isinstance(text, tuple):
                text, rel_err = text
                lp = -self.error.logprob_scale * rel_err - abs(rng.normal(0, 0.05))
            elif isinstance(text, tuple):
                text = text[0]
            out.append(Completion(text=text, logprob=lp, n_generated_tokens=max(1, len(text) // 3)))
        self.queries_answered += len(out)
        return out

    # -- internals
    def _rng(self, batch: EngineBatch, q: Query) -> np.random.Generator:
        h = hashlib.blake2b(digest_size=8)
        h.update(str(self.seed).encode())
        for uid in q.image_uids:
            h.update(uid.encode())
        h.update(q.text.encode())
        if q.hint:
            h.update(repr(sorted(q.hint.items())).encode())
        # Re-seeding one bit generator is ~10x cheaper than a new default_rng per query.
        self._bitgen.state = {"bit_generator": "PCG64",
                              "state": {"state": int.from_bytes(h.digest(), "little"), "inc": 1},
                              "has_uint32": 0, "uinteger": 0}
        return self._gen

    def _pre_xy(self, q: Query, img: PromptImage) -> tuple[float, float] | None:
        m = COORD_RE.search(q.text)
        if m and self.profile.coord_range:
            h, w = img.pixels.shape[:2]
            r = self.profile.coord_range
            return int(m.group(1)) / r * w, int(m.group(2)) / r * h
        if q.hint and "pre_xy" in q.hint:
            return tuple(q.hint["pre_xy"])
        return None

    def _answer(self, batch: EngineBatch, q: Query, rng: np.random.Generator):
        kind = self.profile.questions[q.question].parser if q.question in self.profile.questions else "depth"
        img = batch.images[q.image_uids[0]]
        if self.error.unparseable_rate and rng.random() < self.error.unparseable_rate:
            return rng.choice(["<think> </think><answer>far away</answer>",
                               "I cannot determine that from the image.",
                               "<think> The point is on the wall"])
        if kind == "depth":
            return self._depth(q, img, rng)
        if kind == "xy":
            return self._corr(q, img, batch.images[q.image_uids[1]], rng)
        return self._pose(q, kind, img, q.image_uids[1], rng)

    def _depth(self, q: Query, img: PromptImage, rng):
        xy = self._pre_xy(q, img)
        gt = self._depth_at(img, xy)
        if gt is None:
            gt = float(np.exp(rng.uniform(np.log(0.5), np.log(10.0))))  # the model still answers
        e = self.error
        if e.structured_depth:
            t = img.truth
            depth = t.depth if t is not None else None
            state = self._errors.depth(img.uid, img.pixels.shape[:2], depth,
                                       t.object_ids if t is not None else None)
            pred, own, _ = depth_answer(e, gt, rng, state, None if xy is None else (int(xy[0]), int(xy[1])), depth)
            return f"<think> </think><answer>{pred:.{e.decimals}f}</answer>", own
        if e.outlier_rate and rng.random() < e.outlier_rate:
            pred = float(np.exp(rng.uniform(np.log(0.3), np.log(30.0))))
        else:
            pred = gt * math.exp(rng.normal(0.0, e.depth_sigma)) if e.depth_sigma else gt
        pred = max(pred, 0.01)
        return f"<think> </think><answer>{pred:.{e.decimals}f}</answer>", abs(math.log(pred / gt))

    @staticmethod
    def _depth_at(img: PromptImage, xy) -> float | None:
        t = img.truth
        if t is None or xy is None:
            return None
        x, y = xy
        if t.label_xy is not None and len(t.label_xy):
            d2 = (t.label_xy[:, 0] - x) ** 2 + (t.label_xy[:, 1] - y) ** 2
            i = int(np.argmin(d2))
            if d2[i] <= 1.5 ** 2:
                return float(t.label_depth[i])
        if t.depth is not None:
            h, w = t.depth.shape
            xi, yi = min(int(x), w - 1), min(int(y), h - 1)
            v = float(t.depth[yi, xi])
            if np.isfinite(v) and v > 0:
                return v
        return None

    def _corr(self, q: Query, img1: PromptImage, img2: PromptImage, rng):
        r = self.profile.coord_range or 1000
        xy = self._pre_xy(q, img1)
        h2, w2 = img2.pixels.shape[:2]
        target = None
        if xy is not None and img1.truth is not None and img2.uid in img1.truth.matches_to:
            m = img1.truth.matches_to[img2.uid]
            h, w = m.shape[:2]
            p = m[min(int(xy[1]), h - 1), min(int(xy[0]), w - 1)]
            if np.all(np.isfinite(p)):
                target = (p[0] / w2 * r, p[1] / h2 * r)
        e = self.error
        err = 0.0
        if target is None or (e.outlier_rate and rng.random() < e.outlier_rate):
            u, v = rng.uniform(0, r, 2)
            err = 1.0
        elif e.structured_corr:
            pair = self._errors.pair(img1.uid, img2.uid, m)
            u, v, own = corr_answer(e, target, rng, r, (w2, h2), pair, (int(xy[0]), int(xy[1])), m)
            err = own / r * 10
        else:
            u = target[0] + (rng.normal(0, e.corr_sigma) if e.corr_sigma else 0.0)
            v = target[1] + (rng.normal(0, e.corr_sigma) if e.corr_sigma else 0.0)
            err = math.hypot(u - target[0], v - target[1]) / r * 10
        u, v = min(max(u, 0), r - 1), min(max(v, 0), r - 1)
        return f"({int(round(u))}, {int(round(v))})", err

    def _pose(self, q: Query, kind: str, img1: PromptImage, uid2: str, rng):
        t = img1.truth
        if t is None or uid2 not in t.pose_to:
            return "I cannot tell how the camera moved."
        R, C = relative_from_T(t.pose_to[uid2])
        e = self.error
        if kind == "angle":
            a = rotation_angle_deg(R) + rng.normal(0, e.rot_sigma_deg) if e.rot_sigma_deg else rotation_angle_deg(R)
            return f"Rotation angle: {abs(a):.1f} degrees"
        if kind == "euler":
            ypr = np.array(euler_from_matrix(R))
            if e.rot_sigma_deg:
                ypr = ypr + rng.normal(0, e.rot_sigma_deg, 3)
            return "Yaw={:+.1f}°, Pitch={:+.1f}°, Roll={:+.1f}°".format(*ypr)
        if kind == "vector3":
            d = C / max(np.linalg.norm(C), 1e-9)
            if e.trans_dir_sigma:
                d = d + rng.normal(0, e.trans_dir_sigma, 3)
                d /= np.linalg.norm(d)
            words = [w for w, c in (("right", d[0] > 0.3), ("left", d[0] < -0.3), ("down", d[1] > 0.3),
                                    ("up", d[1] < -0.3), ("forward", d[2] > 0.3), ("backward", d[2] < -0.3))
                     if c] or ["slightly"]
            return "The camera moves {}, unit vector ({:+.2f}, {:+.2f}, {:+.2f}).".format(", ".join(words), *d)
        if kind == "distance":
            dist = float(np.linalg.norm(C))
            if e.dist_sigma:
                dist *= math.exp(rng.normal(0, e.dist_sigma))
            return f"Translation distance: {dist:.2f} meters"
        raise ValueError(f"simulated engine cannot answer parser kind {kind!r}")


@register_engine("simulated")
def _make(profile: Profile | str, **options) -> SimulatedEngine:
    return SimulatedEngine(profile, **options)
