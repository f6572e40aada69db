"""The library's shape: no import cycles (deferred imports inside functions count: they only hide a cycle),
and no file much over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shardllama", "workers")
MAX_LINES = 450  # "~400": a file past this holds more than one job


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            mods[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return mods


def _imports(tree: ast.AST, package: list[str], mods) -> set[str]:
    """Modules of ours that ``tree`` imports anywhere, except under ``if TYPE_CHECKING:``."""
    found = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:
                found.add(f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module)
        todo.extend(ast.iter_child_nodes(node))
    return {m for m in found if m in mods}


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, (path, is_package) in mods.items():
        package = name.split(".") if is_package else name.split(".")[:-1]
        graph[name] = _imports(ast.parse(path.read_text()), package, mods) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["shardllama.engine.requests"].add("shardllama.engine.loop")  # loop imports requests
    assert any("shardllama.engine.loop" in c for c in cycles(graph))


def test_no_library_file_is_much_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p, _ in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
