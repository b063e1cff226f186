"""Which names a vLLM build imports from transformers that the installed transformers lacks.

    python -m benchmarks.transformers_names [VLLM_SOURCE_DIR] [--only pixtral,qwen3_vl] [--brief]

vLLM pins only a lower bound on transformers, and transformers renames and drops helpers that vLLM's model
files import. Such a mismatch shows up late, as an import error in vLLM's model registry subprocess while an
engine starts. This check reads every `from transformers... import NAME` in the vLLM sources (installed vllm
package by default) and reports each one the installed transformers cannot give. A module that fails to
import for lack of an optional dependency (torchvision and the like) is reported apart, not as missing.
Exit 1 when a name is missing.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import sys
from pathlib import Path


def imported_names(root: Path, only: list[str] | None = None) -> dict[tuple[str, str], list[str]]:
    """(module, name) -> the files under root that import it from a transformers module."""
    out: dict[tuple[str, str], set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root))
        if only and not any(o in rel for o in only):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.ImportFrom) and node.level == 0
                    and (node.module or "").split(".")[0] == "transformers"):
                for alias in node.names:
                    out.setdefault((node.module, alias.name), set()).add(rel)
    return {k: sorted(v) for k, v in out.items()}


def check(names: dict[tuple[str, str], list[str]]) -> dict:
    """Each imported name resolved against the installed transformers: missing, or not checkable (its module
    needs a package that is not installed)."""
    missing, unchecked = [], []
    for (module, name), files in sorted(names.items()):
        try:
            mod = importlib.import_module(module)
            found = hasattr(mod, name) or (hasattr(mod, "__path__")  # a submodule of a package
                                           and importlib.util.find_spec(f"{module}.{name}") is not None)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] == "transformers":  # the module itself is gone
                missing.append({"module": module, "name": name, "files": files, "why": "no such module"})
            else:
                unchecked.append({"module": module, "name": name, "needs": exc.name})
            continue
        except Exception as exc:  # noqa: BLE001 - a module that fails to import for another reason
            unchecked.append({"module": module, "name": name, "needs": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        if not found:
            missing.append({"module": module, "name": name, "files": files, "why": "no such name"})
    import transformers

    return {"transformers": transformers.__version__, "imports": len(names), "missing": missing,
            "unchecked": unchecked}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", nargs="?", help="vLLM's package folder (default: the installed vllm's)")
    ap.add_argument("--only", help="comma-separated parts of file paths to check (e.g. pixtral,qwen3_vl)")
    ap.add_argument("--brief", action="store_true", help="one line: the transformers version and the missing names")
    args = ap.parse_args(argv)
    if args.source:
        root = Path(args.source)
    else:
        spec = importlib.util.find_spec("vllm")
        if spec is None or not spec.submodule_search_locations:
            ap.error("vllm is not installed here: give its package folder")
        root = Path(list(spec.submodule_search_locations)[0])
    if not root.is_dir():
        ap.error(f"{root}: not a folder")
    only = [o.strip() for o in args.only.split(",")] if args.only else None
    report = check(imported_names(root, only))
    if args.brief:
        names = [f"{m['module']}.{m['name']}" for m in report["missing"]]
        print(f"vllm's imports missing from transformers {report['transformers']}: {', '.join(names) or 'none'}")
    else:
        print(json.dumps(report, indent=1))
    return 1 if report["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
