"""Images in: find inputs (folders, globs, JSONL manifests), load them with errors that name the file."""

from __future__ import annotations

import glob
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

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
    """Sparse labelled depth: {"pixels": Nx2, "depth": N} (DepthLM evaluation format)."""
    extra: dict = field(default_factory=dict)


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


def _stem_id(path: Path, root: Path | None) -> str:
    rel = path.relative_to(root) if root and path.is_relative_to(root) else Path(path.name)
    return str(rel.with_suffix("")).replace("/", "__")


def read_jsonl_manifest(path: Path) -> list[ImageSource]:
    """DepthLM/iBims JSONL: {"image": rel/path, "intrinsics": [fx, fy, cx, cy, W, H],
    "pixel_coords": [[x, y], ...], "depth": [m, ...]}; also plain {"image": ..., "intrinsics": ...}."""
    out = []
    base = path.parent
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            img = Path(rec["image"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ImageError(f"{path}:{n}: each line needs a JSON object with an 'image' key ({exc})") from None
        img = img if img.is_absolute() else base / img
        labels = None
        if "pixel_coords" in rec and "depth" in rec:
            labels = {"pixels": rec["pixel_coords"], "depth": rec["depth"]}
        out.append(ImageSource(_stem_id(img, base), img, rec.get("intrinsics"), labels,
                               {k: v for k, v in rec.items() if k not in ("image", "intrinsics", "pixel_coords", "depth")}))
    return out


def discover(inputs: list[str | Path]) -> list[ImageSource]:
    """Folders (recursive), globs, image files and JSONL manifests -> image sources, in order."""
    found: list[ImageSource] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            found += [ImageSource(_stem_id(f, p), f) for f in files]
        elif p.suffix == ".jsonl" and p.is_file():
            found += read_jsonl_manifest(p)
        elif p.is_file() or p.suffix.lower() in IMAGE_SUFFIXES and not any(c in str(item) for c in "*?["):
            found.append(ImageSource(_stem_id(p, None), p))  # missing files fail per image later
        else:
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
            if not matches:
                raise ImageError(f"{item}: matches no file or folder; give image files, a folder, a glob "
                                 f"or a .jsonl manifest")
            found += [ImageSource(_stem_id(m, None), m) for m in matches if m.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        raise ImageError(f"no images found in {', '.join(map(str, inputs))}; supported: "
                         f"{', '.join(sorted(IMAGE_SUFFIXES))}, folders, globs, .jsonl manifests")
    ids: dict[str, int] = {}
    for src in found:  # ids name output files: keep them unique
        if src.id in ids:
            ids[src.id] += 1
            src.id = f"{src.id}_{ids[src.id]}"
        else:
            ids[src.id] = 0
    return found
