"""Images in: find inputs (folders, globs, JSONL manifests), load them with errors that name the file."""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
MAX_PIXELS = 64_000_000


class ImageError(ValueError):
    """An image cannot be used; the message names the file and the fix. `kind` is the failure record's
    kind: image (not a readable image), missing (no such file), not_a_file (a folder, pipe, device...),
    unreadable (permissions) or too_large."""

    def __init__(self, message: str, kind: str = "image"):
        super().__init__(message)
        self.kind = kind


@dataclass
class ImageSource:
    """One input image and what came with it (intrinsics, labelled points)."""

    id: str
    path: Path
    intrinsics: list[float] | None = None
    labels: dict | None = None
    """Sparse labelled depth: {"pixels": Nx2, "depth": N} (DepthLM evaluation format), for evaluation only."""
    extra: dict = field(default_factory=dict)
    manifest: str | None = None
    """The JSONL/Parquet manifest that listed the image, if any."""


@dataclass
class LoadedImage:
    rgb: np.ndarray
    """HxWx3 uint8 RGB, EXIF orientation applied, reduced when `max_side` asked for it."""
    size: tuple[int, int]
    """(width, height) of the full image as displayed (EXIF orientation applied), before any reduction."""
    scale: float
    """rgb width / size width (1.0 when not reduced); intrinsics of the full image scale by it."""


# EXIF orientation -> the transpose that displays the image upright (what ImageOps.exif_transpose does)
_ORIENT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
           7: "TRANSVERSE", 8: "ROTATE_90"}


