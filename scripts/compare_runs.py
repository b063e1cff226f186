"""Compare two output folders file by file: byte-identical, or where they differ.

    python scripts/compare_runs.py BEFORE AFTER

Run the same command at two revisions (e.g. `densify demo --out BEFORE`, then after a change `densify
demo --out AFTER`) to show that a change kept behaviour. Timings, wall-clock fields and the answer
store's SQLite files are not results: JSON fields named like `wall_s`, `*_per_s`, `started`, `finished`
and `elapsed` are ignored; the answer store's files are skipped (the outputs they produced are compared);
PLY files (Open3D's TSDF fusion is multi-threaded, so its vertex order varies from run to run) are
compared as sets of points and colours. Exit 0 when everything matches, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

VOLATILE = re.compile(r"(wall|_s$|per_s|started|finished|elapsed|time|cpu|pid|host|rss)", re.I)
SKIP = re.compile(r"\.sqlite(-wal|-shm)?$|\.lock$|manifest\.parquet$")


def _scrub(value):
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if not VOLATILE.search(k)}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _paths_scrubbed(value, a: Path, b: Path):
    """Absolute paths of the two runs name their own folders: make them equal."""
    text = json.dumps(value, sort_keys=True)
    return text.replace(str(a), "<run>").replace(str(b), "<run>")


def same(a: Path, b: Path, fa: Path, fb: Path) -> bool:
    if fa.read_bytes() == fb.read_bytes():
        return True
    if fa.suffix in (".json", ".jsonl"):
        try:
            la = [json.loads(x) for x in fa.read_text().splitlines() if x.strip()] if fa.suffix == ".jsonl" \
                else [json.loads(fa.read_text())]
            lb = [json.loads(x) for x in fb.read_text().splitlines() if x.strip()] if fb.suffix == ".jsonl" \
                else [json.loads(fb.read_text())]
        except ValueError:
            return False
        return _paths_scrubbed(_scrub(la), a, b) == _paths_scrubbed(_scrub(lb), a, b)
    if fa.suffix == ".ply":
        return _same_ply(fa, fb)
    if fa.suffix == ".yaml":
        return fa.read_text().replace(str(a), "<run>") == fb.read_text().replace(str(b), "<run>")
    return False


def _same_ply(fa: Path, fb: Path) -> bool:
    import numpy as np
    import open3d as o3d

    def rows(path: Path):
        pc = o3d.io.read_point_cloud(str(path))
        data = np.hstack([np.asarray(pc.points), np.asarray(pc.colors).reshape(len(pc.points), -1)])
        return data[np.lexsort(data.T[::-1])]

    ra, rb = rows(fa), rows(fb)
    return ra.shape == rb.shape and bool(np.allclose(ra, rb, atol=1e-6))


def compare(a: Path, b: Path) -> list[str]:
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file() and not SKIP.search(p.name)}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file() and not SKIP.search(p.name)}
    problems = [f"only in {a}: {p}" for p in sorted(files_a - files_b)]
    problems += [f"only in {b}: {p}" for p in sorted(files_b - files_a)]
    for rel in sorted(files_a & files_b):
        if not same(a, b, a / rel, b / rel):
            problems.append(f"differs: {rel}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    args = ap.parse_args(argv)
    problems = compare(args.before.resolve(), args.after.resolve())
    n = sum(1 for p in args.before.rglob("*") if p.is_file())
    for p in problems:
        print(p)
    print(f"{n} files compared: " + ("identical (timings aside)" if not problems else f"{len(problems)} differences"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
