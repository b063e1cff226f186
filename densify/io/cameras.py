"""Cameras: intrinsics from sidecars or JSONL, and the exact pixel mappings a model profile needs.

Coordinate conventions (from the published formats): a pixel position is a float (x, y) in the
image's own pixel grid; resizing is a pure scale, x' = x * W' / W (no half-pixel shift), which is what
the VLM3 release does (600x400 -> 1024x683 maps x=264 to 450.56).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from densify.io.images import load_image

if TYPE_CHECKING:
    from densify.config.profiles import Profile

log = logging.getLogger(__name__)

DEFAULT_HFOV_DEG = 60.0


class CameraError(ValueError):
    """Bad or missing intrinsics; the message names the file and the fix."""


@dataclass(frozen=True)
class Camera:
    """Pinhole intrinsics of one image, in that image's pixels."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    source: str = "given"
    """Where the intrinsics came from: 'given', 'sidecar', 'jsonl' or 'default-fov'."""

    def __post_init__(self) -> None:
        vals = (self.fx, self.fy, self.cx, self.cy)
        if not all(math.isfinite(v) for v in vals):
            raise CameraError(f"intrinsics must be finite numbers, got fx,fy,cx,cy={vals}")
        if self.fx <= 0 or self.fy <= 0:
            raise CameraError(f"focal lengths must be positive, got fx={self.fx}, fy={self.fy}")
        if self.width <= 0 or self.height <= 0:
            raise CameraError(f"image size must be positive, got {self.width}x{self.height}")

    @property
    def K(self) -> np.ndarray:
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1]], dtype=np.float64)

    def scaled(self, width: int, height: int) -> "Camera":
        """The same camera after resizing the image to width x height (pure scale)."""
        sx, sy = width / self.width, height / self.height
        return Camera(self.fx * sx, self.fy * sy, self.cx * sx, self.cy * sy, width, height, self.source)

    def to_dict(self) -> dict:
        return {"fx": self.fx, "fy": self.fy, "cx": self.cx, "cy": self.cy,
                "width": self.width, "height": self.height, "source": self.source}

    @classmethod
    def from_list(cls, values, width: int | None = None, height: int | None = None,
                  source: str = "given") -> "Camera":
        """From [fx, fy, cx, cy] or the DepthLM/iBims form [fx, fy, cx, cy, W, H]."""
        try:
            vals = [float(v) for v in values]
        except (TypeError, ValueError) as exc:
            raise CameraError(f"intrinsics must be numbers [fx, fy, cx, cy(, W, H)], got {values!r}") from exc
        if len(vals) == 6:
            w, h = int(round(vals[4])), int(round(vals[5]))
        elif len(vals) == 4 and width and height:
            w, h = width, height
        else:
            raise CameraError(f"intrinsics need [fx, fy, cx, cy] plus the image size, or "
                              f"[fx, fy, cx, cy, W, H]; got {values!r}")
        cam = cls(vals[0], vals[1], vals[2], vals[3], w, h, source)
        if width and height and (w, h) != (width, height):
            # Intrinsics given for another resolution of the same image: rescale.
            cam = cam.scaled(width, height)
        return cam

    @classmethod
    def default(cls, width: int, height: int, hfov_deg: float = DEFAULT_HFOV_DEG) -> "Camera":
        f = 0.5 * width / math.tan(math.radians(hfov_deg) / 2)
        return cls(f, f, width / 2, height / 2, width, height, "default-fov")


def parse_intrinsics_arg(text: str) -> list[float]:
    """'fx,fy,cx,cy' from the command line."""
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as exc:
        raise CameraError(f"--intrinsics must be 'fx,fy,cx,cy' numbers, got {text!r}") from exc
    if len(vals) not in (4, 6):
        raise CameraError(f"--intrinsics must be 'fx,fy,cx,cy' (4 numbers), got {text!r}")
    if not all(math.isfinite(v) for v in vals):
        raise CameraError(f"--intrinsics {text}: every value must be a finite number")
    if vals[0] <= 0 or vals[1] <= 0:
        raise CameraError(f"--intrinsics {text}: the focal lengths fx, fy must be positive pixels")
    if vals[2] < 0 or vals[3] < 0:
        raise CameraError(f"--intrinsics {text}: the principal point cx, cy must be pixel positions (>= 0), "
                          f"about half the image size")
    if len(vals) == 6 and (vals[4] <= 0 or vals[5] <= 0):
        raise CameraError(f"--intrinsics {text}: the image size W, H must be positive")
    return vals


