"""The package's layering, checked by parsing every module's imports (function-level imports included,
`if TYPE_CHECKING:` blocks excluded since they never run):

    base (errors, config, logging, checkpoint, runtime, data)
      -> ops -> nn (+ integrations: swap-in adapters) -> models -> methods (+ parallel: their distributed
      execution engines) -> training -> bench / reproduce / cli / generate / apply

A module may import its own layer or any layer below, never one above, and the runtime import graph
has no cycle. Registries that name modules as strings ('module:Class', imported on demand) are
dispatch tables, not imports: the code they load is reached through the registry's layer.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("chainfree.errors", "chainfree.config", "chainfree.logging", "chainfree.checkpoint",
              "chainfree.runtime", "chainfree.data")),
    ("ops", ("chainfree.ops",)),
    ("nn", ("chainfree.nn", "chainfree.integrations")),
    ("models", ("chainfree.models",)),
    ("methods", ("chainfree.methods", "chainfree.parallel")),
    ("training", ("chainfree.training", "chainfree.train")),
    ("app", ("chainfree.bench", "chainfree.reproduce", "chainfree.cli", "chainfree.generate", "chainfree.apply")),
]

# Known upward imports, each to be removed by moving code; the test fails when one disappears (so the list
# shrinks) or a new one appears.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def layer_of(module: str) -> int | None:
    """Index of the module's layer; None for the package root (a facade of lazy re-exports)."""
    if module == "chainfree":
        return None
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in tests/test_layering.py")


def modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in (SRC / "chainfree").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return found


def _runtime_nodes(tree: ast.AST):
    """All nodes except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, is_pkg: bool, known: dict) -> set[str]:
    package = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                out.add(full if full in known else target)
    return {m for m in out if m in known and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, is_pkg, known) for name, (path, is_pkg) in known.items()}


def test_every_module_has_a_layer(graph):
    for name in graph:
        layer_of(name)


def test_no_upward_import(graph):
    upward = set()
    for name, targets in graph.items():
        here = layer_of(name)
        for target in targets:
            there = layer_of(target)
            if here is not None and there is not None and there > here:
                upward.add((name, target))
    new = sorted(upward - KNOWN_UPWARD)
    assert not new, "upward imports: " + "; ".join(f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} "
                                                   f"({LAYERS[layer_of(b)][0]})" for a, b in new)
    fixed = sorted(KNOWN_UPWARD - upward)
    assert not fixed, f"no longer upward, remove from KNOWN_UPWARD: {fixed}"


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycle(graph):
    assert not import_cycles(graph), f"import cycles: {import_cycles(graph)}"


def test_the_cycle_finder_finds_cycles():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set()}
    assert import_cycles(g) == [["a", "b", "c"]]


def test_the_parser_sees_function_level_imports_and_skips_type_checking(tmp_path):
    pkg = tmp_path / "chainfree"
    pkg.mkdir()
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import chainfree.b\n"
                              "def f():\n    from chainfree import c\n")
    (pkg / "b.py").write_text("")
    (pkg / "c.py").write_text("")
    known = {"chainfree.a": None, "chainfree.b": None, "chainfree.c": None}
    assert imports_of("chainfree.a", pkg / "a.py", False, known) == {"chainfree.c"}
