"""Imports point down: the installed tree (``loopreg/``, ``callbacks/`` → ``loopreg.callbacks``, ``evals/`` →
``loopreg.evals``, as pyproject's package-dir maps them) parsed with ``ast``, every import counted (module level
and inside functions, relative ones resolved)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from .conftest import REPO

# The entries: what runs a recipe or a command. Nothing the data, the surgery, the callbacks or the evals are
# built from may import them.
ENTRIES = ("loopreg.train", "loopreg.cli", "loopreg.demo", "loopreg.reproduce")
LOWER_LAYERS = ("loopreg.data", "loopreg.surgery", "loopreg.callbacks", "loopreg.evals")


def installed_modules() -> dict[str, Path]:
    """Module name -> source file for every module of the installed packages."""
    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    modules = {}
    for package, folder in package_dirs.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = ".".join(base[:len(base) - node.level + 1]) if node.level else ""
            source = ".".join(part for part in (base, node.module or "") if part)
            for alias in node.names:  # `from pkg import module` imports the module, `from pkg import name` pkg
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source)
    return {module for module in found if module in known and module != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = installed_modules()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path that returns to its start) per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(_cycle_through(node, component, graph))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _cycle_through(start: str, component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """The shortest path start -> ... -> start inside ``component`` (breadth first)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def test_the_tree_is_found(graph):
    """Guards the test itself: the three package folders are parsed and imports resolve (a relative one too)."""
    assert {"loopreg.train", "loopreg.data.text", "loopreg.callbacks.export", "loopreg.evals.run"} <= set(graph)
    assert "loopreg.data.resumable" in graph["loopreg.data.text"]
    assert "loopreg.evals.catalog" in graph["loopreg.evals.run"]  # `from .catalog import ...`


def test_lower_layers_never_import_an_entry(graph):
    upward = sorted(f"{module} imports {target}" for module, targets in graph.items()
                    if module.startswith(LOWER_LAYERS) for target in targets if target in ENTRIES)
    assert not upward, "; ".join(upward)


def test_no_import_cycles(graph):
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in found)


def test_a_cycle_is_reported_with_its_path():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
