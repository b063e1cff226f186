"""`densify eval ibims`: DepthLM-style evaluation at labelled points (delta_1, AbsRel, parse failures).

Works on the 12-image sample in shared/data/ibims1-sample and on the full iBims JSONL of the DepthLM
release: one JSON object per image with intrinsics, pixel_coords and metric depth.
"""

from __future__ import annotations

from pathlib import Path

from densify.config import ConfigError, Override
from densify.eval.labels import evaluate_labels, label_sources
from densify.layout import RunLayout
from densify.profiles import load_profile
from densify.settings import DepthConfig
from densify.stages.engine import build_engine
from pipelines import common

DEFAULT_IBIMS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ibims1-sample" / "ibims1_sample.jsonl"


def add_arguments(p) -> None:
    p.add_argument("suite", choices=["ibims"], help="The evaluation suite: ibims (DepthLM-format labelled points).")
    p.add_argument("--data", default=str(DEFAULT_IBIMS),
                   help="A DepthLM-format JSONL (default: the iBims-1 sample in ../shared/data).")
    common.add_engine_args(p)
    p.add_argument("--limit", type=int, help="Score the first N images only (default: all).")
    p.add_argument("--out", help="Write per-image outputs and eval.json here (default: nothing written).")
    common.add_config_args(p, "depth")


def run(args) -> int:
    data = Path(args.data)
    if not data.is_file():
        raise ConfigError(f"--data {data}: no such file; pass --data PATH/TO/ibims.jsonl")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: give a positive number of images")
    # Scores are at the asked points: no previews or clouds, and the fast densifier.
    extra = [Override(("outputs", "ply"), False, "eval"), Override(("outputs", "preview"), False, "eval"),
             Override(("densify", "method"), "linear", "eval")]
    cfg = common.load(args, DepthConfig, "depth", extra)
    layout = RunLayout(args.out) if args.out else None
    if layout is not None:
        layout.check()
    sources = label_sources(data, args.limit)
    engine = build_engine(cfg.engine, load_profile(cfg.profile), model=cfg.model)
    try:
        if layout is not None:
            layout.root.mkdir(parents=True, exist_ok=True)
        rep = evaluate_labels(sources, cfg, engine, layout, data=str(data))
    finally:
        engine.close()
    c = common.console()
    if rep["simulated"]:
        c.print(f"[yellow]{common.SIMULATED_NOTE}[/]")
    c.print(f"eval {args.suite} ({rep['engine']} engine, {rep['profile']}, model {rep['model']}): {rep['images']} "
            f"images, {rep['points']} labelled points, answered {rep['answered']}")
    c.print(f"  delta_1 {rep['delta1']:.3f} (over answered: {rep['delta1_answered']:.3f}), AbsRel "
            f"{rep['absrel_answered']:.3f}, parse failures {rep['parse_failures'] or 'none'}, "
            f"{rep['queries_per_s']:.0f} q/s")
    for f in rep["failed_images"][:10]:
        c.print(f"  [red]failed[/] {f['id']} ({f['kind']}): {f['error']}")
    return 1 if rep["failed_images"] else 0
