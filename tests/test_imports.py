"""No import cycles among diffrl's and rewards' modules, counting every import: module level, inside functions and
under TYPE_CHECKING (a lower layer that imports a higher one, even lazily, is a cycle in the design)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("diffrl", "rewards"):
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path], own: str) -> set[str]:
    """The package modules this file imports, each `a.b.c` import also counting its packages `a` and `a.b`
    (except the file's own packages, which Python imports first anyway, unless the file names them itself)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    packages = {".".join(name.split(".")[:k]) for name in names for k in range(1, name.count(".") + 1)}
    packages = {package for package in packages if not own.startswith(package + ".")}
    return {target for target in names | packages if target in modules and target != own}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                components.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(path, modules, name) for name, path in modules.items()}
    assert "diffrl.trainers.pairs" in graph and "diffrl.prompt_order" in graph["diffrl.trainers.pairs"]
    assert _cycles(graph) == []