def _open_regular(path: Path):
    """A binary file object for a regular file, or an ImageError saying precisely why not. Pipes, sockets
    and devices are never opened (reading a FIFO would block the job)."""
    import stat as st

    kinds = ((st.S_ISDIR, "a folder", "give the image files inside it (a folder input is walked), or fix the "
                                      "manifest entry"),
             (st.S_ISFIFO, "a named pipe (FIFO)", "densify does not read from pipes: save the image to a file"),
             (st.S_ISSOCK, "a socket", "give an image file"),
             (st.S_ISCHR, "a character device", "give an image file"),
             (st.S_ISBLK, "a block device", "give an image file"))
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.lexists(path):
            raise ImageError(f"{path}: a symbolic link to {os.readlink(path)!r}, which does not exist; fix the "
                             f"link or the path", "missing") from None
        raise ImageError(f"{path}: no such file; check the path or the manifest entry", "missing") from None
    except PermissionError:
        raise ImageError(f"{path}: cannot be read (permission denied on the file or a folder above it); fix the "
                         f"permissions or run as a user who can read it", "unreadable") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot be read ({exc.strerror or exc}); check the path", "unreadable") from None
    except ValueError as exc:  # e.g. a NUL byte in the name
        raise ImageError(f"{path!r}: not a valid path ({exc})", "missing") from None
    for test, what, fix in kinds:
        if test(info.st_mode):
            raise ImageError(f"{path}: is {what}, not an image file; {fix}", "not_a_file")
    if not st.S_ISREG(info.st_mode):
        raise ImageError(f"{path}: not a regular file; give an image file", "not_a_file")
    if info.st_size == 0:
        raise ImageError(f"{path}: empty file; re-export or remove it")
    try:
        # O_NONBLOCK: should the file have been swapped for a pipe since the stat, the open does not block
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise ImageError(f"{path}: cannot be read (permission denied); fix its permissions (chmod +r) or run as "
                         f"a user who can read it", "unreadable") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot be opened ({exc.strerror or exc})", "unreadable") from None
    if not st.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageError(f"{path}: not a regular file; give an image file", "not_a_file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image as displayed (EXIF orientation applied), read from its header only: a
    caller can choose `max_side` for `load_image` (e.g. from intrinsics) before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    f = _open_regular(path)
    try:
        with f, Image.open(f) as im:
            w, h = im.size
            try:
                orientation = int(im.getexif().get(0x0112, 1))
            except Exception:
                orientation = 1
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: larger than the pixel limit of the decoder ({exc}); downscale it first",
                         "too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc}); "
                         f"re-export it or remove it from the input") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def load_rgb(path: str | Path, max_pixels: int = MAX_PIXELS, *, max_side: int | None = None) -> np.ndarray:
    """Any common image file -> HxWx3 uint8 RGB (grayscale expanded, alpha dropped, 16-bit scaled), upright
    as displayed (EXIF orientation applied). See `load_image` for max_pixels and max_side."""
    return load_image(path, max_pixels, max_side=max_side).rgb


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS, *, max_side: int | None = None) -> LoadedImage:
    """`load_rgb` with the full image's size and the reduction scale.

    max_pixels: images with more pixels are refused (`too_large`) before any pixel is decoded, so one
    image costs at most ~3 bytes per pixel of this budget (4 for 16-bit images).
    max_side: return the image with its longer side at most this many pixels (never enlarged). It is
    decoded reduced where the format allows it (JPEG: DCT scaling by 1/2, 1/4, 1/8 while decoding, so a
    large photo never exists in memory at full size); other formats are decoded, box-reduced by an integer
    factor, then all are resized exactly (Lanczos). A tiny PNG that inflates to a huge image is therefore
    decoded once within max_pixels and then reduced; beyond max_pixels it is refused.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if max_side is not None and max_side < 2:
        raise ValueError(f"max_side must be at least 2, got {max_side}")
    f = _open_regular(path)
    w = h = 0
    try:
        with f, Image.open(f) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"{path}: {w}x{h} is larger than the {max_pixels:,}-pixel limit; "
                                 f"downscale it first (intrinsics scale with it)", "too_large")
            try:
                orientation = int(im.getexif().get(0x0112, 1))
            except Exception:  # a damaged EXIF block: the pixels may still be fine
                orientation = 1
            if getattr(im, "n_frames", 1) > 1:  # animated GIF/PNG/WebP, multi-page TIFF: the first is the image
                log.warning("%s: %d frames; using the first", path, im.n_frames)
            target = None
            if max_side is not None and max(w, h) > max_side:
                s = max_side / max(w, h)
                target = (int(round(w * s)), int(round(h * s)))
                if min(target) < 2:
                    raise ImageError(f"{path}: {w}x{h} is too elongated to decode at most {max_side} px on its longer "
                                     f"side (the shorter would be {min(w, h) * s:.2g} px, under 2); crop it to a "
                                     f"less elongated image")
                if im.format == "JPEG":
                    im.draft("RGB", target)  # decodes at the smallest DCT scale still >= target
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                out = _gray16_to_rgb(im, target)
            else:
                if im.mode != "RGB":
                    im = im.convert("RGB")
                if target is not None:
                    factor = min(im.size[0] // target[0], im.size[1] // target[1])
                    if factor >= 2:
                        im = im.reduce(factor)
                    if im.size != target:
                        im = im.resize(target, Image.Resampling.LANCZOS)
                out = im
            if orientation in _ORIENT:
                out = out.transpose(getattr(Image.Transpose, _ORIENT[orientation]))
            rgb = np.asarray(out)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: larger than the {Image.MAX_IMAGE_PIXELS * 2:,}-pixel limit of the decoder ({exc}); "
                         f"downscale it first", "too_large") from None
    except MemoryError:
        raise ImageError(f"{path}: out of memory decoding {w}x{h} pixels; downscale it first or ask for a "
                         f"reduced decode (max_side)", "too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc}); "
                         f"re-export it or remove it from the input") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 2 or rgb.shape[1] < 2:
        raise ImageError(f"{path}: unexpected image shape {rgb.shape}")
    size = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    return LoadedImage(np.ascontiguousarray(rgb), size, rgb.shape[1] / size[0])


def _gray16_to_rgb(im, target):
    """A 16/32-bit grayscale image -> RGB PIL image scaled to 0..255 by its maximum (the same values as a
    whole-image float64 division, computed in row blocks so memory stays near the decoded size)."""
    from PIL import Image

    a = np.asarray(im)
    if target is not None:
        import cv2

        a = cv2.resize(a.astype(np.float32), target, interpolation=cv2.INTER_AREA)
    hi = float(a.max()) if a.size else 1.0
    hi = hi if hi > 0 else 1.0
    out = np.empty(a.shape, np.uint8)
    for i in range(0, a.shape[0], 512):
        out[i:i + 512] = (a[i:i + 512].astype(np.float64) / hi * 255.0).round().astype(np.uint8)
    return Image.fromarray(np.repeat(out[..., None], 3, axis=2))


def _stem_id(path: Path, root: Path | None = None) -> str:
    """The default id: the file name without its extension, whatever the input kind (see densify.io.layout)."""
    return Path(path).stem


def walk_images(root: Path) -> Iterator[Path]:
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            if Path(f).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(d) / f


def _record_source(rec, base: Path, where: str) -> ImageSource:
    """One manifest record -> an image source; a bad record becomes a source carrying its error
    (extra["manifest_error"]). DepthLM records ({"pixel_coords", "depth"}) carry labels."""
    if not isinstance(rec, dict) or not rec.get("image"):
        return ImageSource(f"bad-record-{where.rsplit(':', 1)[-1]}", Path(where),
                           extra={"manifest_error": f"{where}: each record needs an 'image' path"})
    img = Path(str(rec["image"]))
    img = img if img.is_absolute() else base / img
    labels = None
    if rec.get("pixel_coords") is not None and rec.get("depth") is not None:
        labels = {"pixels": rec["pixel_coords"], "depth": rec["depth"]}
    skip = ("image", "intrinsics", "id", "pixel_coords", "depth")
    extra = {k: v for k, v in rec.items() if k not in skip and v is not None}
    sid = str(rec["id"]) if rec.get("id") else _stem_id(img)
    return ImageSource(sid, img, rec.get("intrinsics"), labels, extra, where.rsplit(":", 1)[0])


def iter_jsonl(path: Path) -> Iterator[ImageSource]:
    """A JSONL manifest (DepthLM/iBims format or {"image", "intrinsics"}), streamed."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                yield ImageSource(f"bad-record-{n}", path, extra={"manifest_error": f"{path}:{n}: not JSON ({exc})"},
                                  manifest=str(path))
                continue
            yield _record_source(rec, path.parent, f"{path}:{n}")


