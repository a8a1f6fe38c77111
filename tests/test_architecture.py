"""The shape of the code: cellfit's modules import one way (no import cycles, whether
the import is at the top of a module or inside a function), and the engine (every
module outside ``cellfit.plugin``) imports neither Qt nor napari."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import cellfit

PACKAGE = Path(cellfit.__file__).resolve().parent
QT_OR_NAPARI = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari")


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    """``{"cellfit.batch": path, "cellfit.plugin": path/__init__.py, ...}``."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted ``name`` that is one of ``modules``."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def imports_of(this: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The cellfit modules that module ``this`` imports anywhere in its file (at the
    top, inside functions, under ``if``): ``import cellfit.x``, ``from cellfit.x
    import y``, ``from cellfit import x`` and relative imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package of ``this``
                package = this.split(".")
                if not is_package:
                    package = package[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            # ``from cellfit import model`` imports the module cellfit.model;
            # ``from cellfit import __version__`` the package itself
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        else:
            continue
        for name in names:
            target = _known(name, modules)
            if target is not None and target != this:
                found.add(target)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = module_names(package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


# ---------------------------------------------------------------------------- tests
def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"f"}, "f": {"e"}, "g": set()}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["e", "f"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_import_graph_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "cellfit"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from cellfit.errors import E\n")
    (pkg / "errors.py").write_text("E = 1\n")
    (pkg / "a.py").write_text("def f():\n    from cellfit import b\n")
    (pkg / "b.py").write_text("import cellfit.sub.c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from ..a import f\nfrom . import d\n")
    (pkg / "sub" / "d.py").write_text("from cellfit import E\n")
    graph = import_graph(pkg)
    assert graph["cellfit"] == {"cellfit.errors"}
    assert graph["cellfit.a"] == {"cellfit.b"}
    assert graph["cellfit.b"] == {"cellfit.sub.c"}
    assert graph["cellfit.sub.c"] == {"cellfit.a", "cellfit.sub.d"}
    assert graph["cellfit.sub.d"] == {"cellfit"}
    assert cycles(graph) == [["cellfit.a", "cellfit.b", "cellfit.sub.c"]]


def test_no_import_cycles_among_cellfit_modules():
    graph = import_graph()
    assert "cellfit.batch" in graph and "cellfit.plugin" in graph  # the walk saw the package
    found = cycles(graph)
    assert found == [], f"import cycles: {found}"


def test_the_engine_imports_neither_qt_nor_napari():
    engine = sorted(
        name for name in module_names()
        if name != "cellfit.plugin" and not name.startswith("cellfit.plugin.")
    )
    assert "cellfit.train" in engine and "cellfit.distributed" in engine
    code = (
        "import sys\n"
        f"import {', '.join(engine)}\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {QT_OR_NAPARI!r})\n"
        "print(','.join(bad))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"the engine imported {res.stdout.strip()}"
