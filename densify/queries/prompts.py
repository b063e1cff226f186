"""Prompts: a query plan and prepared images -> engine batches, byte-exact to the profile."""

from __future__ import annotations

import dataclasses

import numpy as np

from densify.config.profiles import Marker, Profile
from densify.engines.base import EngineBatch, ImageRef, PromptImage, Query, Sampling
from densify.io.cameras import PreparedImage
from densify.queries.plan import QueryPlan, markable


def render_text(profile: Profile, question: str | None = None, **coords: int) -> str:
    q = profile.questions[question or profile.default_question]
    return q.template.format(**coords) + profile.suffix


def sampling_for(profile: Profile, question: str | None = None, *, logprobs: bool = False,
                 structured: bool = False, prefill: str | None = None) -> Sampling:
    q = profile.questions[question or profile.default_question]
    return Sampling(max_tokens=q.max_tokens, system_prompt=profile.system_prompt,
                    prefill=prefill if prefill is not None else profile.prefill,
                    structured_regex=q.structured_regex if structured else None, logprobs=logprobs)


def marker_pixels(size: tuple[int, int], x: int, y: int, marker: Marker) -> np.ndarray:
    """The (x, y) pixels the profile's marker paints to point at integer pixel (x, y) of an image of `size`
    (W, H). A pixel too close to a border is refused, never marked with a clipped marker."""
    w, h = size
    if not markable(np.array([[x, y]]), (w, h), marker)[0]:
        raise ValueError(f"pixel ({x}, {y}) of a {w}x{h} image cannot be marked: the marker needs "
                         f"{marker.margin} <= x < {w - marker.margin} and {marker.margin} <= y < {h - marker.margin}")
    return np.asarray(marker.pixels, np.int64) + np.array([x, y], np.int64)


def marked_image(uid: str, pixels: np.ndarray, x: int, y: int, marker: Marker,
                 ref: ImageRef | None = None) -> PromptImage:
    """The preprocessed image with the marker pointing at (x, y): each marker pixel set to its colour,
    nothing else touched (no blending, no anti-aliasing); painted when the engine reads it."""
    xy = marker_pixels((pixels.shape[1], pixels.shape[0]), x, y, marker)
    return PromptImage(uid, pixels, ref, marks=xy, mark_color=tuple(marker.color))


def draw_marker(pixels: np.ndarray, x: int, y: int, marker: Marker) -> np.ndarray:
    """A marked copy of the preprocessed image (`marked_image`'s pixels)."""
    return marked_image("", pixels, x, y, marker).pixels


def marked_uid(uid: str, x: int, y: int) -> str:
    """The id of an image marked at pixel (x, y): named by the pixel, so the prompt image says which
    point it asks about (the answer store keys on it; no per-query hint is needed)."""
    return f"{uid}:m{int(x)},{int(y)}"


def marked_images(prep: PreparedImage, plan: QueryPlan, profile: Profile, *, uid: str,
                  ref: ImageRef | None = None) -> list[PromptImage]:
    """One image per planned query, marked as the engine is sent it (`depth_batch` and `densify prompts
    --save-images` both draw through here). Each image's provenance names its marked pixel."""
    out = []
    for x, y in plan.marked.tolist():
        r = dataclasses.replace(ref, marker=(x, y)) if ref is not None else None
        out.append(marked_image(marked_uid(uid, x, y), prep.pixels, x, y, profile.marker, r))
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
    if plan.marked is None:
        raise ValueError(f"profile {profile.name} marks its queries: plan them with "
                         f"plan_queries(..., marker=profile.marker)")
    text = render_text(profile, qname)
    marked = marked_images(prep, plan, profile, uid=uid, ref=ref)
    queries = [Query(text, (im.uid,), qname) for im in marked]  # one per planned pixel, in order
    return EngineBatch({im.uid: im for im in marked}, queries, sampling, tag)


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
