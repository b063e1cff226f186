"""What every command shares: its arguments, the settings they make, and the end-of-run report.

The only module of pipelines/ that other command modules import.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from densify.config.loading import ConfigError, Override, parse_set
from densify.io.layout import RunLayout
from densify.stages.settings import load_config

log = logging.getLogger("densify")

SIMULATED_NOTE = ("SIMULATED engine: every answer comes from ground truth through an error model, not from a "
                  "model; numbers measure the pipeline, not a VLM")


def add_config_args(p: argparse.ArgumentParser, default_name: str) -> None:
    p.add_argument("--config", metavar="FILE",
                   help=f"A pipeline YAML whose keys override the defaults (configs/pipelines/{default_name}.yaml).")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="Override one setting, e.g. --set plan.count=1024 or --set engine.options.seed=3; "
                        "repeatable.")


def add_engine_args(p: argparse.ArgumentParser, *, profile: bool = True,
                    model_help: str = "The checkpoint: a local folder or a hub name (default: the profile's model).") -> None:
    if profile:
        p.add_argument("--profile", help="The model profile: vlm3-depth (default), depthlm, or a profile YAML path.")
    p.add_argument("--engine", help="The engine: vllm or hf (default: vllm when installed, else hf), openai (a "
                                    "running server), ray, or simulated (tests and demos: answers from ground truth).")
    p.add_argument("--model", help=model_help)


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--count", type=int, help="About this many queries per image (default 3072, a 64x48 grid).")
    p.add_argument("--stride", type=float, help="One query every this many pixels, instead of --count.")


def add_intrinsics_arg(p: argparse.ArgumentParser, what: str = "every image") -> None:
    p.add_argument("--intrinsics", metavar="FX,FY,CX,CY",
                   help=f"Intrinsics of {what} in pixels (default: a JSON sidecar beside the image, else a 60 degree "
                        f"field of view, with a warning).")


def overrides(args) -> list[Override]:
    """The settings the shared options set, each naming the option that set it (for error messages)."""
    out: list[Override] = []
    at = lambda *k: k  # noqa: E731

    def add(path, value, origin):
        out.append(Override(path, value, origin))

    if getattr(args, "profile", None):
        add(at("profile"), args.profile, f"--profile {args.profile}")
    if getattr(args, "engine", None):
        add(("engine", "name"), args.engine, f"--engine {args.engine}")
    if getattr(args, "model", None):
        add(at("model"), args.model, f"--model {args.model}")
    if getattr(args, "stride", None) is not None and getattr(args, "count", None) is not None:
        raise ConfigError(f"--count {args.count} and --stride {args.stride:g} both choose the query grid; give one")
    if getattr(args, "stride", None) is not None:
        add(at("plan", "stride"), args.stride, f"--stride {args.stride:g}")
    if getattr(args, "count", None) is not None:
        add(at("plan", "count"), args.count, f"--count {args.count}")
    if getattr(args, "overwrite", False):
        add(("overwrite",), True, "--overwrite")
    return out


def load(args, model, default_name: str, extra: list[Override] | None = None, *, shared: bool = True):
    """Settings: defaults, then --config, then the shared options (unless not `shared`), then the command's
    own (`extra`), then --set."""
    ov = (overrides(args) if shared else []) + list(extra or [])
    sets = parse_set(getattr(args, "set", None))
    check_conflicts(ov, sets)
    return load_config(model, getattr(args, "config", None), ov + sets, default_name=default_name)


# settings that exclude each other: given together on the command line, one would silently lose
_EXCLUSIVE = [({("plan", "stride")}, {("plan", "count")})]


def check_conflicts(options: list[Override], sets: list[Override]) -> None:
    """Refuse an option and a --set that set the same key to different values (the --set would win
    silently), and settings that exclude each other given together."""
    for s in sets:
        for o in options:
            if o.path == s.path and o.value != s.value:
                raise ConfigError(f"{o.origin} and {s.origin} both set {'.'.join(s.path)}; give one")
    given = {o.path: o for o in options + sets if o.value is not None}
    for a, b in _EXCLUSIVE:
        oa = next((given[p] for p in a if p in given), None)
        ob = next((given[p] for p in b if p in given), None)
        if oa is not None and ob is not None:
            raise ConfigError(f"{oa.origin} and {ob.origin} both choose the query grid; give one")


def write_config(layout: RunLayout, cfg) -> None:
    """The resolved settings beside the outputs (and in the log with --verbose)."""
    from densify.io import outputs
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    layout.sweep(layout.config)
    outputs.write_text(layout.config, text)
    log.debug("settings:\n%s", text)


def intrinsics(args):
    from densify.io.cameras import parse_intrinsics_arg

    return parse_intrinsics_arg(args.intrinsics) if getattr(args, "intrinsics", None) else None


def console():
    from rich.console import Console

    return Console(file=sys.stdout, highlight=False, soft_wrap=True)


def esc(value) -> str:
    """Text for a rich console as it is: brackets in messages (`[fx, fy, cx, cy]`) are not markup."""
    from rich.markup import escape

    return escape(str(value))


def written(out, names: list[str]) -> str:
    """`outputs in OUT (a, b, ...)` listing only the files and folders that exist."""
    root = Path(out)
    have = [n for n in names if (root / n.rstrip("/")).exists()]
    return f"outputs in {esc(out)}" + (f" ({', '.join(have)})" if have else " (none written)")


def report(summary: dict):
    """A console for a run's report, opened with the simulated-engine note when the run used it."""
    c = console()
    if summary.get("simulated"):
        c.print(f"[yellow]{SIMULATED_NOTE}[/]")
    return c


