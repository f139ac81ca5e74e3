"""No import cycle between files of ``megadigpt/`` (issue 29: imports that show the architecture).

The file-level import graph is built from the source with ``ast``: every import statement counts, at module top or
inside a function (a function-local import that dodges a cycle at import time is still a cycle in the design),
relative imports resolved. ``from pkg import name`` is an edge to the file ``pkg/name.py`` where that is a module,
else to ``pkg/__init__.py``. An import of a package by one of its own files (``from . import x`` in
``pkg/y.py`` names ``pkg``) does not count: importing any submodule runs its package's ``__init__`` anyway.
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "megadigpt"

# Cycles left to remove, each a frozenset of module names. Empty: none is allowed. An entry that no longer exists
# fails the test too, so that this set only shrinks.
KNOWN_CYCLES = set()


def module_files():
    mods = {}
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT.parent).with_suffix("")
        mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return mods


def _targets(mods, cur, node):
    """Module names (possibly unknown, e.g. a third-party package) that one import statement names."""
    pkg = cur if mods[cur].name == "__init__.py" else cur.rpartition(".")[0]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = pkg.split(".")
        base = base[: len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    return [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]


def import_graph():
    """{module: {modules of megadigpt it imports}}."""
    mods = module_files()
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for t in _targets(mods, m, node):
                while t and t not in mods:  # ``import a.b.c`` of a name inside a module: that module
                    t = t.rpartition(".")[0]
                if t and t != m and not m.startswith(t + "."):  # not itself, not its own parent package
                    graph[m].add(t)
    return graph


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan), each a frozenset."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10000))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return out


def _describe(graph, comp):
    edges = sorted(f"{a} -> {b}" for a in comp for b in graph[a] if b in comp)
    return f"{sorted(comp)}: {'; '.join(edges)}"


def test_no_import_cycle_between_files():
    graph = import_graph()
    found = cycles(graph)
    new = [c for c in found if c not in KNOWN_CYCLES]
    assert not new, "import cycles between files of megadigpt/:\n" + "\n".join(_describe(graph, c) for c in new)
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not gone, f"KNOWN_CYCLES lists cycles that no longer exist (remove them): {gone}"


def test_the_graph_sees_function_local_and_relative_imports():
    """The checker itself: a local import in a function, and ``from ..x import y`` resolved to a file."""
    graph = import_graph()
    assert "megadigpt.config" in graph["megadigpt.train.runtime"]  # top level, relative
    assert "megadigpt.train.segment" in graph["megadigpt.cli"]  # inside cmd_segment
    assert "megadigpt.targets.discrete" in graph["megadigpt.targets.factory"]  # from .discrete import ..., local
    assert "megadigpt" not in graph["megadigpt.commands"]  # ``from . import __version__``: its own package
    assert "megadigpt.targets.base" in graph["megadigpt.targets"]  # a package's __init__ importing its files
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(toy) == [frozenset("abc")]
