"""What the stopping rule of `plan.count: auto` sees, round by round, with the rule switched off.

    python -m benchmarks.stop_rule_trace [--scenes 10]      # ~5 min on 2 cores

The densify_bench scenes (640x480, simulated VLM3-depth under `iid` and `structured`) are planned to the
cap (4,096) in rounds of 384 after a 768-query grid. After every refinement round it records the answers'
own spread s (half the robust spread of nearest-neighbour residual differences around the local planes),
the disagreement d of that round's answers with the map predicted before them (robust, that round alone),
and the dense map's AbsRel / edge AbsRel against the truth at that point. It shows why the rule compares
the share of d that s explains (and s with a tolerance) rather than d with s alone: under both presets the
new answers disagree with the map by more than their own spread in almost every round, and by more under
`structured` (bleeding and token-scale fields at the edges where new answers go), while the maps stop
improving only under `structured`. Writes benchmarks/results/stop_rule_trace_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.densify_bench import REPO, SceneCase


def trace(seed: int, error: str) -> list[dict]:
    from densify.fields.adaptive import AdaptivePlanner, StopRule
    from densify.fields.edge_aware import densify_depth_edge

    case = SceneCase(seed, error=error)
    h, w = case.depth.shape
    planner = AdaptivePlanner((h, w), 4096, rgb=case.rgb, stop=StopRule(ratio=1e-9, tolerance=0.0, pool=1))
    pts = planner.first_points()
    pixels, values, rows = np.zeros((0, 2)), np.zeros(0), []
    while pts is not None and len(pts):
        ans = case.ask(pts)
        pixels = np.concatenate([pixels, ans.pixels.astype(float)])
        values = np.concatenate([values, ans.values])
        pts = planner.next_points(pixels, values)
        row = {"queries": len(pixels), **case.score(densify_depth_edge(pixels, values, case.rgb).values)}
        h_ = [x for x in planner.history if x["queries"] == len(pixels)]
        if h_:
            row.update(own_spread=h_[0]["own_spread"], disagreement=h_[0]["disagreement"],
                       d_over_s=round(h_[0]["disagreement"] / max(h_[0]["own_spread"], 1e-9), 3))
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", type=int, default=10)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = {"benchmark": "stop_rule_trace", "date": _dt.date.today().isoformat(),
           "command": "python -m benchmarks.stop_rule_trace " + " ".join(sys.argv[1:] if argv is None else argv),
           "scenes": list(range(100, 100 + args.scenes)), "presets": {}}
    for error in ("iid", "structured"):
        per = {s: trace(s, error) for s in out["scenes"]}
        ratios = [r["d_over_s"] for rows in per.values() for r in rows if "d_over_s" in r]
        first, last = [rows[0] for rows in per.values()], [rows[-1] for rows in per.values()]
        at1536 = [next(r for r in rows if r["queries"] >= 1536) for rows in per.values()]
        out["presets"][error] = {
            "d_over_s": {"min": min(ratios), "median": float(np.median(ratios)), "max": max(ratios),
                         "rounds": len(ratios), "rounds_with_d_at_most_s": sum(r <= 1 for r in ratios)},
            "own_spread_median": float(np.median([r["own_spread"] for rows in per.values() for r in rows
                                                  if "own_spread" in r])),
            "absrel": {"grid_768": float(np.mean([r["absrel"] for r in first])),
                       "1536": float(np.mean([r["absrel"] for r in at1536])),
                       "4096": float(np.mean([r["absrel"] for r in last]))},
            "per_scene": per}
        print(error, json.dumps({k: v for k, v in out["presets"][error].items() if k != "per_scene"}), flush=True)
    out["wall_s"] = time.perf_counter() - t0
    path = args.json or REPO / "benchmarks" / "results" / f"stop_rule_trace_{out['date']}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