def print_failures(c, failed: list[dict], total: int, where: str, limit: int = 20) -> None:
    for f in failed[:limit]:
        c.print(f"  [red]failed[/] {esc(f['id'])} ({esc(f['kind'])}): {esc(f['error'])}")
    if total > limit:
        c.print(f"  ... and {total - limit} more in {esc(where)}")


def progress(total: int, label: str = "images", every_s: float = 10.0):
    from densify.io.progress import Progress

    return Progress(total, label=label, every_s=every_s)


def out_path(args) -> Path:
    return Path(args.out)


def require_empty(folder: Path, what: str, overwrite: bool) -> None:
    """A folder to write a new thing into: missing or empty, else --overwrite; a file is refused by name."""
    from densify.io.layout import check_folder

    check_folder(folder, what)
    if folder.is_dir() and not overwrite and any(folder.iterdir()):
        raise ConfigError(f"{what} {folder}: the folder is not empty; give a new or empty folder, or pass "
                          f"--overwrite to write into it")


# -- pose and reconstruct

def add_pair_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p, profile=False, model_help="The depth checkpoint: a local folder or a hub name (default: "
                                                 "the depth profile's model, facebook/VLM3-depth).")
    p.add_argument("--corr-model", help="The correspondence checkpoint (default: the corr profile's model, "
                                        "facebook/VLM3-corr); --model sets the depth one.")
    p.add_argument("--pose-model", help="The pose checkpoint for --pose-source vlm or both (default: the pose "
                                        "profile's model, facebook/VLM3-pose).")
    p.add_argument("--pose-source", choices=["matches", "vlm", "both"],
                   help="Poses from RANSAC on the correspondence answers (matches, default), from the pose "
                        "profile's answers (vlm), or RANSAC cross-checked by the pose profile (both).")
    p.add_argument("--grid", type=int, nargs=2, metavar=("NX", "NY"),
                   help="Correspondence queries per pair as a grid over image 1 (default 24 18).")
    p.add_argument("--no-fb", action="store_true", help="Skip the forward-backward check (half the queries).")


def pair_overrides(args) -> list[Override]:
    """Settings of `densify pose` / `reconstruct` from their options (--model is the depth checkpoint,
    --corr-model and --pose-model the others)."""
    out = []
    if getattr(args, "engine", None):
        out.append(Override(("engine", "name"), args.engine, f"--engine {args.engine}"))
    for stage, option in (("depth", "model"), ("corr", "corr_model"), ("pose", "pose_model")):
        if getattr(args, option, None):
            flag = "--" + option.replace("_", "-")
            out.append(Override(("models", stage), getattr(args, option), f"{flag} {getattr(args, option)}"))
    if getattr(args, "pose_source", None):
        out.append(Override(("pose", "source"), args.pose_source, f"--pose-source {args.pose_source}"))
    if getattr(args, "grid", None):
        out.append(Override(("corr", "grid"), list(args.grid), f"--grid {args.grid[0]} {args.grid[1]}"))
    if getattr(args, "no_fb", False):
        out.append(Override(("corr", "fb_check"), False, "--no-fb"))
    if getattr(args, "no_depth", False):
        out.append(Override(("pose", "use_depth"), False, "--no-depth"))
    if getattr(args, "overwrite", False):
        out.append(Override(("overwrite",), True, "--overwrite"))
    return out
