"""The `densify` command: one subcommand per module in pipelines/, and one place that turns errors into
messages and exit codes.

Exit codes: 0 done; 1 done, but some images, pairs or questions failed (see summary.json); 2 bad usage,
settings or input; 3 the engine is unavailable (no model, a missing package, an unreachable server or
cluster, a refused key, a Ray pool larger than the cluster); 4 the output folder or answer store is held by
another job, or the store is damaged; 5 the engine failed during the run; 74 outputs or the answer store
could not be written (disk full, permissions); 70 an internal error (a bug:
please report it with the --debug traceback); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM). In the
last two cases the finished work is kept and the summary says what finished; rerun the command to resume.
`--debug` (or DENSIFY_DEBUG=1) prints the traceback of any error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import traceback

from densify import __version__

# subcommand -> (module in pipelines/, help)
COMMANDS = {
    "demo": ("pipelines.demo", "Render a synthetic scene and run the depth stage on it with the simulated engine."),
    "depth": ("pipelines.depth", "Dense metric depth maps and point clouds for images."),
    "prompts": ("pipelines.prompts", "Print the exact prompts a profile sends for given points."),
    "eval": ("pipelines.evaluate", "Score an engine on labelled data (iBims-1 points, SpatialRGPT-Bench questions)."),
    "ask": ("pipelines.ask", "Object questions about image regions: the object model's and the geometry's answers."),
    "pose": ("pipelines.pose", "Relative pose of two images from correspondence answers."),
    "reconstruct": ("pipelines.reconstruct", "Depth, poses and a fused scene for an image sequence."),
    "label": ("pipelines.label", "Pseudo-label a dataset as a resumable batch job."),
    "synth": ("pipelines.synth", "Render a seeded synthetic scene (images, depth, intrinsics, poses)."),
    "make-model": ("pipelines.make_model", "Build a synthetic Qwen3-VL model folder (tests, benchmarks)."),
}

EXIT_FAILED_ITEMS, EXIT_USAGE, EXIT_ENGINE_UNAVAILABLE, EXIT_STORE, EXIT_ENGINE_FAILED = 1, 2, 3, 4, 5
EXIT_INTERNAL, EXIT_IO, EXIT_INTERRUPTED, EXIT_TERMINATED = 70, 74, 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every command's cleanup and summary run."""


class _Unavailable:
    def __init__(self, name: str, exc: ImportError):
        self.name, self.exc = name, exc
        self.__doc__ = f"unavailable here: {exc}"

    def add_arguments(self, p) -> None:
        p.add_argument("rest", nargs=argparse.REMAINDER)

    def run(self, args) -> int:
        raise ImportError(f"densify {self.name} needs a package that is not installed ({self.exc}); install "
                          f"densify's extras (scripts/setup.sh)")


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="densify", description="Dense 3D outputs from point-query VLMs.",
                                     epilog="Exit codes: 0 done, 1 some items failed, 2 bad usage or input, 3 engine "
                                            "unavailable, 4 output folder or answer store held by another job (or store damaged), 5 engine failed, 74 cannot write "
                                            "outputs, 130/143 interrupted (work kept; rerun to resume).")
    parser.add_argument("--version", action="version", version=f"densify {__version__}")
    _add_global_args(parser, False)
    after = argparse.ArgumentParser(add_help=False)  # the same options after the subcommand (`densify depth ... -v`)
    _add_global_args(after, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (modname, help_) in COMMANDS.items():
        try:
            mod = importlib.import_module(modname)
        except ImportError as exc:
            if getattr(exc, "name", None) == modname:  # command not part of this build
                continue
            mod = _Unavailable(name, exc)  # a missing optional dependency disables only that command
        p = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip().splitlines()[0],
                           parents=[after])
        mod.add_arguments(p)
        modules[name] = mod
    return parser, modules


def _add_global_args(p: argparse.ArgumentParser, default) -> None:
    """-v, -q and --debug; after a subcommand their default is SUPPRESS, so one given before it still counts."""
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="Debug logging, including the settings used.")
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="Warnings and errors only.")
    p.add_argument("--debug", action="store_true", default=default,
                   help="Print the traceback of any error (or DENSIFY_DEBUG=1).")


_terminated = False  # a SIGTERM came: libraries that catch and re-raise interrupts (Ray) may drop our class


def _on_sigterm(signum, frame):
    global _terminated
    _terminated = True
    raise Terminated()


def exit_code(exc: BaseException) -> int:
    from densify.config.loading import ConfigError
    from densify.engines.base import EngineError, EngineStartError
    from densify.engines.store import StoreError, StoreFullError
    from densify.io.cameras import CameraError
    from densify.io.images import ImageError
    from densify.io.lock import OutputLockedError
    from densify.queries.plan import PlanError

    if isinstance(exc, Terminated) or (isinstance(exc, KeyboardInterrupt) and _terminated):
        return EXIT_TERMINATED
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, (EngineStartError, ImportError)):
        return EXIT_ENGINE_UNAVAILABLE
    if isinstance(exc, StoreFullError):
        return EXIT_IO  # a full disk, as for any output
    if isinstance(exc, (StoreError, OutputLockedError)):
        return EXIT_STORE
    if isinstance(exc, EngineError):
        return EXIT_ENGINE_FAILED
    if isinstance(exc, (ConfigError, ImageError, CameraError, PlanError, ValueError, KeyError, FileNotFoundError,
                        NotADirectoryError, IsADirectoryError)):
        return EXIT_USAGE
    if isinstance(exc, OSError):
        return EXIT_IO
    return EXIT_INTERNAL


def message(command: str, exc: BaseException, code: int) -> str:
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        what = "interrupted" if code == EXIT_INTERRUPTED else "terminated"
        return (f"densify {command}: {what}; finished work is kept and the summary says what finished; run the "
                f"same command again to resume")
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    if code == EXIT_INTERNAL:
        return (f"densify {command}: internal error: {type(exc).__name__}: {text}; run again with --debug for the "
                f"traceback and please report it")
    if code == EXIT_IO:
        return f"densify {command}: cannot write outputs: {text}; free space or fix permissions, then rerun to resume"
    return f"densify {command}: error: {text}"


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("DENSIFY_DEBUG", "") not in ("", "0")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    global _terminated
    _terminated = False
    old = signal.signal(signal.SIGTERM, _on_sigterm) if hasattr(signal, "SIGTERM") else None
    try:
        return int(modules[args.command].run(args) or 0)
    except BaseException as exc:  # noqa: BLE001 - every error ends here as one message and an exit code
        if isinstance(exc, SystemExit):
            raise
        code = exit_code(exc)
        if debug:
            traceback.print_exc()
        print(message(args.command, exc, code), file=sys.stderr)
        return code
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
