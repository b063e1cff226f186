"""The engine rows of README's performance table, regenerated from committed engine_bench JSON.

    python -m benchmarks.engine_table                       # every benchmarks/results/engine_bench-*.json
    python -m benchmarks.engine_table FILE.json [...]       # chosen files

One markdown row per measured variant: answered q/s, engines per GPU, weights, answer tokens, GPU busy
share, share of the bf16 ceiling, memory per engine, engine start. A row with engine errors is marked
invalid with its error count. Older files (H100, 2026-11-23/24) predate some columns: those show "-".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ("file", "variant", "answered q/s", "engines/GPU", "weights", "tokens", "GPU busy", "share of ceiling",
           "GiB per engine", "start s", "valid")


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def engine_rows(path: Path) -> list[dict]:
    """The table cells of one engine_bench JSON file, one dict per row of it."""
    data = json.loads(path.read_text())
    if "engine_bench" not in data.get("benchmark", ""):
        raise ValueError(f"{path}: not an engine_bench result")
    out = []
    for r in data.get("rows", []):
        errors = r.get("errors") or 0
        answered = r.get("answered", r.get("queries", 0) - errors)
        qps = answered / r["wall_s"] if r.get("wall_s") else None
        valid = r.get("valid", errors == 0)
        out.append({
            "file": path.name, "variant": r["variant"], "answered q/s": _num(qps, ".1f"),
            "engines/GPU": str(r.get("engines_per_gpu", "-")),
            "weights": r.get("dtype") or (r.get("engine_options") or {}).get("quantization") or "-",
            "tokens": _num(r.get("generated_tokens_per_query"), ".0f"),
            "GPU busy": _num(r.get("gpu_busy_share"), ".2f"),
            "share of ceiling": _num(r.get("share_of_ceiling"), ".2f"),
            "GiB per engine": _num(r.get("memory_per_engine_gib"), ".1f"),
            "start s": _num(r.get("engine_start_s"), ".0f"),
            "valid": "yes" if valid else f"INVALID ({errors} errors)",
        })
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(r[c] for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path, help="engine_bench JSON (default: all committed ones)")
    args = ap.parse_args(argv)
    files = args.files or sorted(RESULTS.glob("engine_bench-*.json"))
    rows = [row for f in files for row in engine_rows(f)]
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
