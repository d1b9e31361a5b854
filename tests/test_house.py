"""The shape of the package: imports flow one way, functions fit on a screen.

Both read the source (no import), so they fail on the file and line to fix.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hf_ratequant"
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside `if TYPE_CHECKING:` blocks (never run: annotations only)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped.update(id(n) for n in ast.walk(child))
    return skipped


def _imports(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The package modules `name` imports anywhere in its file (functions included), with the first line of each."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        targets = []
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            stem = ".".join(base + ([node.module] if node.module else []))
            subs = [f"{stem}.{a.name}" for a in node.names if f"{stem}.{a.name}" in modules]
            targets = subs if len(subs) == len(node.names) else [stem, *subs]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_ratequant"):
            targets = [node.module]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("hf_ratequant")]
        for target in targets:
            if target in modules and target != name:
                found.setdefault(target, node.lineno)
    return found


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle through every strongly connected group of modules (Tarjan's algorithm, then a path inside each)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in graph:
        if node not in index:
            connect(node)
    return [_path_back(graph, group) for group in groups]


def _path_back(graph: dict[str, dict[str, int]], group: set[str]) -> list[str]:
    """The shortest cycle inside `group` through its first member (breadth first)."""
    start = min(group)
    previous = {start: None}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for nxt in graph[node]:
            if nxt == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, node, start][1:]
            if nxt in group and nxt not in previous:
                previous[nxt] = node
                frontier.append(nxt)
    return sorted(group)


def test_no_import_cycle_inside_the_package():
    """A module never imports, directly or through others, a module that imports it back: not at module level and
    not inside a function (a deferred import is still a dependency). The package's `__init__` re-exports the public
    API, so imports of the bare package from inside it are cycles too."""
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    cycles = _cycles(graph)
    report = []
    for cycle in cycles:
        report.append(" -> ".join(cycle) + ":")
        report += [f"    {a} -> {b}: line {graph[a][b]} of {modules[a].relative_to(PACKAGE.parent)}"
                   for a, b in zip(cycle, cycle[1:])]
    assert not cycles, "import cycles:\n  " + "\n  ".join(report)


def test_functions_fit_on_a_screen():
    too_long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) else node.body  # the docstring does not count
                lines = (body[-1].end_lineno - body[0].lineno + 1) if body else 0
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (docstring excluded):\n  " + "\n  ".join(too_long)


def test_the_cycle_finder_sees_a_cycle():
    """The finder itself: a three-module loop beside a clean branch is reported, once, as a closed path."""
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"a": 5}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []
