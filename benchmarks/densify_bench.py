"""Densification accuracy against the query budget: uniform grid + linear vs edge-aware vs adaptive.

    python -m benchmarks.densify_bench            # full sweep: 10 scenes x 7 budgets x 2 presets (~5 min, 2 cores)
    python -m benchmarks.densify_bench --quick    # 4 scenes x 3 budgets (~1 min)
    python -m benchmarks.densify_bench --errors structured --edge-opts '{"radius": 4}' --tag r4   # a variant
    python -m benchmarks.densify_bench --budgets 3072 --auto --no-plot --tag auto  # plan.count: auto vs 3072
    python -m benchmarks.densify_bench --budgets 3072 --auto --first-seed 200 --no-plot --tag auto_s200  # other scenes

Seeded synthetic rooms (densify.synthetic.scenes, 640x480) are answered by the simulated VLM3-depth engine
through the real prompts, parser and pixel maps, under each error preset of `--errors` (default both, in one
run): ``iid`` (12.5% log-normal noise per answer, 2% outliers, 1% unparseable answers) and ``structured``
(per-image scale, per-object bias, correlated log-depth fields, edge bleeding: densify.sim.errors).
Both are models of errors, not measurements of VLM3. For each preset, budget (queries per image) and method:

* ``bilinear``: uniform grid, piecewise-linear interpolation in inverse depth, no outlier rejection
  (`densify_depth(outliers=False)`: the honest plain-interpolation baseline);
* ``linear``: the same with outlier rejection (`densify_depth`, the pipeline's former default);
* ``edge``: uniform grid, edge-aware densification (`densify_depth_edge`);
* ``adaptive+linear``: adaptive placement (`AdaptivePlanner`), piecewise-linear interpolation (ablation);
* ``adaptive+edge``: adaptive placement and edge-aware densification.

The adaptive rows are the depth stage itself (`DepthStage` with an adaptive plan of the budget, the
edge-aware densifier, nothing written): its rounds, its planner, its map; ``adaptive+linear`` densifies
the same answers piecewise-linearly. `--auto` adds the same stage with ``plan.count: auto`` (`StopRule`: a
grid, then rounds until the answers stop paying; budget-free): per scene its queries, engine calls and why it
stopped, and against ``adaptive+edge`` at 3072 (the former default) the AbsRel it loses (`auto` in each
preset's results).

Every method asks at most the budget (grids are the largest that fit). Metrics over all valid pixels:
delta_1 and AbsRel; near discontinuities: AbsRel and delta_1 within 5 px of a ground-truth depth edge
(4-neighbours whose |log depth ratio| > 0.1). The "budget ratio" interpolates the baseline's curve in
log-budget: the budget the baseline needs for the accuracy a method reaches at 1024.

Writes benchmarks/results/densify_<date>[_tag].json (every preset under "presets"), one
docs/densify_budget[_tag]_<preset>.png per preset (--example: docs/densify_example_<preset>.png) and prints
markdown tables.

Note: `densify_depth`'s triangle rasteriser can extrapolate a few border pixels of a triangle with an
outlier corner to absurd depths (1e6 m); a linear interpolation never leaves the range of its answers,
so baseline outputs are clipped to that range here (it only removes that artefact).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

METHODS = ["bilinear", "linear", "edge", "adaptive+linear", "adaptive+edge"]
BASELINES = ["bilinear", "linear"]
FULL_BUDGETS = [256, 512, 1024, 2048, 4096, 8192, 16384]
QUICK_BUDGETS = [256, 1024, 4096]
METRICS = {"delta1": "higher", "absrel": "lower", "edge_absrel": "lower", "edge_delta1": "higher"}


# ---------------------------------------------------------------------------------------------- one scene

@dataclass
class AdaptiveAnswers:
    """One adaptive run of the depth stage on a scene: its answers, rounds and edge-aware map."""

    answers: object
    calls: list[int]
    """Queries per engine round."""
    depth: np.ndarray
    confidence: np.ndarray
    densify_s: float
    wall_s: float
    plan: dict
    """The planner's report (rounds, why it stopped)."""


