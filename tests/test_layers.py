"""The floors' import rule (docs/architecture.md): ``lens/`` (the user's door) -> ``flows/``
-> ``tasks/`` -> ``lens_model/``; imports point down only, and no modules import each other
in a cycle. Read from the source with ``ast``, so lazy imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOORS = ["lens", "flows", "tasks", "lens_model"]  # top to bottom


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """First-party module -> the first-party modules it imports (``from a import b`` counts as
    ``a.b`` when that is a module)."""
    files = {_module(p): p for floor in FLOORS for p in (REPO / floor).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files
                          else node.module for a in node.names}
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def test_imports_point_down_only() -> None:
    floor = {name: FLOORS.index(name.split(".")[0]) for name in _imports()}
    upward = sorted(f"{a} imports {b}" for a, deps in _imports().items() for b in deps
                    if floor[b] < floor[a])
    assert not upward, upward


def test_no_import_cycle() -> None:
    graph, state, cycles = _imports(), {}, []

    def visit(name: str, stack: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*stack[stack.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles
