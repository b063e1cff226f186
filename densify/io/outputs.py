"""Outputs: every file is written to a temporary name and renamed, so a crash never leaves half a file.

Temporary files are named `.<name>.densify-tmp-<random><suffix>` beside their target (`TEMP_RE` matches
exactly these names): `sweep_temp_files` removes those an interrupted run left, and nothing else. Files get
the permissions an ordinary `open()` would give them (0666 minus the umask), not mkstemp's 0600.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

TEMP_TAG = ".densify-tmp-"
TEMP_RE = re.compile(r"^\.(?P<target>.+)\.densify-tmp-[a-z0-9_]{6,}(\.[A-Za-z0-9]{1,16})?$")
"""Names of densify's own temporary files (group `target`: the file they were to become)."""

_UMASK: int | None = None


def _umask() -> int:
    """The process umask, read without changing it where the system allows (changing it is not thread-safe)."""
    global _UMASK
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


def temp_name(path: str | Path) -> str:
    """The prefix of a temporary file for `path` (mkstemp adds random characters and the suffix)."""
    return f".{Path(path).name}{TEMP_TAG}"


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; rename it into place when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_name(path), suffix=path.suffix, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make every output private
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno is not None and exc.filename in (None, tmp):  # name the file, not its temporary
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def disk_full(exc: BaseException) -> bool:
    """A write failed for want of space (or quota): no later output can be written either."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def sweep_temp_files(folder: str | Path, targets: Iterable[str] | None = None, *,
                     recursive: bool = False) -> list[Path]:
    """Remove the temporary files interrupted writes left in `folder` (a folder the job created) and return
    them. Only regular files whose names match TEMP_RE are touched (never links, folders or anything else);
    with `targets`, only the temporaries of those file names (e.g. one shard's "summary-1.json"), so a job
    never removes what another job sharing the folder is writing. recursive: also in subfolders (symbolic
    links to folders are not followed)."""
    wanted = None if targets is None else {str(t) for t in targets}
    removed: list[Path] = []
    stack = [Path(folder)]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            if recursive and e.is_dir(follow_symlinks=False):
                stack.append(Path(e.path))
                continue
            m = TEMP_RE.match(e.name)
            if m is None or not e.is_file(follow_symlinks=False):
                continue
            if wanted is not None and m.group("target") not in wanted:
                continue
            try:
                os.unlink(e.path)
                removed.append(Path(e.path))
            except FileNotFoundError:
                pass
    return removed


def write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def write_jsonl(path, records) -> Path:
    return write_text(path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in records))


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


class _Writes:
    """Only a file's write(): numpy then writes through Python, whose errors keep their errno (ENOSPC); into
    a real file it uses fwrite, whose errors say only "N requested and M written"."""

    def __init__(self, f):
        self.write = f.write


def write_npy(path, array: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(_Writes(f), array)
    return Path(path)


def write_png(path, image: np.ndarray) -> Path:
    """uint8 RGB/gray or uint16 gray."""
    img = image[..., ::-1] if image.ndim == 3 else image
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img))
    if not ok:
        raise OSError(f"could not encode {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())
    return Path(path)


def depth_png16(depth: np.ndarray) -> np.ndarray:
    """Metres -> uint16 millimetres, 0 = no depth (values beyond 65.535 m clipped)."""
    d = np.nan_to_num(np.asarray(depth, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(np.round(d * 1000.0), 0, 65535).astype(np.uint16)


def depth_preview(depth: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """A colourised RGB preview (turbo, near = warm), black where no depth."""
    d = np.asarray(depth, np.float64)
    ok = np.isfinite(d) & (d > 0)
    if not ok.any():
        return np.zeros(d.shape + (3,), np.uint8)
    inv = np.zeros_like(d)
    inv[ok] = 1.0 / d[ok]
    lo_i = 1.0 / hi if hi else np.percentile(inv[ok], 2)
    hi_i = 1.0 / lo if lo else np.percentile(inv[ok], 98)
    n = np.clip((inv - lo_i) / max(hi_i - lo_i, 1e-9), 0, 1)
    bgr = cv2.applyColorMap((n * 255).astype(np.uint8), cv2.COLORMAP_TURBO)
    bgr[~ok] = 0
    return bgr[..., ::-1].copy()


def write_ply(path, cloud) -> Path:
    import open3d as o3d

    with atomic_path(path) as tmp:
        if not o3d.io.write_point_cloud(str(tmp), cloud, write_ascii=False):
            raise OSError(f"Open3D could not write {path}")
        check_ply(tmp)
    return Path(path)


def write_mesh(path, mesh) -> Path:
    import open3d as o3d

    with atomic_path(path) as tmp:
        if not o3d.io.write_triangle_mesh(str(tmp), mesh, write_ascii=False):
            raise OSError(f"Open3D could not write {path}")
        check_ply(tmp)
    return Path(path)


_PLY_TYPES = {"char": 1, "uchar": 1, "int8": 1, "uint8": 1, "short": 2, "ushort": 2, "int16": 2, "uint16": 2,
              "int": 4, "uint": 4, "int32": 4, "uint32": 4, "float": 4, "float32": 4, "double": 8, "float64": 8}


def check_ply(path, list_items: int = 3) -> None:
    """Raise OSError unless the binary PLY at `path` is as long as its header says. Open3D reports success
    when its writes fail (a full disk leaves a truncated file); list properties are taken to hold
    `list_items` entries (Open3D's triangles)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    end = head.find(b"end_header\n")
    lines = head[:max(end, 0)].decode("ascii", "replace").splitlines()
    if end < 0 or not any(line.startswith("format binary") for line in lines):
        raise _short(path, len(head), None)
    want, count, item = end + len(b"end_header\n"), 0, 0
    for w in (line.split() for line in lines):
        if w[:1] == ["element"]:
            want, count, item = want + count * item, int(w[2]), 0
        elif w[:2] == ["property", "list"]:
            item += _PLY_TYPES[w[2]] + list_items * _PLY_TYPES[w[3]]
        elif w[:1] == ["property"]:
            item += _PLY_TYPES[w[1]]
    want += count * item
    got = path.stat().st_size
    if got < want:
        raise _short(path, got, want)


def _short(path: Path, got: int, want: int | None) -> OSError:
    what = f"Open3D wrote {got} of {want} bytes" if want else "Open3D wrote no complete header"
    if shutil.disk_usage(path.parent).free < (want or 0) - got + (1 << 20):  # its writes failed for want of space
        return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({what})", str(path))
    return OSError(errno.EIO, what, str(path))
