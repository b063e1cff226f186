"""Object questions on synthetic scenes: the simulated VLM3-object model and the answers from dense geometry,
scored per SpatialRGPT-Bench category by the rule-based scorer.

    python -m benchmarks.object_bench [--scenes 6] [--views 4] [--per-category 3] [--out FILE]

Renders seeded scenes (`densify synth`), builds a SpatialRGPT-Bench-format question set from their objects
(densify/synthetic/object_questions.py), and scores three answer sources on the same questions:
- model: the simulated object model (truth through its default error model: 12% of qualitative answers
  wrong, lengths with 22% log-normal noise, directions with 0.6 h noise; unit choices as SpatialRGPT's);
- geometry_exact: answers from the exact depth map (the geometry method's own error: visible surfaces only,
  robust extents, floor-plane vertical);
- geometry_densified: answers from the depth map `densify depth` makes with the simulated vlm3-depth engine
  (point delta_1 about 0.9) - the path a user runs;
- geometry_densified_boxes: the same depth with the boxes only (no masks: each box's foreground is picked
  by depth), as for a user who has no masks.
Results go to benchmarks/results/object_bench_<date>.json (and a markdown table on stdout).
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def build(root: Path, scenes: int, views: int, per_category: int, width: int, height: int) -> Path:
    from densify.synthetic.object_questions import build_question_set
    from densify.synthetic.scenes import SceneSpec, make_scene

    records = []
    for s in range(scenes):
        d = root / f"scene_{s:02d}"
        make_scene(SceneSpec(seed=100 + s, n_views=views, width=width, height=height, trajectory="orbit")).save(d)
        for r in build_question_set(d, seed=s, per_category=per_category):
            r["image_info"]["file_path"] = f"{d.name}/{r['image_info']['file_path']}"
            r["id"] = f"{d.name}_{r['id']}"
            records.append(r)
    data = root / "spatialrgpt_synthetic.json"
    data.write_text(json.dumps(records))
    return data


def densified_depth_for():
    """Depth from the library depth stage with the simulated depth model (truth beside the scene images)."""
    from densify.io.images import ImageSource
    from densify.sim.engine import SimulatedEngine
    from densify.stages.depth import DepthStage
    from densify.stages.settings import DepthConfig

    cfg = DepthConfig(engine={"name": "simulated"})
    stage = DepthStage(cfg, SimulatedEngine(cfg.profile, seed=0), keep_maps=True)
    cache = {}

    def depth_for(item, camera):
        if item.image not in cache:
            src = ImageSource(item.image.stem, item.image, [camera.fx, camera.fy, camera.cx, camera.cy])
            res = stage.one(src)
            cache[item.image] = res.depth if res.status == "ok" else None
        return cache[item.image]
    return depth_for


def exact_depth_for(item, camera):
    return np.load(item.image.with_suffix(".depth.npy"))


def main(argv=None) -> int:
    from densify.config.profiles import load_profile
    from densify.eval.spatialrgpt import read_bench, run_bench
    from densify.sim.engine import SimulatedEngine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=6)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--per-category", type=int, default=3)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--out", help="result JSON (default benchmarks/results/object_bench_<date>.json)")
    args = ap.parse_args(argv)

    profile = load_profile("vlm3-object")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        data = build(Path(tmp), args.scenes, args.views, args.per_category, args.width, args.height)
        items = read_bench(data)
        t_build = time.perf_counter() - t0
        runs = {}
        densified = densified_depth_for()
        for name, depth_for, masks in (("geometry_exact", exact_depth_for, True),
                                       ("geometry_densified", densified, True),
                                       ("geometry_densified_boxes", densified, False)):
            rep = run_bench(items, profile, SimulatedEngine(profile, seed=0), depth_for=depth_for, use_masks=masks)
            rep.pop("_records")
            runs[name] = rep
    model = runs["geometry_exact"]["model"]
    assert model == runs["geometry_densified"]["model"]  # same seeded model answers in every run
    result = {
        "date": datetime.date.today().isoformat(),
        "command": "python -m benchmarks.object_bench " + " ".join(argv or []),
        "setup": {"scenes": args.scenes, "views": args.views, "per_category": args.per_category,
                  "size": [args.width, args.height], "questions": len(items), "images": runs["geometry_exact"]["images"],
                  "scorer": runs["geometry_exact"]["scorer"], "up": "floor", "build_s": round(t_build, 1)},
        "model": model,
        "geometry_exact": runs["geometry_exact"]["geometry"],
        "geometry_densified": runs["geometry_densified"]["geometry"],
        "geometry_densified_boxes": runs["geometry_densified_boxes"]["geometry"],
        "wall_s": {k: v["wall_s"] for k, v in runs.items()},
    }
    out = Path(args.out) if args.out else RESULTS / f"object_bench_{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(items)} questions on {result['setup']['images']} images -> {out}")
    print(table(result))
    return 0


def table(result: dict) -> str:
    from densify.objects.questions import QUALITATIVE_GROUPS, QUANTITATIVE_GROUPS

    cols = [("model", "simulated model"), ("geometry_exact", "geometry, exact depth"),
            ("geometry_densified", "geometry, densified depth"),
            ("geometry_densified_boxes", "geometry, densified depth, boxes only")]
    head = "| category | n | " + " | ".join(t for _, t in cols) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(cols)]
    for g in QUALITATIVE_GROUPS + QUANTITATIVE_GROUPS:
        if g not in result["model"]["groups"]:
            continue
        cells = []
        for k, _ in cols:
            r = result[k]["groups"].get(g, {})
            err = r.get("absrel", r.get("mean_hours_off"))
            extra = "" if err is None else (f" ({err:.2f} h)" if g == "direction" else f" (AbsRel {err:.2f})")
            cells.append(f"{r.get('accuracy', '-')}%{extra}")
        lines.append(f"| {g} | {result['model']['groups'][g]['n']} | " + " | ".join(cells) + " |")
    for name in ("qualitative", "quantitative"):
        lines.append(f"| **{name}** | {result['model'][name]['n']} | "
                     + " | ".join(f"**{result[k][name]['accuracy']}%**" for k, _ in cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
