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

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
MAX_PIXELS = 64_000_000


class ImageError(ValueError):
    """An image cannot be used; the message names the file and the fix. `kind` is the failure record's
    kind: image, missing or too_large."""

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


def load_rgb(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Any common image file -> HxWx3 uint8 RGB (grayscale expanded, alpha dropped, 16-bit scaled)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file; check the path or the manifest entry", "missing")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file; re-export or remove it")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"{path}: {w}x{h} is larger than the {max_pixels:,}-pixel limit; "
                                 f"downscale it first (intrinsics scale with it)", "too_large")
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im, dtype=np.float64)
                hi = a.max() if a.size else 1.0
                a = (a / (hi if hi > 0 else 1.0) * 255.0).round().astype(np.uint8)
                return np.repeat(a[..., None], 3, axis=2)
            rgb = np.asarray(im.convert("RGB"))
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: larger than the {Image.MAX_IMAGE_PIXELS * 2:,}-pixel limit of the decoder ({exc}); "
                         f"downscale it first", "too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc}); "
                         f"re-export it or remove it from the input") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 2 or rgb.shape[1] < 2:
        raise ImageError(f"{path}: unexpected image shape {rgb.shape}")
    return np.ascontiguousarray(rgb)


def _stem_id(path: Path, root: Path | None = None) -> str:
    """The default id: the file name without its extension, whatever the input kind (see densify.layout)."""
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
    order, with safe, unique, stable ids (they name output folders: densify.layout). A source whose id had
    to change carries extra["id_wanted"]."""
    from densify.layout import IdAssigner

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
