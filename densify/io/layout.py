"""Where every output file goes: one object owns the names, and image ids become safe folder names.

    out/
      config.yaml  summary.json  failures.jsonl  manifest.parquet   (per run; -<i> suffix per label shard)
      store/answers-<i>.sqlite                                       (label)
      <id>/  depth.npy depth.png confidence.npy preview.png cloud.ply answers.jsonl camera.json result.json
      depth/<id>/...  pairs/<id1>__<id2>/{matches.npz,answers.jsonl,pose.json,flow.npy,vlm_pose.json,result.json}
      frames/  poses.json  mesh.ply  cloud.ply  scene.glb  colmap/[bin/]  transforms.json  pairs.jsonl  (reconstruct)

An image's id is its manifest `id`, else its file name without extension, made a safe name (NFC-normalised
letters and digits of any script, `._-`; no separators, spaces or control characters; no leading dot; at
most 96 characters and 120 bytes, longer ones shortened with a hash; never a name the job itself uses). Ids are unique within a job: a later image whose id is taken gets `-<8 hex>` of its
path appended, so the same inputs always give the same folders. `result.json` is written last: it names
the settings' fingerprint and certifies the size of every file of the image, so a folder is "done" only
when all of those hold.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunLayout", "ImageFiles", "PairFiles", "safe_id", "IdAssigner", "fingerprint", "check_folder", "RESERVED"]

RESERVED = {"config", "summary", "failures", "manifest", "store", "depth", "pairs", "poses", "mesh", "cloud",
            "colmap", "transforms", "eval", "scene", "frames"}
"""Names the job itself uses in --out: never an image's folder."""

MAX_ID = 96
MAX_ID_BYTES = 120
"""An id is at most 96 characters and 120 bytes of UTF-8, so `<id1>__<id2>` stays within a file system's
255-byte name limit."""


def _hash(text: str, n: int = 8) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()[:n]


def _kept(ch: str) -> bool:
    """Letters, digits and marks of any script, and `._-`; never separators, spaces, control or format
    characters (a right-to-left override), surrogates of undecodable bytes, private or unassigned code points."""
    return ch in "._-" or unicodedata.category(ch)[0] in "LNM"


def _fits(s: str, chars: int, nbytes: int) -> bool:
    return len(s) <= chars and len(s.encode("utf-8", "surrogateescape")) <= nbytes


def _cut(s: str, chars: int, nbytes: int) -> str:
    while not _fits(s, chars, nbytes):
        s = s[:-1]
    return s


def safe_id(raw: str) -> str:
    """A name that is one folder strictly inside the output folder, whatever `raw` holds: NFC-normalised
    (the same name from macOS and Linux gives the same folder), every other character replaced by `_`."""
    text = unicodedata.normalize("NFC", str(raw))
    s = "".join("".join(run) if kept else "_" for kept, run in itertools.groupby(text, _kept))  # a run: one _
    s = s.strip("._-") or "image"
    base = s.split(".", 1)[0].casefold()
    if base in RESERVED or base.startswith("answers-") or base.startswith(("summary-", "manifest-", "failures-")):
        s = f"img_{s}"
    if not _fits(s, MAX_ID, MAX_ID_BYTES) or s != raw and not _fits(s, MAX_ID - 9, MAX_ID_BYTES - 9):
        s = f"{_cut(s, MAX_ID - 9, MAX_ID_BYTES - 9)}-{_hash(str(raw))}"
    return s


class IdAssigner:
    """Unique, stable ids for a job's images (see the module docstring); collisions are kept for the record."""

    def __init__(self):
        self.taken: set[str] = set()
        self.collisions: list[dict] = []

    def assign(self, raw: str, path: str) -> str:
        sid = safe_id(raw)
        if sid.casefold() in self.taken:
            new = f"{_cut(sid, MAX_ID - 9, MAX_ID_BYTES - 9)}-{_hash(str(path))}"
            k = 1
            while new.casefold() in self.taken:  # the same path twice in one job
                new = f"{_cut(sid, MAX_ID - 12, MAX_ID_BYTES - 12)}-{_hash(f'{path}#{k}')}"
                k += 1
            self.collisions.append({"id": new, "wanted": sid, "image": str(path)})
            sid = new
        self.taken.add(sid.casefold())  # case-insensitive file systems
        return sid


def check_folder(path: str | Path, what: str) -> None:
    """A ConfigError naming `what` (the option) when `path` cannot be a folder: it, or a folder above it, is
    a file."""
    from densify.config.loading import ConfigError

    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                where = "is a file" if p == path else f"lies under {p}, which is a file"
                raise ConfigError(f"{what} {path}: {where}, not a folder; give a new or existing folder")
            return


