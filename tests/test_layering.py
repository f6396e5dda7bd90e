"""Layers point down: no module of ``src/mirage`` imports from a higher layer, and the packages'
import graph has no cycles (docs/design.md §layers).

Every ``import`` / ``from … import`` counts, including those inside functions (a lazy import is a
dependency all the same). A unit is a first-level package or module of ``mirage``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mirage

SRC = Path(mirage.__file__).parent

# Low -> high. A unit may import its own layer's units and any lower layer's, never a higher one's.
LAYERS: list[set[str]] = [
    {
        "mirage",
        "registry",
        "paths",
        "progress",
        "devices",
        "storage",
    },  # utilities (``mirage`` is the root package; ``storage``: SQLite files)
    {"data", "models"},  # datasets; networks, checkpoints and the generic fit loop
    {"scenarios"},  # a victim, its recipe and the attacker's data
    {
        "defenses",
        "ownership",
    },  # query-time defenses; ownership evidence (keyed watermarks, GRAD²'s behaviour test)
    {"api"},  # a defended model behind a query budget
    {"training"},  # victims, surrogates, training-time defenses, the defense resolver
    {"attacks"},  # model stealing and the clone
    {"bench"},  # sweeps, results, reports
    {
        "serve",
        "cli",
        "protection",
        "facade",
    },  # the service, the command line, mirage.protect, the exports
]
LAYER = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def _unit_of_module(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "mirage":
        return None
    return parts[1] if len(parts) > 1 else "mirage"


def _is_submodule(name: str) -> bool:
    return (SRC / f"{name}.py").exists() or (SRC / name / "__init__.py").exists()


def _own_unit(path: Path) -> str:
    """The root ``__init__.py`` is the ``facade``: its lazy exports (``mirage.protect``, …) import
    from every layer on first use, while ``import mirage`` itself loads nothing (others import the
    root, unit ``mirage``, for ``__version__`` only)."""
    relative = path.relative_to(SRC)
    return "facade" if relative == Path("__init__.py") else relative.parts[0].removesuffix(".py")


def _package_of(path: Path) -> list[str]:
    """The package a module belongs to (for ``__init__.py``: the package itself)."""
    return ["mirage", *path.relative_to(SRC).parent.parts]


def imported_units(path: Path) -> set[tuple[str, int]]:
    """(unit, line) for every import of a mirage unit in the file at ``path``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (unit := _unit_of_module(alias.name)) is not None:
                    found.add((unit, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(path)
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            unit = _unit_of_module(module)
            if unit == "mirage":  # ``from mirage import paths``: the names are the units
                for alias in node.names:
                    found.add((alias.name if _is_submodule(alias.name) else "mirage", node.lineno))
            elif unit is not None:
                found.add((unit, node.lineno))
    return found


def import_edges() -> list[tuple[str, str, str]]:
    """(importing unit, imported unit, "file:line") for every cross-unit import."""
    edges = []
    for path in sorted(SRC.rglob("*.py")):
        own = _own_unit(path)
        for unit, line in sorted(imported_units(path)):
            if unit != own:
                edges.append((own, unit, f"{path.relative_to(SRC.parent)}:{line}"))
    return edges


def upward_imports(edges: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    return [e for e in edges if LAYER[e[1]] > LAYER[e[0]]]


def package_cycles(edges: list[tuple[str, str, str]]) -> list[list[str]]:
    """Every elementary cycle of the unit graph, as [a, b, …] for a -> b -> … -> a, each listed
    once, starting from its smallest unit."""
    graph: dict[str, set[str]] = {}
    for source, target, _ in edges:
        graph.setdefault(source, set()).add(target)
    cycles = []

    def walk(start: str, path: list[str]) -> None:
        for successor in sorted(graph.get(path[-1], ())):
            if successor == start:
                cycles.append(list(path))
            elif successor > start and successor not in path:
                walk(start, path + [successor])

    for start in sorted(graph):
        walk(start, [start])
    return cycles


def test_every_unit_has_a_layer():
    units = {_own_unit(path) for path in SRC.rglob("*.py")}
    units |= {unit for _, unit, _ in import_edges()}
    missing = sorted(units - LAYER.keys())
    assert not missing, f"place these units in LAYERS: {missing}"


@pytest.mark.slow
def test_imports_point_down():
    upward = upward_imports(import_edges())
    report = "\n".join(f"  {source} -> {target}  ({where})" for source, target, where in upward)
    print(f"{len(upward)} upward imports" + (f":\n{report}" if upward else ""))
    assert not upward, f"imports from a higher layer:\n{report}"


@pytest.mark.slow
def test_no_package_cycles():
    edges = import_edges()
    cycles = package_cycles(edges)
    lines = []
    for cycle in cycles:
        lines.append(" -> ".join(cycle + cycle[:1]))
        steps = set(zip(cycle, cycle[1:] + cycle[:1], strict=True))
        lines += [f"  {s} -> {t}  ({w})" for s, t, w in edges if (s, t) in steps]
    report = "\n".join(lines)
    print(f"{len(cycles)} package cycles" + (f":\n{report}" if cycles else ""))
    assert not cycles, f"package import cycles:\n{report}"
