"""One markdown table of `plan.count: auto` variants from densify_bench results, pooled over scene sets.

    python -m benchmarks.stop_rule_table auto r256 f512      # tags of densify_2026-12-03_<tag>[_s<seed>].json

Each tag is a StopRule variant measured with
`python -m benchmarks.densify_bench --budgets 3072 --auto JSON [--first-seed S] --no-plot --tag TAG[_sS]`.
Per error preset, over every scene of every set found for the tag: queries per map (mean, min-max), AbsRel,
edge AbsRel and delta_1 of the auto map against the former default (adaptive + edge-aware, 3,072 queries) on
the same scenes, the largest mean AbsRel loss of one set of 10 scenes (how much seeds move it), and the stops.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

import numpy as np

from benchmarks.densify_bench import REPO

HEADER = ("| variant | StopRule options | scenes (first seeds) | errors | queries / map: mean (min-max) | "
          "AbsRel (vs former) | edge AbsRel (vs former) | δ1 (vs former) | worst set's AbsRel loss | stops |\n"
          "|---|---|---|---|---:|---:|---:|---:|---:|---|")


def files_of(folder: Path, date: str, tag: str) -> list[Path]:
    pat = re.compile(re.escape(f"densify_{date}_{tag}") + r"(_s\d+)?\.json")
    return sorted(p for p in folder.glob(f"densify_{date}_{tag}*.json") if pat.fullmatch(p.name))


def rows(tag: str, paths: list[Path]) -> list[str]:
    out = []
    for e in ("iid", "structured"):
        per, worst, stops, firsts, opts = collections.defaultdict(list), [], collections.Counter(), [], None
        for p in paths:
            rec = json.loads(p.read_text())
            run = rec["presets"].get(e)
            if run is None or "auto" not in run:
                continue
            opts, firsts = rec["options"]["auto"], firsts + [rec["scenes"][0]]
            worst.append(run["auto"]["absrel_loss"])
            for s in run["per_scene"]:
                a, ref = s["auto"], s["results"]["3072"]["adaptive+edge"]
                for k in ("absrel", "edge_absrel", "delta1"):
                    per[k].append(a[k])
                    per["ref_" + k].append(ref[k])
                per["queries"].append(a["queries"])
                stops[a["stop"]] += 1
        if not worst:
            continue
        m = {k: float(np.mean(v)) for k, v in per.items()}
        q = per["queries"]
        out.append(f"| {tag} | `{json.dumps(opts)}` | {len(q)} ({', '.join(map(str, firsts))}) | {e} | "
                   f"{m['queries']:.0f} ({min(q)}-{max(q)}) | "
                   + " | ".join(f"{m[k]:.4f} ({m[k] - m['ref_' + k]:+.4f})" for k in ("absrel", "edge_absrel", "delta1"))
                   + f" | {max(worst):+.4f} | " + ", ".join(f"{k} {v}" for k, v in sorted(stops.items())) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tags", nargs="+")
    p.add_argument("--date", default="2026-12-03")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    lines = [HEADER]
    for tag in args.tags:
        paths = files_of(args.results, args.date, tag)
        if not paths:
            print(f"no densify_{args.date}_{tag}[_sN].json in {args.results}", file=sys.stderr)
            return 2
        lines += rows(tag, paths)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
