"""The layout stays the architecture: packages import only downward, no two packages import each other,
the wire codecs open no sockets or threads, and the client package needs neither torch, Ray nor the server.

Layers, top to bottom (packages on one line are siblings that do not import each other)::

    cli
    launch | eval                 the subprocess helper; rollout, compare, eval workers
    client | serving              robot side: policy client, driver | server side: doors -> scheduler -> backend
    model | sim                   the flow-matching policy | envs, state restore, expert, demo files
    policies                      the policy contract, validation, batching, light policies
    data | wire | cluster | security   LeRobot and HDF5 files | bytes <-> dicts | joining Ray | CurveZMQ keys
    registry                      built-in embodiment configs
    types | jsonio                shared types | JSON file reading
    errors

Inside ``serving``: ``server`` (the composition root) composes ``doors``; the doors use the request,
scheduler and backend modules below them, and nothing below imports a door or the server.
"""

from __future__ import annotations

from collections import defaultdict
from functools import cache

import pytest

grimp = pytest.importorskip("grimp")

ROOT = "policyserve"
LAYERS = (
    ("cli",),
    ("launch", "eval"),
    ("client", "serving"),
    ("model", "sim"),
    ("policies",),
    ("data", "wire", "cluster", "security"),
    ("registry",),
    ("types", "jsonio"),
    ("errors",),
)
SERVING_LAYERS = (("server",), ("doors",))
"""Inside serving: the server above the doors, the doors above every other serving module."""
WIRE_MUST_NOT_IMPORT = ("zmq", "websockets", "threading", "asyncio", "socket", "concurrent", "selectors")
CLIENT_MUST_NOT_IMPORT = ("torch", "ray", f"{ROOT}.serving")
NOT_FOR_BENCHMARKS = f"{ROOT}.cli"


@cache
def graph() -> object:
    """The import graph of policyserve and what it imports (type-checking-only imports left out)."""
    return grimp.build_graph(ROOT, include_external_packages=True, exclude_type_checking_imports=True)


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _package_edges() -> dict[tuple[str, str], list[str]]:
    """(importer package, imported package) -> the module imports behind that arrow."""
    g = graph()
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module in g.modules:
        if not module.startswith(ROOT + ".") or module.startswith(f"{ROOT}.__main__"):
            continue
        for imported in g.find_modules_directly_imported_by(module):
            a, b = _package(module), _package(imported)
            if imported.startswith(ROOT + ".") and a != b:
                edges[(a, b)].append(f"{module} -> {imported}")
    return edges


def _format(dependencies: object) -> list[str]:
    lines = []
    for dep in sorted(dependencies, key=lambda d: (d.importer, d.imported)):  # type: ignore[attr-defined]
        routes = sorted(" -> ".join([*r.heads, *r.middle, *r.tails]) if not r.middle else
                        f"{'|'.join(sorted(r.heads))} -> {' -> '.join(r.middle)} -> {'|'.join(sorted(r.tails))}"
                        for r in dep.routes)
        lines.append(f"{dep.importer} imports {dep.imported}: {routes[0]}"
                     + (f" (+{len(routes) - 1} more)" if len(routes) > 1 else ""))
    return lines


def test_every_package_has_a_layer() -> None:
    placed = {name for layer in LAYERS for name in layer}
    packages = {_package(m) for m in graph().modules if m.startswith(ROOT + ".")} - {"__main__"}
    assert packages - placed == set(), "add the new package to LAYERS (and to the README's layout section)"


def test_no_import_cycles_between_packages() -> None:
    edges = _package_edges()
    cycles = sorted(f"{a} <-> {b}: {edges[(a, b)][0]} / {edges[(b, a)][0]}"
                    for (a, b) in edges if (b, a) in edges and a < b)
    assert cycles == []


def test_packages_import_only_downward() -> None:
    layers = tuple(grimp.Layer(*names, independent=True) for names in LAYERS)
    illegal = graph().find_illegal_dependencies_for_layers(layers=layers, containers={ROOT})
    assert _format(illegal) == []


def test_inside_serving_the_server_composes_doors_and_nothing_below_imports_them() -> None:
    g = graph()
    serving = f"{ROOT}.serving"
    modules = [m for m in g.modules if m.startswith(serving + ".")]
    wrong = []
    for module in modules:
        for imported in g.find_modules_directly_imported_by(module):
            if imported.startswith(f"{serving}.server") and not module.startswith(f"{serving}.server"):
                wrong.append(f"{module} -> {imported}")
            if imported.startswith(f"{serving}.doors") and not module.startswith((f"{serving}.doors",
                                                                                  f"{serving}.server")):
                wrong.append(f"{module} -> {imported}")
            if module.startswith(f"{serving}.doors") and imported.startswith(f"{serving}.server"):
                wrong.append(f"{module} -> {imported}")
    assert sorted(set(wrong)) == []


def test_no_import_cycles_between_modules() -> None:
    """Strongly connected groups of modules (package ``__init__`` re-exports left out)."""
    g = graph()
    modules = sorted(m for m in g.modules if m.startswith(ROOT + ".") and not g.find_children(m))
    edges = {m: [i for i in g.find_modules_directly_imported_by(m) if i in set(modules)] for m in modules}
    assert _strongly_connected(edges) == []


def test_wire_opens_no_sockets_or_threads() -> None:
    g = graph()
    found = sorted(f"{m} -> {i}" for m in g.modules if m.startswith(f"{ROOT}.wire")
                   for i in g.find_modules_directly_imported_by(m) if i.split(".")[0] in WIRE_MUST_NOT_IMPORT)
    assert found == []


def test_client_needs_no_torch_ray_or_server() -> None:
    """Not directly, and not through what it imports (a robot's client install has none of them)."""
    g = graph()
    found = []
    for banned in CLIENT_MUST_NOT_IMPORT:
        chains = g.find_shortest_chains(importer=f"{ROOT}.client", imported=banned, as_packages=True)
        found += sorted(" -> ".join(chain) for chain in chains)
    assert found == []


def test_benchmarks_do_not_import_the_cli() -> None:
    import ast
    from pathlib import Path

    found = []
    for path in sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {n}" for n in names if n == NOT_FOR_BENCHMARKS or n.startswith(NOT_FOR_BENCHMARKS + ".")]
    assert found == []


def _strongly_connected(edges: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm: every group of two or more modules that import each other, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in edges:
        if node not in index:
            visit(node)
    return sorted(groups)


def test_commands_share_flags_through_cli_common_only() -> None:
    """A command module imports no other command (``compare`` once took its flags from ``rollout``)."""
    g = graph()
    shared = {f"{ROOT}.cli.common", f"{ROOT}.cli.flags", f"{ROOT}.cli.demo_workflow", f"{ROOT}.cli"}
    found = sorted(f"{m} -> {i}" for m in g.modules if m.startswith(f"{ROOT}.cli.") and m != f"{ROOT}.cli.main"
                   for i in g.find_modules_directly_imported_by(m)
                   if i.startswith(f"{ROOT}.cli.") and i not in shared)
    assert found == []
