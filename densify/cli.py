"""The `densify` command: one subcommand per pipeline in pipelines/."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from densify import __version__
from densify.config import ConfigError

# subcommand -> (module in pipelines/, help)
COMMANDS = {
    "demo": ("pipelines.demo", "render a synthetic scene and run the depth pipeline on it (simulated engine)"),
    "depth": ("pipelines.depth", "dense metric depth maps and point clouds for images"),
    "prompts": ("pipelines.prompts", "print the exact prompts a profile sends for given points"),
    "eval": ("pipelines.evaluate", "evaluate an engine on labelled data (iBims-1 / DepthLM JSONL)"),
    "ask": ("pipelines.ask", "object questions about image regions: the object model's and the geometry's answers"),
    "pose": ("pipelines.pose", "relative pose of two images from correspondence answers"),
    "reconstruct": ("pipelines.reconstruct", "depth, poses and a fused scene for an image sequence"),
    "label": ("pipelines.label", "pseudo-label a dataset as a resumable batch job"),
    "synth": ("pipelines.synth", "render a seeded synthetic scene (images, depth, intrinsics, poses)"),
    "make-model": ("pipelines.make_model", "build a synthetic Qwen3-VL model folder (tokenizer, config, ...)"),
}


class _Unavailable:
    def __init__(self, name: str, exc: ImportError):
        self.name, self.exc = name, exc
        self.__doc__ = f"unavailable here: {exc}"

    def add_arguments(self, p) -> None:
        p.add_argument("rest", nargs=argparse.REMAINDER)

    def run(self, args) -> int:
        print(f"densify {self.name}: needs a package that is not installed ({self.exc}); "
              f"install densify's extras (scripts/setup.sh)", file=sys.stderr)
        return 2


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="densify", description="Dense 3D outputs from point-query VLMs.")
    parser.add_argument("--version", action="version", version=f"densify {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (modname, help_) in COMMANDS.items():
        try:
            mod = importlib.import_module(modname)
        except ImportError as exc:
            if getattr(exc, "name", None) == modname:  # pipeline not part of this build
                continue
            # A missing optional dependency (e.g. Open3D on a GPU host) disables only that command.
            mod = _Unavailable(name, exc)
        p = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip().splitlines()[0])
        mod.add_arguments(p)
        modules[name] = mod
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(modules[args.command].run(args) or 0)
    except (ConfigError, KeyError, FileNotFoundError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"densify {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
