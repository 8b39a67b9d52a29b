"""The import graph of the project's own modules (``duollm/`` and ``kernels/``, the latter as
``duollm.kernels``) has no cycles, and no module imports another module's private names.

Built from the source with ``ast``; nothing is imported or run. Every ``import`` counts, at any
depth (a function-level import is still an edge: it only delays the cycle to the first call).
An edge goes to the module an import names: ``from . import ops`` in ``duollm/model.py`` is an
edge to ``duollm.ops``, ``from .reference import BIG`` one to ``duollm.reference``; a name that
is not a module (``from duollm import __version__``) makes an edge to the package itself.
"""
import ast
import os
from typing import Dict, List, Set

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (folder, package name it is installed as); setup.py's package_dir
PACKAGES = (("duollm", "duollm"), ("kernels", "duollm.kernels"))
# compiled extensions: imported by name, with no source to walk (setup.py's ext_modules)
EXTENSIONS = {"duollm._C"}


def project_modules(root: str = ROOT) -> Dict[str, str]:
    """Module name -> source path, for every .py file of the project's packages."""
    mods = {}
    for folder, package in PACKAGES:
        base = os.path.join(root, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for f in filenames:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), base)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                mods[".".join([package] + rel)] = os.path.join(dirpath, f)
    return mods


def _imports(module: str, path: str, mods: Dict[str, str]):
    """Yield ``(target module, imported names or None, line)`` for every import in ``path``."""
    is_package = os.path.basename(path) == "__init__.py"
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                if not is_package:
                    parts = parts[:-1]
                if node.level > 1:
                    parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in mods or full in EXTENSIONS:
                    yield full, None, node.lineno
                else:
                    yield base, alias.name, node.lineno


def import_graph(root: str = ROOT) -> Dict[str, Set[str]]:
    mods = project_modules(root)
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        for target, _, _ in _imports(m, path, mods):
            if target in mods and target != m:
                graph[m].add(target)
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component of
    more than one module (Tarjan's algorithm, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    components = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    components.append(set(comp))
    cycles = []
    for comp in components:  # a shortest path back to the component's first module
        first = min(comp)
        paths = {first: [first]}
        frontier = [first]
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & comp):
                    if w == first:
                        found = paths[v] + [first]
                        break
                    if w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
                if found:
                    break
            frontier = nxt
        cycles.append(found)
    return cycles


def test_the_graph_sees_the_packages_and_their_edges():
    graph = import_graph()
    assert "duollm.kernels.duo_ffn" in graph and "duollm.ops" in graph
    assert "duollm.checks" in graph["duollm.ops"]  # from .checks import ...
    assert "duollm.reference" in graph["duollm.torch_backend"]  # from . import reference
    assert "duollm.kernels" in graph["duollm.ops"]  # a function-level import counts


def test_cycles_are_found_and_named():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_names_imported_across_modules():
    mods = project_modules()
    bad = []
    for m, path in mods.items():
        for target, name, line in _imports(m, path, mods):
            if name is None or target not in mods:
                continue
            if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
                bad.append(f"{os.path.relpath(path, ROOT)}:{line} imports {name} from {target}")
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


@pytest.mark.parametrize("stub", ["duollm/synthetic.py", "duollm/report.py"])
def test_the_moved_module_stubs_are_gone(stub):
    # Their contents live in duollm.study.synthetic and duollm.study.report; no documented
    # import path needed the old names.
    assert not os.path.exists(os.path.join(ROOT, stub))
