"""A simulated point-query model: answers from ground truth through a seeded error model
(densify.sim.errors: presets `iid`, the default, and `structured`; engine option `error`).

A test and demo tool, never a default: it answers only where truth exists, looked up by image through a
`densify.sim.truth` provider (by default `FileTruth`: files beside the image and its manifest record). An image
without truth gets an error answer for every query, never an invented one.

It writes answers as text, the way the model would, so the profile's parser is always exercised, and it
reads the queried coordinates back out of the prompt text, so a wrong prompt gives wrong answers. A prefill
and stop strings act as on a real engine (the answer continues the prefill and ends before a stop string).
Each answer's randomness is seeded by (seed, images, text): answers do not depend on batching or order.

`answers_per_s` paces the engine like a GPU engine of that rate (benchmarks of the framework around it):
a virtual clock per engine advances by len(batch) / answers_per_s from when each batch could start (the
later of its arrival and the previous batch's due time), and `generate` sleeps until the batch is due.
Sleeping costs no CPU, the answers are computed inside the batch's time slot, per-batch overhead does
not accumulate, and idle time earns no credit: the rate is an upper bound. The answers are unchanged.
"""

from __future__ import annotations

import collections
import hashlib
import math
import re
import threading
import time

import cv2
import numpy as np

from densify.config.profiles import Profile, load_profile
from densify.engines.base import Completion, Engine, EngineBatch, PromptImage, Query, check_batch
from densify.geometry.rotations import euler_from_matrix, relative_from_T, rotation_angle_deg
from densify.io.cameras import PixelMap
from densify.sim.errors import ErrorModel, ErrorState, corr_answer, depth_answer
from densify.sim.objects import NO_TRUTH_ANSWER, ObjectErrorModel, answer_from_truth, regions_in_text
from densify.sim.options import SimulatedOptions
from densify.sim.truth import FileTruth, GroundTruth

COORD_RE = re.compile(r"\((\d+), (\d+)\)")


def _pixel_map(img: PromptImage) -> PixelMap:
    h, w = img.shape[:2]
    return PixelMap(tuple(img.ref.size), (w, h), None, tuple(img.ref.scale))


def corr_truth(orig_matches: np.ndarray, pmap1: PixelMap, pmap2: PixelMap) -> np.ndarray:
    """Original-resolution match map (HxWx2, image-2 original pixels, NaN = not visible) -> the same map
    in the preprocessed frames of both images: sampled (nearest) at each preprocessed pixel of image 1,
    target scaled into image 2's preprocessed frame."""
    w1, h1 = pmap1.pre_size
    xs, ys = pmap1.to_orig(np.arange(w1, dtype=np.float64), np.arange(h1, dtype=np.float64))
    mx, my = np.meshgrid(xs.astype(np.float32), ys.astype(np.float32))
    m = np.ascontiguousarray(orig_matches, dtype=np.float32)
    # Nearest: matches are not smooth across occlusion edges; NaN stays NaN.
    s = cv2.remap(m, mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=float("nan"))
    tx, ty = pmap2.to_pre(s[..., 0], s[..., 1])
    return np.stack([tx, ty], -1).astype(np.float32)


def _continued(text: str, s) -> str:
    """What an engine returns for this answer under the batch's prefill and stop strings: the prefill, then
    the rest of the answer (the model continues the prefill; an answer that would not have started with it
    is continued from there as written) up to the first stop string."""
    if not s.prefill and not s.stop:
        return text
    rest = text[len(s.prefill):] if s.prefill and text.startswith(s.prefill) else text
    cut = min((i for i in (rest.find(t) for t in s.stop if t) if i >= 0), default=-1)
    return (s.prefill or "") + (rest if cut < 0 else rest[:cut])


class NoTruth(LookupError):
    """The provider knows nothing needed to answer this query."""