def fingerprint(settings: dict) -> str:
    """A short stable hash of the settings that shape a result."""
    return hashlib.blake2b(json.dumps(settings, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


class _Certified:
    """A folder whose result.json, written last, names the settings' fingerprint and each file's size."""

    dir: Path
    result = property(lambda self: self.dir / "result.json")

    def read_result(self) -> dict | None:
        try:
            return json.loads(self.result.read_text())
        except (OSError, ValueError):
            return None

    def done(self, fp: str) -> dict | None:
        """The earlier result when this folder holds a finished run with the same settings, whole."""
        res = self.read_result()
        if not res or res.get("status") not in self.done_status or res.get("fingerprint") != fp:
            return None
        for name, size in (res.get("files") or {}).items():
            p = self.dir / name
            try:
                if p.stat().st_size != size:
                    return None
            except OSError:
                return None
        return res

    def certify(self, record: dict, files: list[Path]) -> dict:
        """The result record with the size of each file it vouches for (written last, by the caller)."""
        return {**record, "files": {p.name: p.stat().st_size for p in files if p.is_file()}}


@dataclass(frozen=True)
class ImageFiles(_Certified):
    """One image's output folder."""

    dir: Path
    done_status = ("ok",)

    depth_npy = property(lambda self: self.dir / "depth.npy")
    depth_png = property(lambda self: self.dir / "depth.png")
    confidence = property(lambda self: self.dir / "confidence.npy")
    preview = property(lambda self: self.dir / "preview.png")
    cloud = property(lambda self: self.dir / "cloud.ply")
    answers = property(lambda self: self.dir / "answers.jsonl")
    camera = property(lambda self: self.dir / "camera.json")


@dataclass(frozen=True)
class PairFiles(_Certified):
    """One pair's folder; its result.json certifies a pair that was asked, failed or not (a failed pose is a
    finished result too: the same settings give it again)."""

    dir: Path
    done_status = ("ok", "failed")

    matches = property(lambda self: self.dir / "matches.npz")
    answers = property(lambda self: self.dir / "answers.jsonl")
    pose = property(lambda self: self.dir / "pose.json")
    flow = property(lambda self: self.dir / "flow.npy")
    vlm_pose = property(lambda self: self.dir / "vlm_pose.json")


class RunLayout:
    """Every path of one run's output folder."""

    def __init__(self, root: str | Path, *, images_under: str | None = None, shard: tuple[int, int] = (0, 1)):
        self.root = Path(root)
        self.images_root = self.root / images_under if images_under else self.root
        self.suffix = "" if shard[1] == 1 else f"-{shard[0]}"
        self.shard = shard

    def check(self, what: str = "--out") -> None:
        """Fail before any work when the output folder cannot be one."""
        check_folder(self.root, what)

    def lock(self, what: str = "--out"):
        """The job's exclusive lock on this folder (densify.io.lock), per shard; a context manager."""
        from densify.io.lock import OutputLock

        return OutputLock(self.root, shard=self.shard, what=what)

    @property
    def depth(self) -> "RunLayout":
        """The depth stage's layout inside a reconstruction (<out>/depth/<id>/)."""
        return RunLayout(self.root, images_under="depth")

    def image(self, image_id: str) -> ImageFiles:
        return ImageFiles(self.images_root / image_id)

    def pair(self, id1: str, id2: str) -> PairFiles:
        return PairFiles(self.root / "pairs" / f"{id1}__{id2}")

    def sweep(self, *files: str | Path) -> list[Path]:
        """Remove what interrupted writes of these files of the run left: their temporaries only (a job
        sharing the folder keeps its own). Each command calls it on the run files it writes, before writing."""
        from densify.io.outputs import sweep_temp_files

        by_dir: dict[Path, list[str]] = {}
        for f in map(Path, files):
            by_dir.setdefault(f.parent, []).append(f.name)
        return [p for d, names in by_dir.items() for p in sweep_temp_files(d, names)]

    config = property(lambda self: self.root / f"config{self.suffix}.yaml")
    summary = property(lambda self: self.root / f"summary{self.suffix}.json")
    failures = property(lambda self: self.root / f"failures{self.suffix}.jsonl")
    manifest = property(lambda self: self.root / f"manifest{self.suffix}.parquet")
    store_dir = property(lambda self: self.root / "store")
    poses = property(lambda self: self.root / "poses.json")
    pose_report = property(lambda self: self.root / "pose.json")
    mesh = property(lambda self: self.root / "mesh.ply")
    cloud = property(lambda self: self.root / "cloud.ply")
    colmap = property(lambda self: self.root / "colmap")
    transforms = property(lambda self: self.root / "transforms.json")
    glb = property(lambda self: self.root / "scene.glb")
    frames = property(lambda self: self.root / "frames")
    pairs_jsonl = property(lambda self: self.root / "pairs.jsonl")
    eval = property(lambda self: self.root / "eval.json")