def read_sidecar(path: Path, width: int, height: int) -> Camera:
    """A JSON sidecar: {"fx":..,"fy":..,"cx":..,"cy":..} or {"intrinsics": [...]} or {"K": 3x3}."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CameraError(f"{path}: cannot read intrinsics JSON ({exc}); fix or delete the file") from exc
    try:
        if "intrinsics" in data:
            return Camera.from_list(data["intrinsics"], width, height, source="sidecar")
        if "K" in data:
            K = np.asarray(data["K"], dtype=float).reshape(3, 3)
            vals = [K[0, 0], K[1, 1], K[0, 2], K[1, 2]]
        else:
            vals = [data["fx"], data["fy"], data["cx"], data["cy"]]
        w = int(data.get("width", width))
        h = int(data.get("height", height))
        return Camera.from_list(vals + [w, h], width, height, source="sidecar")
    except CameraError as exc:
        raise CameraError(f"{path}: {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise CameraError(f"{path}: intrinsics JSON needs fx, fy, cx, cy (or 'intrinsics' or 'K'); "
                          f"problem: {exc!r}") from exc


def sidecar_path(image_path: Path) -> Path | None:
    """`img.json` or `img.png.json` beside the image, if present."""
    for cand in (image_path.with_suffix(".json"), image_path.with_name(image_path.name + ".json")):
        if cand.is_file():
            return cand
    return None


MAX_ASPECT = 1.25
"""fx / fy beyond this (or below its inverse) is reported: real cameras have nearly square pixels."""
_warned: set = set()


def implausible(cam: Camera) -> list[str]:
    """What cannot be right about intrinsics that are otherwise valid: a principal point outside the image
    (e.g. fx,fy,cx,cy given in another order), or fx / fy far from 1."""
    out = []
    if not (0 <= cam.cx <= cam.width and 0 <= cam.cy <= cam.height):
        out.append(f"the principal point ({cam.cx:g}, {cam.cy:g}) is outside the {cam.width}x{cam.height} image "
                   f"(it is usually near the centre, ({cam.width / 2:g}, {cam.height / 2:g}))")
    ratio = cam.fx / cam.fy
    if not 1 / MAX_ASPECT <= ratio <= MAX_ASPECT:
        out.append(f"fx / fy is {ratio:.2f} (fx {cam.fx:g}, fy {cam.fy:g}); real cameras have nearly square pixels")
    return out


def warn_implausible(cam: Camera, where: str) -> None:
    """Log what `implausible` finds, once per distinct camera (a job of many images warns once)."""
    key = (cam.fx, cam.fy, cam.cx, cam.cy, cam.width, cam.height)
    if key in _warned:
        return
    problems = implausible(cam)
    if problems:
        if len(_warned) < 10_000:
            _warned.add(key)
        log.warning("%s: intrinsics fx,fy,cx,cy = %g,%g,%g,%g look wrong: %s; the order is fx,fy,cx,cy in pixels",
                    where, cam.fx, cam.fy, cam.cx, cam.cy, "; ".join(problems))


def resolve_camera(image_path: Path | None, width: int, height: int, given=None,
                   default_hfov_deg: float = DEFAULT_HFOV_DEG) -> Camera:
    """Explicit values, else a sidecar, else a default field of view (with a warning). Intrinsics that
    cannot be right (see `implausible`) are used as given, with a warning."""
    if given is not None:
        cam = given if isinstance(given, Camera) else Camera.from_list(given, width, height)
        warn_implausible(cam, str(image_path or "image"))
        return cam
    if image_path is not None:
        side = sidecar_path(Path(image_path))
        if side is not None:
            cam = read_sidecar(side, width, height)
            warn_implausible(cam, str(side))
            return cam
    log.warning("%s: no intrinsics given; assuming a %.0f degree horizontal field of view. Metric depth "
                "will be off by the focal error: pass --intrinsics or add a JSON sidecar.",
                image_path or "image", default_hfov_deg)
    return Camera.default(width, height, default_hfov_deg)


@dataclass
class DecodedImage:
    """An image file decoded with its camera, both at the decoded size."""

    rgb: np.ndarray
    """HxWx3 uint8 RGB, upright, reduced when decoding asked for it (max_side)."""
    camera: Camera
    """Intrinsics of `rgb` (scaled from the file's own when decoded reduced)."""
    size: tuple[int, int]
    """(width, height) of the image file as displayed."""
    scale: float
    """Decoded width / the file's width (1.0 at full size); points in file pixels scale by it."""


def decode(path: str | Path, intrinsics=None, *, max_side: int | None = None,
           default_hfov_deg: float = DEFAULT_HFOV_DEG) -> DecodedImage:
    """The one way an image file becomes pixels and a camera: decode (reduced beyond max_side), take the
    intrinsics (given, else a sidecar, else a default field of view) for the file's size, and scale them to
    the decoded size."""
    img = load_image(path, max_side=max_side)
    (W, H), (h, w) = img.size, img.rgb.shape[:2]
    camera = resolve_camera(Path(path), W, H, intrinsics, default_hfov_deg)
    if (w, h) != (W, H):
        camera = camera.scaled(w, h)
    return DecodedImage(img.rgb, camera, img.size, img.scale)


@dataclass(frozen=True)
class PixelMap:
    """Exact two-way mapping: original pixel <-> preprocessed pixel <-> prompt coordinates.

    The releases scale coordinates by the exact resize factor (e.g. 1024 / 600 on both axes), then
    normalise by the *rounded* resized size: (264, 24) in 600x400 -> (450.56, 40.96) in 1024x683 ->
    (440.0, 59.971) -> prompt (440, 60). `range_` is the prompt's normalised range (2000 for VLM3-depth,
    1000 for VLM3-corr); prompt coordinates are Python-rounded (half to even, as the release's `round`).

    With `origin` set (DepthLM's rule) a pixel maps through the intrinsics instead,
    x' = (x - cx) * (fx' / fx) + cx' with gain = fx' / fx, origin = (cx, cy), pre_origin = (cx', cy'), in
    that order of float operations; `rounding="truncate"` makes the marked pixel int(x'), as the release.
    """

    orig_size: tuple[int, int]
    pre_size: tuple[int, int]
    range_: int | None = None
    scale: tuple[float, float] | None = None
    """Exact (sx, sy) resize factors; default: the ratio of the sizes."""
    origin: tuple[float, float] | None = None
    """(cx, cy) of the original intrinsics, when pixels map through the intrinsics."""
    pre_origin: tuple[float, float] | None = None
    """(cx', cy') of the preprocessed intrinsics (with `origin`)."""
    gain: tuple[float, float] | None = None
    """(fx' / fx, fy' / fy) (with `origin`)."""
    rounding: str = "none"
    """How `to_pixel` makes an integer pixel: "none" (round half to even) or "truncate" (int())."""

    @property
    def sx(self) -> float:
        return self.scale[0] if self.scale else self.pre_size[0] / self.orig_size[0]

    @property
    def sy(self) -> float:
        return self.scale[1] if self.scale else self.pre_size[1] / self.orig_size[1]

    def to_pre(self, x, y):
        if self.origin is not None:
            return ((np.asarray(x, float) - self.origin[0]) * self.gain[0] + self.pre_origin[0],
                    (np.asarray(y, float) - self.origin[1]) * self.gain[1] + self.pre_origin[1])
        return np.asarray(x, float) * self.sx, np.asarray(y, float) * self.sy

    def to_orig(self, xp, yp):
        if self.origin is not None:
            return ((np.asarray(xp, float) - self.pre_origin[0]) / self.gain[0] + self.origin[0],
                    (np.asarray(yp, float) - self.pre_origin[1]) / self.gain[1] + self.origin[1])
        return np.asarray(xp, float) / self.sx, np.asarray(yp, float) / self.sy

    def to_pixel(self, xy: np.ndarray) -> np.ndarray:
        """Original pixels (Nx2) -> integer preprocessed pixels (Nx2 int64), e.g. where a marker goes."""
        xy = np.asarray(xy, float).reshape(-1, 2)
        xp, yp = self.to_pre(xy[:, 0], xy[:, 1])
        r = np.trunc if self.rounding == "truncate" else np.rint
        return np.stack([r(xp), r(yp)], 1).astype(np.int64)

    def pre_to_prompt_float(self, xp, yp):
        if self.range_ is None:
            raise ValueError("this profile has no prompt coordinates")
        return np.asarray(xp, float) / self.pre_size[0] * self.range_, \
            np.asarray(yp, float) / self.pre_size[1] * self.range_

    def to_prompt(self, x: float, y: float) -> tuple[int, int]:
        """Original pixel -> integer prompt coordinates, computed the way the release does."""
        xp, yp = self.to_pre(x, y)
        u, v = self.pre_to_prompt_float(xp, yp)
        return int(round(float(u))), int(round(float(v)))

    def to_prompt_array(self, xy: np.ndarray) -> np.ndarray:
        """Vectorised to_prompt (np.rint rounds half to even exactly like Python's round)."""
        xy = np.asarray(xy, float).reshape(-1, 2)
        u, v = self.pre_to_prompt_float(*self.to_pre(xy[:, 0], xy[:, 1]))
        return np.stack([np.rint(u), np.rint(v)], 1).astype(np.int64)

    def prompt_to_pre(self, u, v):
        return np.asarray(u, float) / self.range_ * self.pre_size[0], \
            np.asarray(v, float) / self.range_ * self.pre_size[1]

    def prompt_to_orig(self, u, v):
        return self.to_orig(*self.prompt_to_pre(u, v))


@dataclass
class PreparedImage:
    """An image as a model profile wants it: undistorted, resized, and its pixel map."""

    pixels: np.ndarray  # HxWx3 uint8 RGB
    camera: Camera      # intrinsics of `pixels`
    pixel_map: PixelMap
    meta: dict = field(default_factory=dict)


def preprocess_scale(camera: Camera, *, focal: float | None = None, max_side: int | None = None,
                     square_pixels: bool = True,
                     size_rounding: str = "round") -> tuple[tuple[int, int], tuple[float, float]]:
    """The size a profile resizes an image to, and the exact per-axis coordinate scale.

    focal: scale so the focal length becomes `focal` (s = focal / fx; new size round(W * s), round(H' * s),
    where H' = round(H * fx / fy) resamples rows to square pixels when fx != fy; coordinates scale by
    focal / fx and focal / fy). max_side: scale so max(W, H) == max_side. size_rounding "truncate": the
    new size is int(W * s), int(H * s) (DepthLM's release) instead of rounded.
    """
    w, h = camera.width, camera.height
    rnd = (lambda v: int(v)) if size_rounding == "truncate" else (lambda v: int(round(v)))
    if focal is not None:
        s = focal / camera.fx
        if square_pixels and camera.fx != camera.fy:
            h1 = int(round(h * camera.fx / camera.fy))
            return (rnd(w * s), rnd(h1 * s)), (s, focal / camera.fy)
        return (rnd(w * s), rnd(h * s)), (s, s)
    if max_side is not None:
        s = max_side / max(w, h)
        return (rnd(w * s), rnd(h * s)), (s, s)
    return (w, h), (1.0, 1.0)


def preprocessed_size(camera: Camera, **kwargs) -> tuple[int, int]:
    return preprocess_scale(camera, **kwargs)[0]


def resize_rgb(rgb: np.ndarray, size: tuple[int, int], resample: str = "bicubic") -> np.ndarray:
    """Resize with PIL, as the Hugging Face image pipelines of the releases do ("pil_default": whatever
    filter `Image.resize` uses when given none, as DepthLM's release calls it)."""
    from PIL import Image

    if (rgb.shape[1], rgb.shape[0]) == tuple(size):
        return rgb
    if resample == "pil_default":
        return np.asarray(Image.fromarray(rgb).resize(tuple(size)))
    modes = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS,
             "nearest": Image.NEAREST, "area": Image.BOX}
    return np.asarray(Image.fromarray(rgb).resize(tuple(size), modes[resample]))


def undistort_alpha1(rgb: np.ndarray, camera: Camera, tol: float = 1e-3) -> tuple[np.ndarray, Camera]:
    """DepthLM's camera step: when |fx - fy| > tol, OpenCV's optimal new camera matrix (no distortion,
    alpha=1, same size) and `undistort` into it; the intrinsics are then the new matrix's."""
    if abs(camera.fx - camera.fy) <= tol:
        return rgb, camera
    import cv2

    dist = np.zeros((4, 1))
    size = (rgb.shape[1], rgb.shape[0])
    new_k, _ = cv2.getOptimalNewCameraMatrix(camera.K, dist, size, 1, size)
    out = cv2.undistort(np.ascontiguousarray(rgb), camera.K, dist, None, new_k)
    return out, Camera(float(new_k[0, 0]), float(new_k[1, 1]), float(new_k[0, 2]), float(new_k[1, 2]),
                       camera.width, camera.height, camera.source)


def prepare_image(rgb: np.ndarray, camera: Camera, *, focal: float | None = None,
                  max_side: int | None = None, square_pixels: bool = True, coord_range: int | None = None,
                  resample: str = "bicubic", size_rounding: str = "round", undistort: str = "none",
                  undistort_tol: float = 1e-3, pixel_mapping: str = "scale",
                  pixel_rounding: str = "none") -> PreparedImage:
    """Undistort (square pixels, or OpenCV's alpha=1 undistortion) and resize an image for a profile,
    keeping the exact pixel map. The keywords are a profile's `preprocess` settings (config/profiles.py)."""
    if rgb.shape[1] != camera.width or rgb.shape[0] != camera.height:
        raise CameraError(f"intrinsics are for {camera.width}x{camera.height} but the image is "
                          f"{rgb.shape[1]}x{rgb.shape[0]}")
    if undistort == "opencv_alpha1":
        rgb, cam = undistort_alpha1(rgb, camera, undistort_tol)
    elif undistort == "none":
        cam = camera
    else:
        raise ValueError(f"unknown undistort rule {undistort!r}")
    size, scale = preprocess_scale(cam, focal=focal, max_side=max_side, square_pixels=square_pixels,
                                   size_rounding=size_rounding)
    from densify.io.images import MAX_PIXELS

    if min(size) < 2 or size[0] * size[1] > MAX_PIXELS:  # a narrow image with a guessed focal can inflate
        how = f"to focal {focal:g} px from fx {cam.fx:.4g}" if focal is not None else f"to {max_side} px"
        raise CameraError(f"the profile resizes this {cam.width}x{cam.height} image {how}, which makes it "
                          f"{size[0]}x{size[1]} px (it needs at least 2 px a side and at most {MAX_PIXELS:,} px); "
                          f"give its intrinsics if fx is wrong, or crop it to a less elongated image")
    pixels = resize_rgb(rgb, size, resample)
    c = cam
    pre_cam = Camera(c.fx * scale[0], c.fy * scale[1], c.cx * scale[0], c.cy * scale[1], size[0], size[1], c.source)
    if pixel_mapping == "intrinsics":  # through the intrinsics, from the original camera's (as DepthLM)
        pmap = PixelMap((camera.width, camera.height), size, coord_range, scale, origin=(camera.cx, camera.cy),
                        pre_origin=(pre_cam.cx, pre_cam.cy),
                        gain=(pre_cam.fx / camera.fx, pre_cam.fy / camera.fy), rounding=pixel_rounding)
    elif pixel_mapping == "scale":
        pmap = PixelMap((camera.width, camera.height), size, coord_range, scale, rounding=pixel_rounding)
    else:
        raise ValueError(f"unknown pixel mapping {pixel_mapping!r}")
    return PreparedImage(pixels, pre_cam, pmap)


def prepare_for(rgb: np.ndarray, camera: Camera, profile: "Profile") -> PreparedImage:
    """An image as `profile` was trained on it: its preprocessing rule and prompt coordinates (the one place
    a profile's preprocessing is read)."""
    return prepare_image(rgb, camera, coord_range=profile.coord_range, **profile.preprocess.image_options())