class SceneCase:
    """One rendered view with the simulated engine and everything needed to ask and score."""

    def __init__(self, seed: int, *, width: int = 640, height: int = 480, logprobs: bool = False,
                 engine_seed: int | None = None, error: str | dict = "iid"):
        import cv2
        from PIL import Image

        from densify.config.profiles import load_profile
        from densify.io.cameras import prepare_for
        from densify.queries.prompts import image_ref, image_uid, sampling_for
        from densify.sim.engine import SimulatedEngine
        from densify.sim.truth import SceneTruth
        from densify.synthetic.scenes import SceneSpec, make_scene

        self.profile = load_profile("vlm3-depth")
        scene = make_scene(SceneSpec(seed=seed, width=width, height=height))
        view = scene.views[0]
        self.rgb, self.depth, self.camera = view.rgb, view.depth.astype(np.float32), view.camera
        self.prep = prepare_for(self.rgb, self.camera, self.profile)
        self.ref = image_ref(f"bench-scene-{seed}", self.prep)
        self._dir = tempfile.TemporaryDirectory(prefix="densify-bench-")  # the view as a file for the depth stage
        self.image = Path(self._dir.name) / f"{self.ref.id}.png"
        Image.fromarray(self.rgb).save(self.image)
        self.logprobs = logprobs
        self.uid = image_uid(self.prep, self.ref.id)
        self.engine = SimulatedEngine(self.profile, seed=seed if engine_seed is None else engine_seed, error=error,
                                      truth=SceneTruth(scene, {self.ref.id: 0}))
        self.sampling = sampling_for(self.profile, logprobs=logprobs)
        self.valid = np.isfinite(self.depth) & (self.depth > 0)
        ld = np.log(np.where(self.valid, self.depth, 1.0))
        e = np.zeros(self.depth.shape, bool)
        dx = np.abs(np.diff(ld, axis=1)) > 0.1
        dy = np.abs(np.diff(ld, axis=0)) > 0.1
        e[:, 1:] |= dx
        e[:, :-1] |= dx
        e[1:] |= dy
        e[:-1] |= dy
        disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (11, 11))
        self.edge_band = (cv2.dilate(e.astype(np.uint8), disk) > 0) & self.valid
        self.calls = 0

    def ask(self, points):
        """One engine call for these pixels -> PointAnswers."""
        from densify.queries import answers
        from densify.queries.plan import plan_queries
        from densify.queries.prompts import depth_batch

        plan = plan_queries(points, self.prep.pixel_map, marker=self.profile.marker)
        batch = depth_batch(self.prep, plan, self.profile, uid=self.uid, ref=self.ref, sampling=self.sampling)
        self.calls += 1
        comps = self.engine.generate(batch)
        return answers.collect_depth(self.profile, plan.pixels, plan.prompt_xy, comps, unmarkable=plan.unmarkable)

    def ask_adaptive(self, budget: int | None, planner_opts: dict | None = None, edge_opts: dict | None = None,
                     auto: dict | None = None) -> AdaptiveAnswers:
        """The depth stage on this view (in memory: nothing written) with an adaptive plan of `budget`
        queries (None: `plan.count: auto` with the plan.auto options `auto`) and the edge-aware densifier."""
        from densify.io.images import ImageSource
        from densify.stages.depth import DepthStage
        from densify.stages.settings import DepthConfig

        cfg = DepthConfig(engine={"name": "simulated"}, plan={"mode": "adaptive", "budget": budget, "auto": auto or {}},
                          densify={"method": "edge", "options": edge_opts or {}}, logprobs=self.logprobs,
                          outputs={"ply": False}, forcing={"mode": "off"})  # plans only: no audit batches
        calls: list[int] = []
        stage = DepthStage(cfg, self.engine, keep_maps=True, on_round=calls.append, planner_options=planner_opts)
        t = time.perf_counter()
        (res,) = stage.run([ImageSource(self.ref.id, self.image)], intrinsics=self.camera)
        wall = time.perf_counter() - t
        if res.status != "ok":
            raise RuntimeError(f"the depth stage failed on scene {self.ref.id}: {res.error}")
        return AdaptiveAnswers(res.answers, calls, res.depth, res.confidence, res.densify_s, wall, res.plan)

    def score(self, pred: np.ndarray) -> dict:
        from densify.eval.metrics import absrel, delta1

        v, b = self.valid, self.edge_band
        return {"delta1": delta1(pred[v], self.depth[v]), "absrel": absrel(pred[v], self.depth[v]),
                "edge_absrel": absrel(pred[b], self.depth[b]), "edge_delta1": delta1(pred[b], self.depth[b])}


