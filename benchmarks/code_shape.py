"""The shape of the code: lines per module, the largest classes and functions, import
cycles between cellfit's modules, imports made inside functions, and the test count.

    python benchmarks/code_shape.py [--src src/cellfit] [--json FILE] [--no-tests]

Import cycles count module-level and function-level imports alike (a deferred import
still ties two modules together). The test count comes from ``pytest --collect-only``.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

OPTIONAL = {"dask", "distributed", "zarr", "onnx", "onnxruntime", "psutil", "timm", "monai"}


def module_name(path: Path, src: Path) -> str:
    rel = path.relative_to(src.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(tree: ast.AST, this: str) -> tuple[set[str], int]:
    """Modules of cellfit imported by a module, and its count of imports inside functions
    that are not optional dependencies."""
    found: set[str] = set()
    inner = 0

    def visit(node: ast.AST, in_function: bool) -> None:
        nonlocal inner
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = (
                    [a.name for a in child.names]
                    if isinstance(child, ast.Import)
                    else [child.module or ""]
                )
                if isinstance(child, ast.ImportFrom) and child.level:
                    base = this.rsplit(".", child.level)[0]
                    names = [f"{base}.{child.module}" if child.module else base]
                for n in names:
                    if n.startswith("cellfit"):
                        found.add(n)
                        if isinstance(child, ast.ImportFrom) and child.module == "cellfit":
                            found.update(f"cellfit.{a.name}" for a in child.names)
                    if in_function and n.split(".")[0] not in OPTIONAL | {"__future__"}:
                        inner += 1
            fn = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            visit(child, in_function or fn)

    visit(tree, False)
    return found, inner


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def measure(src: Path) -> dict:
    lines: dict[str, int] = {}
    graph: dict[str, set[str]] = {}
    inner_imports: dict[str, int] = {}
    classes: list[tuple[int, str]] = []
    functions: list[tuple[int, str]] = []
    for path in sorted(src.rglob("*.py")):
        name = module_name(path, src)
        text = path.read_text()
        lines[name] = len(text.splitlines())
        tree = ast.parse(text)
        deps, inner = imports_of(tree, name)
        # ``from cellfit.plugin import _display`` names a module, not an attribute
        graph[name] = {d for d in deps if d != name}
        inner_imports[name] = inner
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                classes.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
                for f in node.body:
                    if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        functions.append(
                            (f.end_lineno - f.lineno + 1, f"{name}.{node.name}.{f.name}")
                        )
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.col_offset == 0:
                functions.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    known = set(graph)
    graph = {k: {d for d in v if d in known} for k, v in graph.items()}
    return {
        "lines": dict(sorted(lines.items(), key=lambda kv: -kv[1])),
        "total_lines": sum(lines.values()),
        "largest_classes": sorted(classes, reverse=True)[:5],
        "largest_functions": sorted(functions, reverse=True)[:5],
        "import_cycles": cycles(graph),
        "imports_inside_functions": sum(inner_imports.values()),
    }


def count_tests(root: Path) -> int | None:
    try:
        res = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly"],
            cwd=root, capture_output=True, text=True, timeout=600,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in res.stdout.splitlines()[::-1]:
        if " collected" in line or "tests collected" in line or line.endswith(" tests"):
            digits = line.split()[0]
            if digits.isdigit():
                return int(digits)
    return sum(1 for line in res.stdout.splitlines() if "::" in line) or None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="src/cellfit")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-tests", action="store_true")
    args = ap.parse_args(argv)
    src = Path(args.src).resolve()
    res = measure(src)
    if not args.no_tests:
        res["tests"] = count_tests(src.parent.parent)
    print(f"{'module':<40} lines")
    for name, n in list(res["lines"].items())[:15]:
        print(f"{name:<40} {n}")
    print(f"total lines: {res['total_lines']}  ({len(res['lines'])} modules)")
    print("largest classes:   " + ", ".join(f"{n} ({k})" for k, n in res["largest_classes"][:3]))
    print("largest functions: " + ", ".join(f"{n} ({k})" for k, n in res["largest_functions"][:3]))
    print(f"import cycles: {len(res['import_cycles'])}  {res['import_cycles']}")
    print(f"imports inside functions (not optional): {res['imports_inside_functions']}")
    if "tests" in res:
        print(f"tests collected: {res['tests']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
