"""Prompts: a query plan and prepared images -> engine batches, byte-exact to the profile."""

from __future__ import annotations

import math

import cv2
import numpy as np

from densify.config.profiles import Marker, Profile
from densify.engines.base import EngineBatch, ImageRef, PromptImage, Query, Sampling
from densify.io.cameras import PreparedImage
from densify.queries.plan import QueryPlan


def render_text(profile: Profile, question: str | None = None, **coords: int) -> str:
    q = profile.questions[question or profile.default_question]
    return q.template.format(**coords) + profile.suffix


def sampling_for(profile: Profile, question: str | None = None, *, logprobs: bool = False,
                 structured: bool = False, prefill: str | None = None) -> Sampling:
    q = profile.questions[question or profile.default_question]
    return Sampling(max_tokens=q.max_tokens, system_prompt=profile.system_prompt,
                    prefill=prefill if prefill is not None else profile.prefill,
                    structured_regex=q.structured_regex if structured else None, logprobs=logprobs)


def draw_marker(pixels: np.ndarray, x: float, y: float, marker: Marker) -> np.ndarray:
    """Draw the profile's arrow with its tip at preprocessed pixel (x, y)."""
    out = np.ascontiguousarray(pixels.copy())
    a = math.radians(marker.angle_deg)
    tail = (x + marker.length * math.cos(a), y - marker.length * math.sin(a))
    shift = 4  # sub-pixel precision for the tip
    s = 1 << shift
    cv2.arrowedLine(out, (int(round(tail[0] * s)), int(round(tail[1] * s))), (int(round(x * s)), int(round(y * s))),
                    tuple(int(c) for c in marker.color), marker.thickness, cv2.LINE_AA, shift, marker.tip_length)
    return out


def image_uid(prep: PreparedImage, source_id: str) -> str:
    """A stable id for a prompt image: the source's id plus its preprocessed content."""
    return PromptImage.content_uid(prep.pixels, salt=source_id)


def image_ref(image_id: str, prep: PreparedImage, path: str | None = None, manifest: str | None = None) -> ImageRef:
    """Where a prompt image came from (id, file, manifest, exact resize): no truth, only provenance."""
    pm = prep.pixel_map
    return ImageRef(image_id, str(path or ""), str(manifest) if manifest else None, tuple(pm.orig_size),
                    (float(pm.sx), float(pm.sy)))


def depth_batch(prep: PreparedImage, plan: QueryPlan, profile: Profile, *, uid: str,
                ref: ImageRef | None = None, sampling: Sampling | None = None, tag=None) -> EngineBatch:
    """One batch per image; with a marker profile each query carries its own marked image."""
    sampling = sampling or sampling_for(profile)
    qname = profile.default_question
    if profile.marker is None:
        images = {uid: PromptImage(uid, prep.pixels, ref)}
        template, suffix, uids = profile.questions[qname].template, profile.suffix, (uid,)
        queries = [Query(template.format(x=u, y=v) + suffix, uids, qname) for u, v in plan.prompt_xy.tolist()]
        return EngineBatch(images, queries, sampling, tag)
    images, queries = {}, []
    text = render_text(profile, qname)
    xp, yp = prep.pixel_map.to_pre(plan.pixels[:, 0], plan.pixels[:, 1])
    for i, (x, y) in enumerate(zip(np.atleast_1d(xp), np.atleast_1d(yp))):
        quid = f"{uid}:m{i}"
        images[quid] = PromptImage(quid, draw_marker(prep.pixels, float(x), float(y), profile.marker), ref)
        queries.append(Query(text, (quid,), qname, hint={"pre_xy": (float(x), float(y))}))
    return EngineBatch(images, queries, sampling, tag)


def pair_images(prep1: PreparedImage, prep2: PreparedImage, uid1: str, uid2: str,
                ref1: ImageRef | None = None, ref2: ImageRef | None = None) -> dict[str, PromptImage]:
    return {uid1: PromptImage(uid1, prep1.pixels, ref1), uid2: PromptImage(uid2, prep2.pixels, ref2)}


def corr_batch(prep1: PreparedImage, prep2: PreparedImage, plan: QueryPlan, profile: Profile, *,
               uid1: str, uid2: str, ref1: ImageRef | None = None, ref2: ImageRef | None = None,
               sampling: Sampling | None = None, tag=None) -> EngineBatch:
    """Correspondence questions about pixels of image 1 (two images per prompt, image 1 first)."""
    qname = profile.default_question
    queries = [Query(render_text(profile, qname, x1=int(u), y1=int(v)), (uid1, uid2), qname)
               for u, v in plan.prompt_xy]
    return EngineBatch(pair_images(prep1, prep2, uid1, uid2, ref1, ref2), queries,
                       sampling or sampling_for(profile), tag)


def pose_batch(prep1: PreparedImage, prep2: PreparedImage, profile: Profile, *, uid1: str, uid2: str,
               questions: list[str] | None = None, ref1: ImageRef | None = None, ref2: ImageRef | None = None,
               tag=None) -> EngineBatch:
    """The pose profile's questions about one image pair (one query each)."""
    names = questions or list(profile.questions)
    queries = [Query(render_text(profile, n), (uid1, uid2), n) for n in names]
    mt = max(profile.questions[n].max_tokens for n in names)
    s = Sampling(max_tokens=mt, system_prompt=profile.system_prompt, prefill=profile.prefill)
    return EngineBatch(pair_images(prep1, prep2, uid1, uid2, ref1, ref2), queries, s, tag)


def object_batch(prep: PreparedImage, prompts: list, profile: Profile, *, uid: str,
                 ref: ImageRef | None = None, tag=None) -> EngineBatch:
    """Every object question about one image in one batch (the image prefix is shared). `prompts` are
    densify.objects.questions.ObjectPrompt, their text already exact."""
    mt = max([profile.questions[p.question].max_tokens for p in prompts] or [256])
    s = Sampling(max_tokens=mt, system_prompt=profile.system_prompt, prefill=profile.prefill)
    queries = [Query(p.text, (uid,), p.question) for p in prompts]
    return EngineBatch({uid: PromptImage(uid, prep.pixels, ref)}, queries, s, tag)
