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


OUTPUT_MARKERS = ("result.json", "summary.json", ".densify.lock")
"""Files that make a folder a densify output folder (an image's results, a run's root): walks skip it."""


def holds_outputs(folder: Path, names=None) -> bool:
    """Whether `folder` (whose entries are `names`, listed here when None) holds densify outputs (an image's
    result.json, a run's summary or lock, an answer store), so a walk over inputs must not take its images
    (depth.png, preview.png) as new inputs."""
    try:
        names = set(os.listdir(folder) if names is None else names)
    except OSError:
        return False
    if names.intersection(OUTPUT_MARKERS) or any(n.startswith("summary-") and n.endswith(".json") for n in names):
        return True
    if "store" in names and os.path.isdir(os.path.join(folder, "store")):
        try:
            return any(n.startswith("answers-") for n in os.listdir(os.path.join(folder, "store")))
        except OSError:
            return False
    return any(n.startswith("answers-") and n.endswith(".sqlite") for n in names)


class _Skip:
    """What folder walks and globs leave out: the job's own output folders (and what is inside them), any
    folder below the one given that holds densify outputs, and hidden files and folders (`.git/`, macOS
    `._name.png` resource forks). A folder named as an input is itself only left out when it lies inside
    an output folder."""

    def __init__(self, exclude=()):
        self.exclude = [os.path.realpath(p) for p in exclude if p is not None]
        self.skipped: list[str] = []
        self._dirs: dict[tuple[str, bool], bool] = {}

    def _excluded(self, real: str, given: bool) -> bool:
        # a folder named as an input that is the output folder itself is walked (its image folders are
        # skipped as outputs); one inside the output folder is not
        return any(real == e and not given or real.startswith(e.rstrip(os.sep) + os.sep) for e in self.exclude)

    def folder(self, d: str, *, given: bool = False, names=None) -> bool:
        key = (os.path.realpath(d), given)
        if key not in self._dirs:
            why = "the job's output folder" if self._excluded(*key) else \
                "it holds densify outputs" if not given and holds_outputs(Path(d), names) else None
            self._dirs[key] = why is not None
            if why is not None:
                self.skipped.append(d)
                log.info("%s: skipped (%s)", d, why)
        return self._dirs[key]

    def path(self, p: Path, base: Path) -> bool:
        """Whether a file a glob found below `base` (the glob's fixed part) is left out."""
        try:
            rel = p.relative_to(base)
        except ValueError:
            rel = p
        if any(part.startswith(".") and part not in (".", "..") for part in rel.parts):
            return True
        parents = [base / Path(*rel.parts[:k]) for k in range(1, len(rel.parts))]
        return self.folder(str(base), given=True) or any(self.folder(str(d)) for d in parents)


def walk_images(root: Path, *, exclude=(), skip: _Skip | None = None) -> Iterator[Path]:
    """Image files under `root`, sorted, leaving out hidden files and folders, the folders in `exclude`
    (the job's --out) and every folder holding densify outputs."""
    skip = skip if skip is not None else _Skip(exclude)
    for d, dirs, files in os.walk(root):
        if skip.folder(d, given=d == str(root), names=dirs + files):
            dirs[:] = []
            continue
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for f in sorted(files):
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES:
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


def read_json_list(path: Path) -> list | None:
    """The records of a manifest written as one JSON list (`[{...}, ...]`), or None for JSON lines."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ImageError(f"{path}: a JSON list manifest that is not valid JSON ({exc}); fix it, or write one JSON "
                         f"object per line (.jsonl)") from None
    return data if isinstance(data, list) else None


def iter_jsonl(path: Path) -> Iterator[ImageSource]:
    """A JSONL manifest (DepthLM/iBims format or {"image", "intrinsics"}), streamed; a `.json` file holding
    one JSON list of such records is read whole."""
    records = read_json_list(path)
    if records is not None:
        for n, rec in enumerate(records, 1):
            yield _record_source(rec, path.parent, f"{path}:{n}")
        return
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


def open_parquet(path: Path):
    """A Parquet manifest, checked: readable, with an `image` column (an ImageError naming the fix otherwise)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow's own error types: not Parquet, truncated, unreadable
        raise ImageError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc}); give a Parquet "
                         f"manifest with an 'image' column, or a .jsonl") from None
    names = pf.schema_arrow.names
    if "image" not in names:
        raise ImageError(f"{path}: a Parquet manifest needs an 'image' column of image paths (it has "
                         f"{', '.join(names) or 'no columns'}); rename the column, or write the manifest again")
    return pf


