"""The house's order, read from the source (ast): no module imports itself around a circle, neither do the
packages, and no module reaches into another package's private names. Imports under `if TYPE_CHECKING:` are
for type checkers only and are left out; imports inside functions count (they are for start-up time, never
to dodge a circle).

The order, lowest first: errors < fileio < config < data, model, lecture, dropout, machine, runtime < storage <
inference, training < serve < cli; `chargpt` itself (the public API) imports its names lazily."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "chargpt"


def _modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(("chargpt", *parts)).removesuffix(".__init__")
        found[name] = path
    return found


MODULES = _modules()


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import of the file but those for type checkers."""
    found: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return [(m, names) for m, names in found if m == "chargpt" or m.startswith("chargpt.")]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        deps = set()
        for module, names in _imports(path):
            for imported in names or [""]:
                full = f"{module}.{imported}"
                deps.add(full if full in MODULES else module)  # `from chargpt.storage import layout`: the module
        graph[name] = {d for d in deps if d in MODULES and d != name}
    return graph


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "chargpt"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of the graph, if it has one."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_itself_around_a_circle():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()) or [])


def test_the_packages_have_an_order():
    packages: dict[str, set[str]] = {}
    for module, deps in _graph().items():
        packages.setdefault(_package(module), set()).update(
            _package(d) for d in deps if _package(d) != _package(module) and _package(d) != "chargpt"
        )
    assert _cycle(packages) is None, " -> ".join(_cycle(packages) or [])
    assert not packages["errors"] and packages["fileio"] == {"errors"} and packages["config"] <= {"errors", "fileio"}


def test_no_module_takes_another_packages_private_names():
    taken = []
    for name, path in MODULES.items():
        for module, names in _imports(path):
            if _package(module) == _package(name):
                continue
            taken += [f"{name} takes {module}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    assert taken == []


def test_the_server_schedules_and_leaves_the_decoders_state_to_inference():
    """serve/ is typed without `type: ignore`, never writes a decoder's cache length or position itself, and
    leaves the cache pool, its slots and the batched step to inference.generate.BatchDecoder: it imports no
    KV cache, Rows or one-token step."""
    for path in (SRC / "serve").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "type: ignore" not in text, path.name
        assert ".cache.length" not in text and ".seen =" not in text, path.name
        imported = {n for _, names in _imports(path) for n in names}
        assert not imported & {"KVCache", "Rows", "DecodeStep"}, (path.name, imported)


def test_the_models_math_and_the_runs_plan_each_live_in_one_place():
    """Embedding, LayerNorm and attention are torch calls in model.py only (and in lecture.py, the lecture's model
    written out on purpose); the command line neither sizes a model nor resolves a preset: it asks the planner."""
    math = (
        "F.embedding",
        "nn.Embedding",
        "nn.LayerNorm",
        "F.layer_norm",
        "torch.layer_norm",
        "scaled_dot_product_attention",
    )
    for name, path in MODULES.items():
        if name in ("chargpt.model", "chargpt.lecture"):
            continue
        code = "\n".join(line.split("#")[0] for line in path.read_text(encoding="utf-8").splitlines())
        calls = [m for m in math if m in code]
        assert not calls, f"{name} calls {calls}"
    for path in (SRC / "cli").glob("*.py"):
        code = path.read_text(encoding="utf-8")
        assert "resolve_preset" not in code and "sizing.choose" not in code and "for_budget" not in code, path.name
        assert "sizing.measure" not in code, path.name


# the modules outside cli/ that import inside functions, and why (start-up time, or an optional extra)
LAZY = {
    "chargpt": "the public API names load on first use: `import chargpt` stays light",
    "chargpt.training.sizing": "the parser reads its constants for --help without torch",
    "chargpt.machine.devices": "device names are checked at start-up without torch",
    "chargpt.training.report": "matplotlib (a second of import) only when a plot is drawn",
    "chargpt.inference.export": "onnx, the optional export extra",
}


def test_imports_inside_functions_only_where_start_up_needs_them():
    """Imports go at the top of a module, except in cli/ (each command imports what it runs, so that --help and a
    bad flag answer without torch) and in the modules of LAZY, each for the reason given there."""
    inside = []
    for name, path in MODULES.items():
        if name.startswith("chargpt.cli") or name in LAZY:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                inside += [f"{name}:{n.lineno}" for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert inside == []
