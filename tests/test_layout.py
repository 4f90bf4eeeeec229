"""The package's architecture, enforced: the library never imports the application, and no two modules
import each other (directly or around a cycle), deferred imports inside functions included.

Read from the source with ``ast`` (nothing is imported), so that a forbidden import hidden in a function
body or a ``try`` block fails here as well as one at the top of a file.
"""
from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, Set

import pytest

PACKAGE = "neural_mechanics_ext"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE
# Subpackages built on the library's public API; the library must not know them.
ON_TOP = ("app", "bench", "integrations")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> Dict[str, pathlib.Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: pathlib.Path, modules: Dict[str, pathlib.Path]) -> Set[str]:
    """The package modules that ``name`` imports anywhere in its source (outside ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    out: Set[str] = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for c in child.orelse:
                    visit(c)
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names if a.name.split(".")[0] == PACKAGE)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    origin = ".".join(base[: len(base) - child.level + 1] + ([child.module] if child.module else []))
                else:
                    origin = child.module or ""
                if origin.split(".")[0] != PACKAGE:
                    continue
                for alias in child.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{origin}.{alias.name}"
                    out.add(sub if sub in modules else origin)
            visit(child)

    visit(tree)
    # Importing a submodule runs its parent packages first; those edges are implied, not written.
    return {m for m in out if m in modules and not name.startswith(m + ".") and m != name}


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[-1] == "__main__":   # `python -m neural_mechanics_ext` is the application's entry point
        return "app"
    return parts[1] if len(parts) > 1 and parts[1] in ON_TOP else "library"


def test_the_graph_is_read():
    graph = _graph()
    assert f"{PACKAGE}.tracker" in graph or f"{PACKAGE}.tracker.__init__" in graph or any(
        m.startswith(f"{PACKAGE}.tracker") for m in graph)
    assert f"{PACKAGE}.ops" in graph[PACKAGE], "the package root re-exports slice_moments from ops"
    assert any(_layer(m) == "app" for m in graph), "the application subpackage exists"


def test_library_never_imports_what_sits_on_top():
    bad = [f"{m} imports {d}" for m, deps in _graph().items() if _layer(m) == "library"
           for d in deps if _layer(d) != "library"]
    assert not bad, "the library must not import the application, bench or integrations:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    cycles: List[List[str]] = []
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()

    def strongconnect(v: str):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    assert not cycles, "modules that import each other (around a cycle):\n" + "\n".join(map(str, cycles))


@pytest.mark.parametrize("source, expected", [
    ("from ..app import runner\n", {"neural_mechanics_ext.app.runner"}),
    ("def f():\n    from .app.report import write_report\n", {"neural_mechanics_ext.app.report"}),
    ("try:\n    import neural_mechanics_ext.app.cli\nexcept ImportError:\n    pass\n", {"neural_mechanics_ext.app.cli"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .app import runner\n", set()),
])
def test_the_reader_sees_hidden_imports(tmp_path, source, expected):
    """The checks above cannot pass by not seeing an import: deferred, guarded and relative forms."""
    modules = _modules()
    name = f"{PACKAGE}.symmetry.fake" if source.startswith("from ..") else f"{PACKAGE}.fake"
    path = tmp_path / "fake.py"
    path.write_text(source)
    assert _imports(name, path, modules) == expected
