"""The layers hold: commands are thin and independent, stages never import commands, ground truth stays with
the simulator, engines share one base class and register once with typed options that README documents."""

import ast
import inspect
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path, late: bool = True) -> set[str]:
    """Every module a file names: import statements, `import_module("x")` calls and (unless not `late`)
    the "module:Class" names of a registry, which load on first use."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.add(node.args[0].value)
        elif late and isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = re.fullmatch(r"((?:densify|pipelines)(?:\.\w+)+):\w+", node.value)
            if m:
                out.add(m.group(1))
    return out


def _module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _module_of(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _library_graph() -> dict[str, set[str]]:
    """densify module -> the densify modules it names (a name that is a module's attribute counts as the
    module)."""
    graph = {}
    for f in (REPO / "densify").rglob("*.py"):
        deps = set()
        for m in _imports(f, late=False):
            while m and _module_file(m) is None:
                m = m.rpartition(".")[0]
            if m.startswith("densify.") and m != _module_of(f):
                deps.add(m)
        graph[_module_of(f)] = deps
    return graph


ENTRY = {"cli.py", "__main__.py", "__init__.py", "common.py"}


def test_commands_import_no_other_command_and_the_library_no_command():
    """Commands are independent; the entry point (pipelines/cli.py) is the one place that names them; the
    library never names the command layer, not even in a string."""
    for f in (REPO / "pipelines").glob("*.py"):
        if f.name in ENTRY:
            continue
        bad = {m for m in _imports(f) if m.startswith("pipelines") and m not in ("pipelines", "pipelines.common")}
        assert not bad, (f.name, bad)
    for f in (REPO / "densify").rglob("*.py"):
        bad = {m for m in _imports(f) if m.startswith("pipelines")}
        assert not bad, (f, bad)
        assert not re.search(r"(?<![\w.])pipelines\.\w", f.read_text()), f


def test_no_module_imports_back_up():
    """The library's modules form no loop: every arrow runs down (`import_module` calls count; a registry's
    "module:Class" names are bound late, when an engine is built, and do not)."""
    graph = _library_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError(f"import loop: {' -> '.join(stack[stack.index(d):] + [d])}")
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_packages_form_floors():
    """Between packages too every arrow runs down: the package graph (densify.io, densify.queries, ...) has
    no loop, so each package stands on a floor above all it imports (docs/architecture.md)."""
    def package(m: str) -> str:
        return ".".join(m.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for m, deps in _library_graph().items():
        graph.setdefault(package(m), set()).update(package(d) for d in deps if package(d) != package(m))
    graph.pop("densify", None)  # the facade's lazy face
    done: set[str] = set()

    def floor(p: str, path: tuple) -> None:
        if p in path:
            raise AssertionError(f"packages import each other: {' -> '.join(path[path.index(p):] + (p,))}")
        if p not in done:
            for d in graph.get(p, ()):
                floor(d, path + (p,))
            done.add(p)

    for p in sorted(graph):
        floor(p, ())


def test_packages_say_what_lives_there():
    for init in (REPO / "densify").glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, f"{init}: a docstring saying what lives there and what it may import"


def test_ground_truth_stays_with_the_simulator():
    """No module of the real data path mentions truth: questions, pairs, objects, engines, io, stages,
    commands (but the demo, which renders its own scene)."""
    real = []
    for pkg in ("queries", "pairs", "objects", "engines", "io", "stages", "fields", "config"):
        real += list((REPO / "densify" / pkg).rglob("*.py"))
    real += [REPO / "densify" / "api.py"]
    real += [f for f in (REPO / "pipelines").glob("*.py") if f.name != "demo.py"]
    for f in real:
        names = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Name):
                names.add(node.id)
            elif isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, (ast.arg, ast.keyword)) and node.arg:
                names.add(node.arg)
            elif isinstance(node, ast.alias):
                names.add(node.asname or node.name)
        assert not {n for n in names if "truth" in n.lower()}, f
    from densify.engines.base import PromptImage

    assert "truth" not in {f.name for f in __import__("dataclasses").fields(PromptImage)}


def test_every_engine_subclasses_engine_and_takes_its_typed_options():
    """Each registered engine subclasses Engine and is built from its typed options as they are:
    `(profile, options=None, *, <Python-only arguments>, **keyword options)`. Its options model names it,
    holds every option and its one default (the constructor repeats none), and lists the Python-only
    arguments the constructor takes besides; the engine's name and simulated flag are its options'."""
    from densify.engines import Engine, EngineOptions
    from densify.engines.registry import _ENGINES, engine_class, options_model

    for name in _ENGINES:
        cls, model = engine_class(name), options_model(name)
        assert issubclass(cls, Engine) and issubclass(model, EngineOptions), name
        assert model.engine_name == name == cls.name and cls.simulated == model.simulated, name
        params = inspect.signature(cls.__init__).parameters
        assert list(params)[:3] == ["self", "profile", "options"], (name, list(params))
        assert params["options"].default is None
        assert any(p.kind == p.VAR_KEYWORD for p in params.values()), name  # the options as keywords
        kw_only = {k: p for k, p in params.items() if p.kind == p.KEYWORD_ONLY}
        assert model.runtime <= set(kw_only), (name, model.runtime - set(kw_only))
        for k, p in kw_only.items():  # Python-only arguments, or an option's keyword form without a default
            assert k in model.runtime or (k in model.model_fields and p.default is None), (name, k)


def test_engine_names_appear_only_in_their_own_modules():
    """An engine's name as a string literal (a branch on the engine: `== "ray"`, `create_engine("simulated")`)
    appears only in its own engine and options modules and on its registry line; everything else asks its
    options (answering, simulated, with_model, answer_identity, needs_checkpoint, for_shared_gpu). Record
    fields that happen to share a name (`summary["simulated"]`, `{"ray": ...}` beside other keys,
    `getattr(e, "simulated")`, a settings path such as `("ray", "address")`) are not engine names."""
    own = {"vllm": {"engines/vllm.py", "engines/vllm_fast.py", "engines/vllm_memory.py", "engines/options.py"},
           "hf": {"engines/hf.py", "engines/options.py"}, "openai": {"engines/openai.py", "engines/options.py"},
           "ray": {"engines/ray_pool.py", "engines/ray_actor.py", "engines/options.py"},
           "simulated": {"sim/engine.py", "sim/options.py"}}
    registry = "engines/registry.py"
    bad = []
    for f in sorted(list((REPO / "densify").rglob("*.py")) + list((REPO / "pipelines").glob("*.py"))):
        rel = str(f.relative_to(REPO / "densify")) if f.is_relative_to(REPO / "densify") else str(f.relative_to(REPO))
        tree = ast.parse(f.read_text())
        parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
        entry_lines = {}  # registry: line -> the engine of its _ENGINES entry
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_ENGINES" for t in node.targets):
                entry_lines = {k.lineno: k.value for k in node.value.keys}
            if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "_ENGINES":
                entry_lines = {k.lineno: k.value for k in node.value.keys}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Constant) and node.value in own):
                continue
            if rel in own[node.value] or (rel == registry and entry_lines.get(node.lineno) == node.value):
                continue
            if not _names_a_record_field(node, parents, set(own)):
                bad.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert not bad, bad


def _names_a_record_field(node, parents, names: set) -> bool:
    p = parents.get(node)
    if isinstance(p, ast.Dict) and node in p.keys:  # a key beside other keys (a table keyed by engine is not)
        return not all(isinstance(k, ast.Constant) and k.value in names for k in p.keys)
    if isinstance(p, ast.Subscript) and p.slice is node:
        return True
    if isinstance(p, ast.Call) and p.args and p.args[0] is node and getattr(p.func, "attr", "") in ("get", "pop"):
        return True
    if isinstance(p, ast.Call) and len(p.args) > 1 and p.args[1] is node and getattr(p.func, "id", "") in (
            "getattr", "hasattr"):
        return True
    if isinstance(p, ast.Tuple):  # a settings path: Override(("ray", "address"), ...)
        call = parents.get(p)
        return isinstance(call, ast.Call) and getattr(call.func, "id", "") == "Override" and call.args[0] is p
    return False


def test_readme_engine_tables_match_the_typed_options():
    from densify.engines.registry import _ENGINES, options_model

    readme = (REPO / "README.md").read_text()
    for name in _ENGINES:
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, f"README has no engine row for {name}"
        options = set(re.findall(r"`([a-z_]+)`", row.split("|")[3]))
        assert options == set(options_model(name).model_fields), (name, options ^ set(options_model(name).model_fields))


def test_help_texts_are_sentences():
    from pipelines.cli import build_parser

    _, modules = build_parser()
    parser, _ = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        for a in p._actions:
            if a.help and a.help != "==SUPPRESS==" and a.dest != "help":
                assert a.help[0].isupper() and a.help.rstrip().endswith((".", ")")), (name, a.dest, a.help)


def test_one_facade_with_keyword_only_options():
    import densify

    assert set(densify.__all__) >= {"Densifier", "DepthMap", "RelativePose", "SceneResult"}
    params = inspect.signature(densify.Densifier.__init__).parameters
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for k, p in params.items() if k != "self")


@pytest.mark.parametrize("bad, words", [
    ({"nosie": False}, ["engine.options.nosie", "did you mean 'noise'"]),
    ({"seed": "x"}, ["engine.options.seed"]),
])
def test_engine_options_are_checked_when_the_config_loads(bad, words):
    from densify.config.loading import ConfigError, dict_overrides
    from densify.stages.settings import DepthConfig, load_config

    with pytest.raises(ConfigError) as e:
        load_config(DepthConfig, None, dict_overrides({"engine": {"name": "simulated", "options": bad}}),
                    default_name="depth")
    for w in words:
        assert w in str(e.value)


def test_fingerprint_ignores_transport_options():
    from densify.config.profiles import load_profile
    from densify.stages.depth import settings_fingerprint
    from densify.stages.settings import DepthConfig

    p = load_profile("vlm3-depth")
    fp = lambda **o: settings_fingerprint(DepthConfig(engine={"name": "vllm", "options": o}), p)  # noqa: E731
    assert fp(gpu_memory_utilization=0.5, max_num_seqs=8) == fp()
    assert fp(quantization="fp8") != fp()
    ray = DepthConfig(engine={"name": "ray", "options": {"engine": "vllm", "num_actors": 4}})
    assert settings_fingerprint(ray, p) == fp()  # a pool answers as the engine its actors run


def test_stage_functions_are_short():
    """The stages read top to bottom: no function (closures included) longer than 60 lines."""
    long = []
    for f in sorted((REPO / "densify" / "stages").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{f.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