def iter_parquet(path: Path, batch_rows: int = 4096) -> Iterator[ImageSource]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if "image" not in pf.schema_arrow.names:
        raise ImageError(f"{path}: a Parquet manifest needs an 'image' column (has {pf.schema_arrow.names})")
    n = 0
    for rb in pf.iter_batches(batch_size=batch_rows):
        for rec in rb.to_pylist():
            n += 1
            yield _record_source(rec, path.parent, f"{path}:{n}")


def manifest_kind(item: str) -> str:
    p = Path(item)
    if p.is_dir():
        return "dir"
    if p.suffix == ".jsonl" and p.is_file():
        return "jsonl"
    if p.suffix == ".parquet" and p.is_file():
        return "parquet"
    if p.is_file() or (p.suffix.lower() in IMAGE_SUFFIXES and not any(c in str(item) for c in "*?[")):
        return "file"  # a missing image file fails as that image, later
    return "glob"


def iter_sources(inputs) -> Iterator[ImageSource]:
    """Folders (recursive), globs, image files, JSONL and Parquet manifests -> image sources, streamed, in
    order, with safe, unique, stable ids (they name output folders: densify.io.layout). A source whose id had
    to change carries extra["id_wanted"]."""
    from densify.io.layout import IdAssigner

    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    ids = IdAssigner()
    for src in _iter_raw([str(x) for x in inputs]):
        new = ids.assign(src.id, str(src.path))
        if new != src.id:
            src.extra["id_wanted"] = src.id
            src.id = new
        yield src


def _iter_raw(inputs: list[str]) -> Iterator[ImageSource]:
    for item in inputs:
        kind = manifest_kind(item)
        p = Path(item)
        if kind == "dir":
            yield from (ImageSource(_stem_id(f), f) for f in walk_images(p))
        elif kind == "jsonl":
            yield from iter_jsonl(p)
        elif kind == "parquet":
            yield from iter_parquet(p)
        elif kind == "file":
            yield ImageSource(_stem_id(p), p)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise ImageError(f"{item}: matches no file or folder; give image files, a folder, a glob, a "
                                 f".jsonl or a .parquet manifest")
            yield from (ImageSource(_stem_id(m), m) for m in matches if m.suffix.lower() in IMAGE_SUFFIXES)


def read_jsonl_manifest(path: Path) -> list[ImageSource]:
    """A whole JSONL manifest; a bad record is an error here (evaluation needs every record)."""
    out = []
    for src in iter_jsonl(Path(path)):
        if "manifest_error" in src.extra:
            raise ImageError(f"{src.extra['manifest_error']}; each line needs a JSON object with an 'image' key")
        out.append(src)
    return out


def discover(inputs: list[str | Path]) -> list[ImageSource]:
    """All image sources of the inputs (see iter_sources); an empty result is an error."""
    found = list(iter_sources(inputs))
    if not found:
        raise ImageError(f"no images found in {', '.join(map(str, inputs))}; supported: "
                         f"{', '.join(sorted(IMAGE_SUFFIXES))}, folders, globs, .jsonl and .parquet manifests")
    return found
