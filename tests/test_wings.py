"""The package's shape: wings that follow the data, no wing importing a higher one, no circles.

Read from the code's own imports (every ``import`` anywhere in a module, functions and
``TYPE_CHECKING`` blocks included), so the shape stays as README's code map draws it.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

import flyp_ray

# Lower numbers sit lower: a module may import its own wing and the wings below it. Wings on
# the same floor (search and serve) do not import each other.
FLOORS = {
    "errors": 0,
    "config": 1,
    "data": 2,
    "finetune": 3,
    "tracking": 4,
    "distributed": 5,
    "search": 6,
    "serve": 6,  # beside search: serves what a search registered, imports nothing of it
    "top": 7,  # cli, demo, __main__: the command line, which may use every wing
}

Graph = Mapping[str, set[str]]


def modules() -> list[str]:
    """Every module of the package, sub-packages' ``__init__`` included."""
    found = ["flyp_ray"]
    for info in pkgutil.walk_packages(flyp_ray.__path__, prefix="flyp_ray."):
        found.append(info.name)
    return sorted(found)


def source_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    return Path(spec.origin)


def imports(module: str, known: set[str]) -> set[str]:
    """The package's modules that ``module`` imports, wherever in the file it does."""
    tree = ast.parse(source_file(module).read_text())
    package = module if source_file(module).name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from its package upwards
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import name` names a submodule where one exists, else pkg itself
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]
        else:
            continue
        found.update(n for n in names if n in known and n != module)
    return found


def graph() -> dict[str, set[str]]:
    known = set(modules())
    return {m: imports(m, known) for m in known}


def wing(module: str) -> str:
    """``flyp_ray.search.tune`` -> ``search``; ``flyp_ray.config`` -> ``config``; the command
    line's modules (``flyp_ray.cli``, ``flyp_ray.demo``, the package itself) -> ``top``."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else ""
    return name if name in FLOORS else "top"


def upward(edges: Graph) -> list[str]:
    """Imports of a higher wing, or of another wing on the same floor."""
    bad = []
    for source, targets in edges.items():
        for target in targets:
            a, b = wing(source), wing(target)
            if FLOORS[b] > FLOORS[a] or (FLOORS[b] == FLOORS[a] and a != b):
                bad.append(f"{source} -> {target}")
    return sorted(bad)


def circles(edges: Graph) -> list[list[str]]:
    """Every set of modules that import each other, directly or around a loop (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                members.append(member)
                if member == node:
                    break
            if len(members) > 1:
                found.append(sorted(members))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def fake(pairs: Iterable[tuple[str, str]]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for a, b in pairs:
        edges.setdefault(a, set()).add(b)
        edges.setdefault(b, set())
    return edges


@pytest.mark.parametrize("module", [m for m in modules() if m != "flyp_ray.__main__"])
def test_every_module_imports(module: str) -> None:
    # __main__ runs the command line when imported; `python -m flyp_ray` is tested in test_cli.
    importlib.import_module(module)


def test_every_module_belongs_to_a_wing() -> None:
    tops = {m for m in modules() if wing(m) == "top"}
    assert tops == {"flyp_ray", "flyp_ray.__main__", "flyp_ray.cli", "flyp_ray.demo",
                    "flyp_ray.init", "flyp_ray.preflight"}


def test_no_wing_imports_a_higher_one() -> None:
    assert upward(graph()) == []


def test_no_module_imports_itself_around_a_circle() -> None:
    assert circles(graph()) == []


def test_the_checks_catch_what_they_are_for() -> None:
    # The checks above pass on the package only if they can fail: here on a made-up graph.
    edges = fake([("flyp_ray.data.load", "flyp_ray.finetune.loop"),
                  ("flyp_ray.finetune.loop", "flyp_ray.finetune.probe"),
                  ("flyp_ray.finetune.probe", "flyp_ray.finetune.loop"),
                  ("flyp_ray.search.tune", "flyp_ray.tracking.runs")])
    assert upward(edges) == ["flyp_ray.data.load -> flyp_ray.finetune.loop"]
    assert circles(edges) == [["flyp_ray.finetune.loop", "flyp_ray.finetune.probe"]]
    known = set(modules())
    assert "flyp_ray.finetune.run" in imports("flyp_ray.finetune.probe", known)
