"""`densify demo`: render a seeded synthetic room, run the depth stage on it with the simulated engine, and
report accuracy against the exact ground truth. Offline, in seconds on 2 cores; no model needed.

The simulated engine answers from the scene's truth through an error model: the report says so.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from densify.engines import create_engine
from densify.eval.metrics import delta1, depth_report
from densify.io.images import discover
from densify.io.layout import RunLayout
from densify.stages.summary import run_depth
from densify.stages.settings import DepthConfig
from pipelines import common


def run_demo(out_dir: str | Path, *, seed: int = 0, views: int = 2, noise: bool = True,
             cfg: DepthConfig | None = None, progress=None) -> dict:
    from densify.sim.options import SimulatedOptions
    from densify.sim.truth import SceneTruth
    from densify.synthetic.scenes import SceneSpec, make_scene

    out = Path(out_dir)
    t0 = time.perf_counter()
    scene = make_scene(SceneSpec(seed=seed, n_views=views))
    images = scene.save(out / "scene")
    t_render = time.perf_counter() - t0
    cfg = cfg or DepthConfig(engine={"name": SimulatedOptions.engine_name})
    truth = SceneTruth(scene)
    engine = create_engine(SimulatedOptions(seed=seed, noise=noise), profile=cfg.profile, truth=truth)
    view = {f"view_{k:03d}": v for k, v in enumerate(scene.views)}

    def evaluate(src, res) -> dict:  # the scene's exact depth: the demo knows it, the stage does not
        gt = view[src.id].depth
        p = res.answers.pixels.astype(int)
        return {"dense": depth_report(res.depth, gt),
                "points": {"delta1": delta1(res.answers.values, gt[p[:, 1], p[:, 0]])}}

    summary, _ = run_depth(discover([str(p) for p in images]), cfg, engine, RunLayout(out / "depth"),
                           evaluate=evaluate, progress=progress)
    summary.update(render_s=t_render, total_s=time.perf_counter() - t0, noise=noise, error_model=engine.error.__dict__)
    return summary


def format_report(s: dict, out, kept: bool) -> str:
    m = s["metrics"]
    pts, dense = m.get("points", {}), m.get("dense", {})
    where = f"{out}/depth/<image>/ (depth.npy, depth.png, preview.png, cloud.ply, answers.jsonl)" if kept else \
        "a temporary folder, now removed (use --out DIR to keep them)"
    return "\n".join([
        f"densify demo - {common.SIMULATED_NOTE} ({'noise on' if s['noise'] else 'noise OFF'}).",
        f"  images            {s['ok']} of {s['images']} ({s['profile']} profile)",
        f"  queries           {s['queries']:,} ({s['queries'] // max(s['ok'], 1):,} per image), "
        f"answer failures {s['answer_failures'] or 'none'}",
        f"  answers  delta_1  {pts.get('delta1', float('nan')):.3f}   (point answers vs ground truth)",
        f"  dense    delta_1  {dense.get('delta1', float('nan')):.3f}   AbsRel {dense.get('absrel', float('nan')):.3f}"
        f"   RMSE {dense.get('rmse', float('nan')):.3f} m   (full-resolution map vs ground truth)",
        f"  wall time         {s['total_s']:.1f} s (render {s['render_s']:.1f} s, pipeline {s['wall_s']:.1f} s, "
        f"{s['queries_per_s']:,.0f} simulated q/s)",
        f"  outputs           {where}",
    ])


def add_arguments(p) -> None:
    p.add_argument("--out", help="The output folder (default: a temporary folder, removed at the end).")
    p.add_argument("--seed", type=int, default=0, help="The scene and noise seed (default 0).")
    p.add_argument("--views", type=int, default=2, help="Images to render (default 2).")
    p.add_argument("--no-noise", action="store_true", help="Exact answers: checks the pipeline, not a model.")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="Override a depth setting, e.g. --set plan.count=1024; repeatable.")


def run(args) -> int:
    from densify.config.loading import Override
    from densify.sim.options import SimulatedOptions

    simulated = Override(("engine", "name"), SimulatedOptions.engine_name, "densify demo")
    cfg = common.load(args, DepthConfig, "depth", [simulated])
    if args.views < 1:
        from densify.config.loading import ConfigError

        raise ConfigError(f"--views {args.views}: render at least one view")
    with tempfile.TemporaryDirectory(prefix="densify-demo-") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        layout = RunLayout(out)
        layout.check()
        with layout.lock():
            s = run_demo(out, seed=args.seed, views=args.views, noise=not args.no_noise, cfg=cfg)
        print(format_report(s, out, kept=bool(args.out)))
    return 1 if s["failed"] else 0
