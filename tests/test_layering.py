"""The package layering, from the source: every import (inside functions too) of the project's modules.

phileo/ is below both stages and imports neither; sharding/ and training/ never import each other
(phileo/schema.py is their only contract); sources only list and read (no planner, build or
dataset-tool imports); and no module of the project imports itself back through others.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("phileo", "sharding", "training", "tools")


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest project module that `name` (module or module.attribute) lies in."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {_resolve(alias.name, modules) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets |= {_resolve(f"{base}.{alias.name}", modules) for alias in node.names}
        graph[name] = {target for target in targets if target and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def imports_between(graph: dict[str, set[str]], importer: str, imported: tuple[str, ...]) -> list[str]:
    return sorted(f"{name} -> {target}" for name, targets in graph.items()
                  if name == importer or name.startswith(importer + ".")
                  for target in targets if target.startswith(imported))


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_layers():
    graph = import_graph()
    assert imports_between(graph, "phileo", ("sharding", "training", "tools")) == []
    assert imports_between(graph, "sharding", ("training", "tools")) == []
    assert imports_between(graph, "training", ("sharding", "tools")) == []
    # sources list and read; filtering, planning and building sit above them
    assert imports_between(graph, "sharding.sources", ("sharding.build", "sharding.dataset",
                                                       "sharding.phileo_bench")) == []


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "sharding.build.driver" in graph["sharding.cli"]  # imported inside the command functions
