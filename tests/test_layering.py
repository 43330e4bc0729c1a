"""The import structure the tree promises (docs/design.md, "Layers"): no cycles, dependencies pointing down.

Imports are read from the source (module level and inside functions alike), so a function-local import
cannot hide a cycle.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> the package it installs as (pyproject's package-dir)
PACKAGES = {"fxquant": "fxquant", "passes": "fxquant.passes", "backends": "fxquant.backends"}
#: modules every other module may rely on; they import nothing of fxquant except the errors
LEAVES = (
    "fxquant.errors", "fxquant.batching", "fxquant.bits", "fxquant.validate", "fxquant.version", "fxquant.tvm_host",
    "fxquant.placement", "fxquant.conv_geometry", "fxquant.io.output_files",
)
#: (importer prefix, imported prefix): dependencies that would point the wrong way
FORBIDDEN = [
    ("fxquant.quantizers", "fxquant.backends"),
    ("fxquant.quantizers", "fxquant.passes"),
    ("fxquant.quantizers", "fxquant.layers"),
    ("fxquant.quantizers", "fxquant.config"),
    ("fxquant.layers", "fxquant.passes"),
    ("fxquant.layers", "fxquant.backends"),
    ("fxquant.integer", "fxquant.passes"),
    ("fxquant.integer", "fxquant.backends"),
    ("fxquant.passes", "fxquant.backends"),
    ("fxquant.passes", "fxquant.api"),
    ("fxquant.passes", "fxquant.sdq"),
    ("fxquant.passes", "fxquant.training"),
    ("fxquant.passes", "fxquant.io"),
    ("fxquant.backends", "fxquant.sdq"),
    ("fxquant.backends", "fxquant.training"),
    ("fxquant.backends", "fxquant.cli"),
    ("fxquant.backends", "fxquant.io.checkpoint"),
    ("fxquant.backends", "fxquant.io.run_report"),
    ("fxquant.backends", "fxquant.io.config_file"),
    ("fxquant.training", "fxquant.cli"),
    ("fxquant.sdq", "fxquant.cli"),
    ("fxquant.io", "fxquant.cli"),
    ("fxquant.api", "fxquant.io"),
    ("fxquant.api", "fxquant.sdq"),
    ("fxquant.api", "fxquant.training"),
]


@functools.cache
def _modules() -> dict[str, Path]:
    mods = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([package, *parts])] = path
    return mods


def _target(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> nx.DiGraph:
    """fxquant module -> fxquant modules it imports (``from package import submodule`` counts the submodule)."""
    mods = _modules()
    graph = nx.DiGraph()
    for module, path in mods.items():
        graph.add_node(module)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for name in names:
                target = _target(name, mods)
                if target is not None and target != module:
                    graph.add_edge(module, target)
    return graph


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    return import_graph()


def test_the_graph_is_read(graph: nx.DiGraph) -> None:
    assert graph.has_edge("fxquant.api", "fxquant.config")
    assert graph.has_edge("fxquant.passes.freeze", "fxquant.integer")
    assert graph.number_of_nodes() > 80


def test_no_import_cycles(graph: nx.DiGraph) -> None:
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_only_the_command_line_imports_the_package_root(graph: nx.DiGraph) -> None:
    """``fxquant/__init__.py`` is the public surface: the library imports what it uses from where it lives;
    only the commands (the top layer, written as a user would) use the public names."""
    assert [m for m in graph.predecessors("fxquant") if not m.startswith("fxquant.cli.")] == []


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_modules_import_only_errors(graph: nx.DiGraph, leaf: str) -> None:
    assert set(graph.successors(leaf)) <= {"fxquant.errors"}


def _package(module: str) -> str:
    """The unit the package diagram shows: a package under ``fxquant`` (``fxquant.io``, ``fxquant.backends``) or a
    top-level module (``fxquant.api``)."""
    top = ".".join(module.split(".")[:2])
    path = _modules().get(top)
    return top if path is not None and path.name == "__init__.py" else module


def test_packages_form_no_cycle(graph: nx.DiGraph) -> None:
    """Modules collapsed into their packages (leaves aside, every package may use them) still point one way."""
    packages = nx.DiGraph()
    for a, b in graph.edges:
        if b not in LEAVES and a not in LEAVES and _package(a) != _package(b):
            packages.add_edge(_package(a), _package(b))
    cycles = [sorted(c) for c in nx.strongly_connected_components(packages) if len(c) > 1]
    assert not cycles, f"package cycles: {cycles}"


def test_dependencies_point_down(graph: nx.DiGraph) -> None:
    wrong = sorted(
        f"{a} -> {b}"
        for a, b in graph.edges
        for low, high in FORBIDDEN
        if (a == low or a.startswith(low + ".")) and (b == high or b.startswith(high + "."))
    )
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)