def iter_parquet(path: Path, batch_rows: int = 4096) -> Iterator[ImageSource]:
    pf = open_parquet(path)
    n = 0
    for rb in pf.iter_batches(batch_size=batch_rows):
        for rec in rb.to_pylist():
            n += 1
            yield _record_source(rec, path.parent, f"{path}:{n}")


MANIFEST_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def manifest_kind(item: str) -> str:
    p = Path(item)
    if p.is_dir():
        return "dir"
    kind = MANIFEST_SUFFIXES.get(p.suffix.lower())
    if kind is not None and p.is_file():
        return kind
    if p.is_file() or (p.suffix.lower() in IMAGE_SUFFIXES and not any(c in str(item) for c in "*?[")):
        return "file"  # a missing image file fails as that image, later
    return "glob"


def iter_sources(inputs, *, exclude=()) -> Iterator[ImageSource]:
    """Folders (recursive), globs, image files, JSONL and Parquet manifests -> image sources, streamed, in
    order, with safe, unique, stable ids (they name output folders: densify.io.layout). A source whose id had
    to change carries extra["id_wanted"]. Folder walks and globs leave out `exclude` (the job's own output
    folders), every folder holding densify outputs and hidden files (see `walk_images`); files and
    manifest entries named explicitly are always taken."""
    from densify.io.layout import IdAssigner

    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    ids = IdAssigner()
    for src in _iter_raw([str(x) for x in inputs], _Skip(exclude)):
        new = ids.assign(src.id, str(src.path))
        if new != src.id:
            src.extra["id_wanted"] = src.id
            src.id = new
        yield src


def _iter_raw(inputs: list[str], skip: _Skip) -> Iterator[ImageSource]:
    for item in inputs:
        kind = manifest_kind(item)
        p = Path(item)
        if kind == "dir":
            yield from (ImageSource(_stem_id(f), f) for f in walk_images(p, skip=skip))
        elif kind == "jsonl":
            yield from iter_jsonl(p)
        elif kind == "parquet":
            yield from iter_parquet(p)
        elif kind == "file":
            yield ImageSource(_stem_id(p), p)
        else:
            yield from (ImageSource(_stem_id(m), m) for m in glob_images(item, skip=skip))


def glob_images(pattern: str, *, exclude=(), skip: _Skip | None = None) -> list[Path]:
    """The image files a glob matches, sorted, leaving out what folder walks leave out."""
    skip = skip if skip is not None else _Skip(exclude)
    matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True))
    if not matches:
        raise ImageError(f"{pattern}: matches no file or folder; give image files, a folder, a glob, a "
                         f".jsonl or a .parquet manifest")
    parts = Path(pattern).parts
    fixed = next((k for k, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    return [m for m in matches if m.suffix.lower() in IMAGE_SUFFIXES and not skip.path(m, base)]


def read_jsonl_manifest(path: Path) -> list[ImageSource]:
    """A whole JSONL manifest; a bad record is an error here (evaluation needs every record)."""
    out = []
    for src in iter_jsonl(Path(path)):
        if "manifest_error" in src.extra:
            raise ImageError(f"{src.extra['manifest_error']}; each line needs a JSON object with an 'image' key")
        out.append(src)
    return out


def discover(inputs: list[str | Path], *, exclude=()) -> list[ImageSource]:
    """All image sources of the inputs (see iter_sources); an empty result is an error."""
    found = list(iter_sources(inputs, exclude=exclude))
    if not found:
        raise ImageError(f"no images found in {', '.join(map(str, inputs))}; supported: "
                         f"{', '.join(sorted(IMAGE_SUFFIXES))}, folders, globs, .jsonl and .parquet manifests "
                         f"(folders holding densify outputs, the job's --out and hidden files are left out)")
    return found