def _linear(ans, shape, outliers):
    from densify.fields import densify_depth

    f = densify_depth(ans.pixels, ans.values, shape, outliers=outliers)
    ok = np.isfinite(ans.values) & (ans.values > 0)
    lo, hi = float(ans.values[ok].min()), float(ans.values[ok].max())
    return np.clip(f.values, lo, hi)  # see the module note: removes the rasteriser's extrapolation artefact


def run_scene(args) -> dict:
    """All budgets and methods on one scene (a worker process)."""
    seed, budgets, opts = args
    from densify.fields import densify_depth_edge
    from densify.fields.adaptive import grid_within

    t0 = time.perf_counter()
    case = SceneCase(seed, logprobs=opts.get("logprobs", False), error=opts.get("error", "iid"))
    h, w = case.depth.shape
    edge_opts = opts.get("edge", {})
    planner_opts = opts.get("planner", {})
    out = {"seed": seed, "error": opts.get("error", "iid"), "edge_fraction": float(case.edge_band.mean()), "results": {}}
    for B in budgets:
        row = {}
        grid = grid_within(w, h, B)
        ans = case.ask(grid)
        lp = ans.logprobs if opts.get("logprobs") else None
        t = time.perf_counter()
        row["bilinear"] = case.score(_linear(ans, (h, w), False))
        row["bilinear"]["densify_s"] = time.perf_counter() - t
        t = time.perf_counter()
        row["linear"] = case.score(_linear(ans, (h, w), True))
        row["linear"]["densify_s"] = time.perf_counter() - t
        t = time.perf_counter()
        row["edge"] = case.score(densify_depth_edge(ans.pixels, ans.values, case.rgb, logprobs=lp, **edge_opts).values)
        row["edge"]["densify_s"] = time.perf_counter() - t
        for m in ("bilinear", "linear", "edge"):
            row[m].update(queries=len(ans.pixels), calls=1)
        run = case.ask_adaptive(B, planner_opts, edge_opts)  # the depth stage: rounds, then edge-aware
        aans, plan_s = run.answers, run.wall_s - run.densify_s
        t = time.perf_counter()
        row["adaptive+linear"] = case.score(_linear(aans, (h, w), True))
        row["adaptive+linear"]["densify_s"] = time.perf_counter() - t
        row["adaptive+edge"] = case.score(run.depth)
        row["adaptive+edge"]["densify_s"] = run.densify_s
        for m in ("adaptive+linear", "adaptive+edge"):
            row[m].update(queries=len(aans.pixels), calls=len(run.calls), plan_s=plan_s)
        out["results"][str(B)] = row
    if opts.get("auto") is not None:  # plan.count: auto (budget-free): the stage's stopping rule
        run = case.ask_adaptive(None, planner_opts, edge_opts, auto=opts["auto"])
        row = case.score(run.depth)
        row.update(densify_s=run.densify_s, queries=len(run.answers.pixels), calls=len(run.calls),
                   plan_s=run.wall_s - run.densify_s, stop=run.plan["stop"], history=case_history(run.plan))
        out["auto"] = row
    out["wall_s"] = time.perf_counter() - t0
    return out


def case_history(report: dict) -> dict:
    return {k: report[k] for k in ("rounds", "own_spread", "disagreement", "ratio") if k in report}


# ---------------------------------------------------------------------------------------------- summary

AUTO_KEYS = ("delta1", "absrel", "edge_absrel", "edge_delta1", "queries", "calls", "densify_s", "plan_s")


def aggregate_auto(scenes: list[dict], agg: dict, default: int = 3072) -> dict | None:
    """`plan.count: auto` over the scenes against adaptive + edge-aware at `default` queries (the former
    default), when both were run: means, per-scene queries and stop reasons, and the AbsRel difference."""
    rows = [s["auto"] for s in scenes if "auto" in s]
    if not rows:
        return None
    out = {k: float(np.nanmean([r[k] for r in rows])) for k in AUTO_KEYS}
    out["queries_per_scene"] = [int(r["queries"]) for r in rows]
    out["stops"] = {k: sum(r["stop"] == k for r in rows) for k in sorted({r["stop"] for r in rows})}
    ref = agg.get("adaptive+edge", {}).get(str(default))
    if ref is not None:
        out["reference"] = {"method": "adaptive+edge", "budget": default, **{k: ref[k] for k in METRICS}}
        out["absrel_loss"] = out["absrel"] - ref["absrel"]
        out["query_share"] = out["queries"] / ref["queries"]
        out["within_0.005_absrel"] = out["absrel_loss"] <= 0.005
    return out