class SimulatedEngine(Engine):
    """Options (densify.sim.options.SimulatedOptions, typed, or the same as keywords): seed, noise (False:
    exact answers), error (ErrorModel fields), answers_per_s (pacing, None: none); in Python also `truth`, a
    `densify.sim.truth.Truth` provider (default `FileTruth()`)."""

    name = SimulatedOptions.engine_name
    simulated = SimulatedOptions.simulated

    def __init__(self, profile: Profile | str, options: SimulatedOptions | None = None, *, truth=None, **kwargs):
        self.options = opts = SimulatedOptions.given(options, kwargs)
        self.answers_per_s = float(opts.answers_per_s) if opts.answers_per_s is not None else None
        self._due = 0.0  # virtual clock (time.monotonic): when the last paced batch is due
        self._pace_lock = threading.Lock()
        self.profile = load_profile(profile)
        self.error = ErrorModel.from_option(opts.error) if opts.noise else ErrorModel.exact()
        self.object_error = ObjectErrorModel(**(opts.object_error or {})) if opts.noise else ObjectErrorModel.exact()
        self.seed = int(opts.seed)
        self.truth = truth if truth is not None else FileTruth()
        self.stats = collections.Counter()
        if self.answers_per_s:
            self.stats["busy_s"] = 0.0  # seconds of booked work (the busy share of a paced engine)
        self._errors = ErrorState(self.error, self.seed)  # per-image/pair shared errors, built on first use
        self._bitgen = np.random.PCG64(0)
        self._gen = np.random.Generator(self._bitgen)
        self._pre: collections.OrderedDict = collections.OrderedDict()   # image key -> GroundTruth | None
        self._pairs: collections.OrderedDict = collections.OrderedDict()  # (key1, key2) -> (matches, T) in pre frames

    # -- the protocol
    def generate(self, batch: EngineBatch) -> list[Completion]:
        check_batch(batch)
        due = self._book(len(batch.queries)) if self.answers_per_s else None
        out = self._generate(batch)
        if due is not None:
            wait = due - time.monotonic()
            if wait > 0:
                self.stats["paced_s"] += wait
                time.sleep(wait)
        return out

    def _book(self, n: int) -> float:
        """Book n answers on the virtual clock; the time they are due."""
        with self._pace_lock:
            self._due = max(self._due, time.monotonic()) + n / self.answers_per_s
            self.stats["busy_s"] += n / self.answers_per_s  # the engine has work for this long (busy share)
            return self._due

    def _generate(self, batch: EngineBatch) -> list[Completion]:
        out = []
        for q in batch.queries:
            rng = self._rng(batch, q)
            try:
                text = self._answer(batch, q, rng)
            except NoTruth as exc:
                self.stats["no_truth"] += 1
                out.append(Completion("", error=str(exc)))
                continue
            lp = None
            if batch.sampling.logprobs and isinstance(text, tuple):
                text, rel_err = text
                lp = -self.error.logprob_scale * rel_err - abs(rng.normal(0, 0.05))
            elif isinstance(text, tuple):
                text = text[0]
            text = _continued(text, batch.sampling)
            out.append(Completion(text=text, logprob=lp, n_generated_tokens=max(1, len(text) // 3)))
        self.stats["queries"] += len(out)
        return out

    # -- truth, in each prompt image's own frame (cached: a batch shows the same image thousands of times)
    @staticmethod
    def _key(img: PromptImage):
        return (img.ref.id, img.ref.path, img.ref.scale, img.shape[:2]) if img.ref is not None else None

    def _image_truth(self, img: PromptImage) -> GroundTruth:
        key = self._key(img)
        if key is None:
            raise NoTruth(f"simulated engine: prompt image {img.uid[:12]} names no source image, so it has no "
                          f"ground truth to answer from")
        if key in self._pre:
            self._pre.move_to_end(key)
            gt = self._pre[key]
        else:
            gt = self._build_truth(img)
            self._pre[key] = gt
            while len(self._pre) > 16:
                self._pre.popitem(last=False)
        if gt is None:
            raise NoTruth(f"simulated engine: no ground truth for image {img.ref.id} ({img.ref.path}); it answers "
                          f"only where truth exists (a <stem>.depth.npy beside the image, depth labels in its "
                          f"DepthLM manifest, or a densify.sim.truth provider). Real images need a real engine: "
                          f"--engine vllm, hf or openai with --model")
        return gt

    def _build_truth(self, img: PromptImage) -> GroundTruth | None:
        ref, t = img.ref, self.truth
        h, w = img.shape[:2]
        sx, sy = ref.scale
        depth, labels, ids = t.depth(ref), t.labels(ref), t.object_ids(ref)
        if depth is None and labels is None and ids is None:
            return None
        gt = GroundTruth(objects=t.objects(ref), cam_to_world=t.cam_to_world(ref))
        if ids is not None:
            gt.object_ids = cv2.resize(np.asarray(ids, np.int32), (w, h), interpolation=cv2.INTER_NEAREST)
        if depth is not None:
            gt.depth = cv2.resize(np.asarray(depth, np.float32), (w, h), interpolation=cv2.INTER_NEAREST)
        if labels is not None:
            xy, d = labels
            gt.label_xy = np.asarray(xy, float) * np.array([sx, sy])
            gt.label_depth = np.asarray(d, float)
        return gt

    def _pair_truth(self, img1: PromptImage, img2: PromptImage):
        """(matches 1 -> 2 in the prompt images' frames or None, T_2_from_1 or None)."""
        k1, k2 = self._key(img1), self._key(img2)
        if k1 is None or k2 is None:
            raise NoTruth("simulated engine: a pair's prompt images name no source images, so there is no truth")
        key = (k1, k2)
        if key not in self._pairs:
            m = self.truth.matches(img1.ref, img2.ref)
            if m is not None:
                m = corr_truth(m, _pixel_map(img1), _pixel_map(img2))
            self._pairs[key] = (m, self.truth.relative_pose(img1.ref, img2.ref))
            while len(self._pairs) > 8:
                self._pairs.popitem(last=False)
        return self._pairs[key]

    # -- internals
    def _rng(self, batch: EngineBatch, q: Query) -> np.random.Generator:
        h = hashlib.blake2b(digest_size=8)
        h.update(str(self.seed).encode())
        for uid in q.image_uids:
            h.update(uid.encode())
        h.update(q.text.encode())
        # Re-seeding one bit generator is ~10x cheaper than a new default_rng per query.
        self._bitgen.state = {"bit_generator": "PCG64",
                              "state": {"state": int.from_bytes(h.digest(), "little"), "inc": 1},
                              "has_uint32": 0, "uinteger": 0}
        return self._gen

    def _pre_xy(self, q: Query, img: PromptImage) -> tuple[float, float] | None:
        m = COORD_RE.search(q.text)
        if m and self.profile.coord_range:
            h, w = img.shape[:2]
            r = self.profile.coord_range
            return int(m.group(1)) / r * w, int(m.group(2)) / r * h
        if img.ref is not None and img.ref.marker is not None:  # the marked pixel, from the image's provenance
            return float(img.ref.marker[0]), float(img.ref.marker[1])
        return None

    def _answer(self, batch: EngineBatch, q: Query, rng: np.random.Generator):
        kind = self.profile.questions[q.question].parser if q.question in self.profile.questions else "depth"
        img = batch.images[q.image_uids[0]]
        # Truth first: an image without truth gets an error, never even an "unparseable" answer.
        if len(q.image_uids) == 1:  # depth and object questions
            self._image_truth(img)
        else:
            img2 = batch.images[q.image_uids[1]]
            m, T = self._pair_truth(img, img2)
            if (m if kind == "xy" else T) is None:
                what = "correspondence" if kind == "xy" else "pose"
                raise NoTruth(f"simulated engine: no {what} truth for the pair {img.ref.id} -> {img2.ref.id} (it "
                              f"needs depth, intrinsics and cam_to_world of both images)")
        if self.error.unparseable_rate and rng.random() < self.error.unparseable_rate:
            return rng.choice(["<think> </think><answer>far away</answer>",
                               "I cannot determine that from the image.",
                               "<think> The point is on the wall"])
        if kind == "depth":
            return self._depth(q, img, rng)
        if kind == "xy":
            return self._corr(q, img, batch.images[q.image_uids[1]], rng)
        if kind in ("predicate", "choice", "metric", "clock"):  # object questions: regions read from the text
            r = self.profile.regions
            boxes, texts = regions_in_text(r.region_regex, q.text, r.coord_range, img.shape[1::-1])
            cat = self.profile.questions[q.question].category or q.question
            text = answer_from_truth(cat, boxes, texts, self._image_truth(img), rng, self.object_error)
            if text == NO_TRUTH_ANSWER:
                raise NoTruth(f"simulated engine: no object truth for the regions of {q.question!r} in image "
                              f"{img.ref.id}: each region must bound one object of the scene, and the scene "
                              f"files must be there (<stem>.objects.npy, objects.json, cam_to_world)")
            return text
        return self._pose(q, kind, img, batch.images[q.image_uids[1]], rng)

    def _depth(self, q: Query, img: PromptImage, rng):
        xy = self._pre_xy(q, img)
        gt = self._depth_at(self._image_truth(img), xy)
        if gt is None:
            raise NoTruth(f"simulated engine: no ground truth at the queried point {xy} of image {img.ref.id}")
        e = self.error
        if e.structured_depth:
            t = self._image_truth(img)
            state = self._errors.depth(img.source_uid, img.shape[:2], t.depth, t.object_ids)
            pred, own, _ = depth_answer(e, gt, rng, state, (int(xy[0]), int(xy[1])), t.depth)
            return f"<think> </think><answer>{pred:.{e.decimals}f}</answer>", own
        if e.outlier_rate and rng.random() < e.outlier_rate:
            pred = float(np.exp(rng.uniform(np.log(0.3), np.log(30.0))))
        else:
            pred = gt * math.exp(rng.normal(0.0, e.depth_sigma)) if e.depth_sigma else gt
        pred = max(pred, 0.01)
        return f"<think> </think><answer>{pred:.{e.decimals}f}</answer>", abs(math.log(pred / gt))

    @staticmethod
    def _depth_at(t: GroundTruth, xy) -> float | None:
        if xy is None:
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
        h2, w2 = img2.shape[:2]
        target = None
        m, _ = self._pair_truth(img1, img2)
        if xy is not None:
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

    def _pose(self, q: Query, kind: str, img1: PromptImage, img2: PromptImage, rng):
        _, T = self._pair_truth(img1, img2)
        R, C = relative_from_T(T)
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

