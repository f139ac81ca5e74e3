"""No import cycle between files of ``megadigpt/``, and no private name taken from another of its files (issue 29:
imports that show the architecture).

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


def module_files(root=ROOT):
    mods = {}
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root.parent).with_suffix("")
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


# Private names still taken from another module, each (importer, home module, name). To empty: each entry is left by
# a file another change switches. An entry that no longer occurs fails the test too, so that this set only shrinks.
KNOWN_PRIVATE_IMPORTS = set()  # (importer, home module, name) left to fix: none is allowed


def _private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node):
    """``a.b.c`` for a chain of attributes on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id] + parts[::-1]) if isinstance(node, ast.Name) else None


def private_imports(root=ROOT):
    """{(importer, home module, private name): [line, ...]}: every ``from X import _name`` (at module top or in a
    function, one line or several, relative or absolute) where X is another file of the package, and every
    ``mod._name`` where ``mod`` is a module of the package bound by an import (``from . import config as _config``,
    ``import pkg.mod as m``, ``import pkg.mod``). A module imported under a private alias is fine, a dunder is
    fine; a private name met only inside its own module is fine."""
    mods = module_files(root)
    found = {}
    for cur, f in mods.items():
        pkg = cur if f.name == "__init__.py" else cur.rpartition(".")[0]
        tree = ast.parse(f.read_text(), str(f))
        bound = {}  # local name -> module of the package it names
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                for a in node.names:
                    if f"{mod}.{a.name}" in mods:  # a module, not a name inside one
                        bound[a.asname or a.name] = f"{mod}.{a.name}"
                    elif mod in mods and mod != cur and _private(a.name):
                        found.setdefault((cur, mod, a.name), []).append(node.lineno)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname and a.name in mods:
                        bound[a.asname] = a.name
                    elif not a.asname and a.name.split(".")[0] in mods:
                        bound[a.name.split(".")[0]] = a.name.split(".")[0]
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            dotted = _dotted(node.value)
            if dotted is None or dotted.split(".")[0] not in bound:
                continue
            first, _, rest = dotted.partition(".")
            mod = ".".join(filter(None, [bound[first], rest]))
            if mod in mods and mod != cur:
                found.setdefault((cur, mod, node.attr), []).append(node.lineno)
    return found


def test_no_private_names_across_modules():
    found = private_imports()
    new = sorted(k for k in found if k not in KNOWN_PRIVATE_IMPORTS)
    assert not new, "private names taken from another module of megadigpt/ (make them public in their home):\n" + \
        "\n".join(f"{imp} (line {', '.join(map(str, found[imp, home, name]))}) uses {home}.{name}"
                  for imp, home, name in new)
    gone = sorted(k for k in KNOWN_PRIVATE_IMPORTS if k not in found)
    assert not gone, f"KNOWN_PRIVATE_IMPORTS lists uses that no longer exist (remove them): {gone}"


def test_the_private_name_checker_flags_a_planted_example(tmp_path):
    """The checker itself, on a planted package: each way of reaching a private name is flagged, the fine ones not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "__version__ = '1'\n_SECRET = 1\n",
        "home.py": "_x = 1\n_y = 2\npublic = 3\n\n\ndef own():\n    return _x\n",
        "top.py": "from .home import _x, public\n",
        "local.py": "def f():\n    from pkg.home import (\n        public,\n        _y,\n    )\n    return _y\n",
        "alias.py": "from . import home as _home\n\n\ndef f():\n    return _home._x + _home.public\n",
        "dotted.py": "import pkg.home\nimport pkg.home as h\n\nA = pkg.home._y\nB = h._x\n",
        "package.py": "from . import __version__, _SECRET\n",
        "fine.py": "from . import home as _h\nfrom .home import public as _p\nfrom os import _exit\nimport pkg\n\n"
                   "V = _h.public + _p + pkg.__version__.__len__()\n",
        "sub/__init__.py": "",
        "sub/deep.py": "from ..home import _y\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    assert private_imports(pkg) == {
        ("pkg.top", "pkg.home", "_x"): [1],
        ("pkg.local", "pkg.home", "_y"): [2],
        ("pkg.alias", "pkg.home", "_x"): [5],
        ("pkg.dotted", "pkg.home", "_y"): [4],
        ("pkg.dotted", "pkg.home", "_x"): [5],
        ("pkg.package", "pkg", "_SECRET"): [1],
        ("pkg.sub.deep", "pkg.home", "_y"): [1],
    }