def auto_table(runs: dict) -> str:
    lines = ["| errors | plan | queries / image (min-max) | calls | AbsRel | edge AbsRel | δ1 | stops |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for e, run in runs.items():
        a = run.get("auto")
        if not a:
            continue
        ref = a.get("reference")
        if ref:
            r = run["aggregate"]["adaptive+edge"][str(ref["budget"])]
            lines.append(f"| {e} | adaptive {ref['budget']} (former default) | {r['queries']:.0f} | {r['calls']:.1f} | "
                         f"{r['absrel']:.4f} | {r['edge_absrel']:.4f} | {r['delta1']:.4f} | |")
        q = a["queries_per_scene"]
        lines.append(f"| {e} | auto | {a['queries']:.0f} ({min(q)}-{max(q)}) | {a['calls']:.1f} | {a['absrel']:.4f} | "
                     f"{a['edge_absrel']:.4f} | {a['delta1']:.4f} | "
                     + ", ".join(f"{k} {v}" for k, v in a["stops"].items()) + " |")
    return "\n".join(lines)


def aggregate(scenes: list[dict], budgets: list[int]) -> dict:
    agg = {}
    for m in METHODS:
        agg[m] = {}
        for B in budgets:
            rows = [s["results"][str(B)][m] for s in scenes]
            agg[m][str(B)] = {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}
    return agg


def equivalent_budget(base: dict, budgets: list[int], metric: str, value: float) -> tuple[float | None, str]:
    """The budget the baseline needs to reach `value` (log-budget interpolation of its curve).

    Returns (budget or None, note): note is "" when inside the sweep, ">" when the baseline never gets there
    within the sweep, "<" when it is already better at the smallest budget.
    """
    sign = 1.0 if METRICS[metric] == "higher" else -1.0
    ys = [sign * base[str(B)][metric] for B in budgets]
    v = sign * value
    if ys[0] >= v:
        return float(budgets[0]), "<"
    for i in range(1, len(budgets)):
        if ys[i] >= v:
            x0, x1 = math.log2(budgets[i - 1]), math.log2(budgets[i])
            t = (v - ys[i - 1]) / (ys[i] - ys[i - 1])
            return float(2 ** (x0 + t * (x1 - x0))), ""
    return None, ">"


def ratios(agg: dict, budgets: list[int], at: int = 1024) -> dict:
    out = {}
    if at not in budgets:
        return out
    for base in BASELINES + ["edge"]:
        for m in METHODS:
            if m == base or (base == "edge" and m != "adaptive+edge") or m in BASELINES:
                continue
            for metric in METRICS:
                val = agg[m][str(at)][metric]
                b, note = equivalent_budget(agg[base], budgets, metric, val)
                out.setdefault(base, {}).setdefault(m, {})[metric] = {
                    "value_at": val, "equivalent_budget": b, "note": note,
                    "ratio": None if b is None else b / at,
                    "text": (f"> {budgets[-1]} (beyond the sweep)" if note == ">" else
                             f"<= {budgets[0]}" if note == "<" else f"{b:.0f}")}
    return out


def markdown_table(agg: dict, budgets: list[int]) -> str:
    lines = ["| budget | method | queries | calls | δ1 | AbsRel | edge AbsRel | edge δ1 | densify s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for B in budgets:
        for m in METHODS:
            r = agg[m][str(B)]
            lines.append(f"| {B} | {m} | {r['queries']:.0f} | {r['calls']:.1f} | {r['delta1']:.4f} | "
                         f"{r['absrel']:.4f} | {r['edge_absrel']:.4f} | {r['edge_delta1']:.4f} | "
                         f"{r['densify_s']:.2f} |")
    return "\n".join(lines)


def ratio_table(rat: dict, at: int = 1024) -> str:
    lines = [f"| method at {at} | baseline | " + " | ".join(METRICS) + " |",
             "|---|---|" + "---:|" * len(METRICS)]
    for base, d in rat.items():
        for m, mm in d.items():
            cells = []
            for metric in METRICS:
                e = mm[metric]
                cells.append(e["text"] + ("" if e["ratio"] is None or e["note"] else f" ({e['ratio']:.1f}x)"))
            lines.append(f"| {m} | {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(agg: dict, budgets: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    styles = {"bilinear": ("tab:gray", "--", "o"), "linear": ("tab:blue", "--", "s"),
              "edge": ("tab:orange", "-", "^"), "adaptive+linear": ("tab:purple", ":", "v"),
              "adaptive+edge": ("tab:red", "-", "D")}
    names = {"delta1": "δ1 (all pixels)", "absrel": "AbsRel (all pixels)",
             "edge_absrel": "AbsRel within 5 px of depth edges", "edge_delta1": "δ1 within 5 px of depth edges"}
    for ax, metric in zip(axes.ravel(), ["absrel", "edge_absrel", "delta1", "edge_delta1"]):
        for m in METHODS:
            c, ls, mk = styles[m]
            ax.plot(budgets, [agg[m][str(B)][metric] for B in budgets], ls, color=c, marker=mk, label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets)
        ax.set_xticklabels([str(b) for b in budgets], rotation=45)
        ax.set_xlabel("queries per image")
        ax.set_title(names[metric])
        ax.grid(True, alpha=0.3)
    axes[0, 0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def example_figure(seed: int, budget: int, path: Path, opts: dict) -> None:
    """Qualitative comparison on one scene: inputs, baseline and adaptive+edge at one budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from densify.fields.adaptive import grid_within

    case = SceneCase(seed, error=opts.get("error", "iid"))
    h, w = case.depth.shape
    ans = case.ask(grid_within(w, h, budget))
    base = _linear(ans, (h, w), False)
    run = case.ask_adaptive(budget, opts.get("planner", {}), opts.get("edge", {}))
    aans = run.answers
    lo, hi = np.percentile(case.depth[case.valid], [1, 99])
    err_b = np.abs(base - case.depth) / np.maximum(case.depth, 1e-6)
    err_a = np.abs(run.depth - case.depth) / np.maximum(case.depth, 1e-6)
    fig, axes = plt.subplots(2, 4, figsize=(20, 8))
    panels = [
        (case.rgb, None, f"image + uniform grid ({len(ans.pixels)} queries)", ans.pixels),
        (case.depth, "depth", "ground truth", None),
        (base, "depth", "grid + bilinear", None),
        (run.depth, "depth", "adaptive + edge-aware", None),
        (case.rgb, None, f"image + adaptive queries ({len(aans.pixels)}, {budget} budget)", aans.pixels),
        (run.confidence, "conf", "adaptive + edge-aware: confidence", None),
        (err_b, "err", "grid + bilinear: |relative error| (0-0.3)", None),
        (err_a, "err", "adaptive + edge-aware: |relative error| (0-0.3)", None),
    ]
    for ax, (img, kind, title, pts) in zip(axes.ravel(), panels):
        if kind == "depth":
            ax.imshow(img, vmin=lo, vmax=hi, cmap="turbo")
        elif kind == "conf":
            ax.imshow(img, vmin=0, vmax=1, cmap="gray")
        elif kind == "err":
            ax.imshow(img, vmin=0, vmax=0.3, cmap="inferno")
        else:
            ax.imshow(img)
        if pts is not None:
            ax.plot(pts[:, 0], pts[:, 1], ".", ms=2, color="lime")
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main

def run_preset(error: str, seeds: list[int], budgets: list[int], opts: dict, workers: int) -> dict:
    """Every scene under one error preset -> aggregate, ratios and per-scene rows."""
    from densify.sim.errors import ErrorModel

    opts = {**opts, "error": error}
    t0 = time.perf_counter()
    jobs = [(s, budgets, opts) for s in seeds]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            scenes = pool.map(run_scene, jobs, chunksize=1)
    else:
        scenes = [run_scene(j) for j in jobs]
    agg = aggregate(scenes, budgets)
    out = {"error_model": ErrorModel.from_option(error).__dict__, "wall_s": time.perf_counter() - t0,
           "aggregate": agg, "ratios_at_1024": ratios(agg, budgets), "per_scene": scenes}
    auto = aggregate_auto(scenes, agg)
    if auto is not None:
        out["auto"] = auto
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4 scenes x budgets 256, 1024, 4096")
    p.add_argument("--scenes", type=int, help="number of seeded scenes (default 10; quick 4)")
    p.add_argument("--first-seed", type=int, default=100,
                   help="seed of the first scene (default 100: seeds 100, 101, ...; another set, e.g. 200)")
    p.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], help="comma-separated budgets")
    p.add_argument("--errors", default="iid,structured", help="comma-separated error presets (simulated engine)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--logprobs", action="store_true", help="ask for answer log-probabilities and use them")
    p.add_argument("--edge-opts", type=json.loads, default={}, help="JSON options for densify_depth_edge")
    p.add_argument("--planner-opts", type=json.loads, default={}, help="JSON options for AdaptivePlanner")
    p.add_argument("--auto", nargs="?", const="{}", type=json.loads, default=None, metavar="JSON",
                   help="also run plan.count: auto (StopRule options as JSON, e.g. '{\"ratio\": 1.2}'); with "
                        "3072 among the budgets, compared with adaptive + edge-aware at 3072 (the former default)")
    p.add_argument("--tag", default="", help="suffix of the default JSON / plot names (a variant's name)")
    p.add_argument("--json", type=Path, help="results JSON (default benchmarks/results/densify_<date>[_tag].json)")
    p.add_argument("--plot", type=Path, help="budget plot (default docs/densify_budget[_tag]_<preset>.png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--example", action="store_true", help="also draw docs/densify_example_<preset>.png")
    args = p.parse_args(argv)

    budgets = args.budgets or (QUICK_BUDGETS if args.quick else FULL_BUDGETS)
    n_scenes = args.scenes or (4 if args.quick else 10)
    seeds = list(range(args.first_seed, args.first_seed + n_scenes))
    presets = [e.strip() for e in args.errors.split(",") if e.strip()]
    opts = {"logprobs": args.logprobs, "edge": args.edge_opts, "planner": args.planner_opts, "auto": args.auto}
    t0 = time.perf_counter()
    runs = {e: run_preset(e, seeds, budgets, opts, args.workers) for e in presets}
    wall = time.perf_counter() - t0
    date = _dt.date.today().isoformat()
    suffix = ("_quick" if args.quick else "") + ("_logprobs" if args.logprobs else "") + \
        (f"_{args.tag}" if args.tag else "")
    json_path = args.json or REPO / "benchmarks" / "results" / f"densify_{date}{suffix}.json"
    argv_used = sys.argv[1:] if argv is None else list(argv)
    record = {
        "benchmark": "densify_bench", "date": date, "command": "python -m benchmarks.densify_bench " +
        " ".join(argv_used), "wall_s": wall, "workers": args.workers,
        "scenes": seeds, "size": [640, 480], "budgets": budgets, "profile": "vlm3-depth",
        "engine": "simulated", "errors": presets, "logprobs": args.logprobs, "methods": METHODS,
        "options": opts, "edge_band": "within 5 px of 4-neighbour |log depth ratio| > 0.1",
        "presets": runs,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=1))
    print(f"## densify_bench: {n_scenes} scenes, budgets {budgets}, presets {presets}, {wall:.0f} s on "
          f"{args.workers} workers\n")
    for e, run in runs.items():
        agg, rat = run["aggregate"], run["ratios_at_1024"]
        if not args.no_plot:
            plot_path = (args.plot.with_name(f"{args.plot.stem}_{e}{args.plot.suffix}") if args.plot else
                         REPO / "docs" / f"densify_budget{suffix}_{e}.png")
            plot(agg, budgets, plot_path, f"Dense depth vs queries per image ({n_scenes} synthetic 640x480 scenes, "
                                          f"simulated VLM3-depth, {e} errors{' + logprobs' if args.logprobs else ''})")
            if args.example:
                example_figure(seeds[0], 1024 if 1024 in budgets else budgets[0],
                               REPO / "docs" / f"densify_example{suffix}_{e}.png", {**opts, "error": e})
        print(f"### error preset: {e}\n")
        print(markdown_table(agg, budgets))
        if run.get("auto"):
            print("\n`plan.count: auto` against the former default:\n")
            print(auto_table({e: run}))
        if rat:
            print("\nBaseline budget needed for each method's accuracy at 1024 queries (log-budget interpolation):\n")
            print(ratio_table(rat))
        print()
    print(f"results: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
