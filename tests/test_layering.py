"""The package's import graph: no cycles, no reaching into another module's private names,
and ``kernels/`` imports only torch and triton.

Read with ``ast`` from the source files (module-level and function-level imports alike), so
an import hidden inside a function to dodge a cycle still counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("kernels", "sensitivity", "solvers", "allocator")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = ["bitalloc", *rel.parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _package_files() -> dict[str, Path]:
    files = {"bitalloc": ROOT / "__init__.py"}
    for sub in SUBPACKAGES:
        for p in sorted((ROOT / sub).rglob("*.py")):  # subpackages too (allocator/service)
            files[_module_name(p)] = p
    return files


FILES = _package_files()


def _resolve(module: str, is_pkg: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".")
    if not is_pkg:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement in ``module``."""
    path = FILES[module]
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append((a.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            out.append((_resolve(module, is_pkg, node.level, node.module), [a.name for a in node.names], node.lineno))
    return out


def _internal_edges() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from .x import y`` where ``y`` is itself a
    module counts as importing that module)."""
    edges: dict[str, set[str]] = {m: set() for m in FILES}
    for m in FILES:
        for target, names, _ in _imports(m):
            if not target.startswith("bitalloc"):
                continue
            hit = False
            for n in names:
                if f"{target}.{n}" in FILES:
                    edges[m].add(f"{target}.{n}")
                    hit = True
            if not hit and target in FILES:
                edges[m].add(target)
    # the front door bitalloc/__init__.py loads its exports lazily and every subpackage takes
    # BitallocError from it: treat the front door as a leaf
    edges["bitalloc"] = set()
    for m in edges:
        edges[m].discard(m)
        edges[m].discard("bitalloc")
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_graph_is_read():
    edges = _internal_edges()
    assert "bitalloc.allocator.api" in edges
    assert edges["bitalloc.allocator.api"], "api imports nothing from the package? the parser is broken"


def test_no_import_cycles():
    cycles = _cycles(_internal_edges())
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_cycle_detector_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_another_modules_private_names():
    bad = []
    for m in FILES:
        for target, names, line in _imports(m):
            if not target.startswith("bitalloc") or target == m:
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__") and f"{target}.{n}" not in FILES:
                    bad.append(f"{FILES[m].relative_to(ROOT)}:{line} imports {target}.{n}")
    assert bad == [], "private names used across modules:\n" + "\n".join(bad)


def _module_aliases(module: str) -> dict[str, str]:
    """Local names bound to package modules in ``module`` (``from . import ilp``, ``import
    bitalloc.solvers.ilp as ilp``)."""
    out = {}
    for target, names, _ in _imports(module):
        for n in names:
            if f"{target}.{n}" in FILES:
                out[n] = f"{target}.{n}"
    path = FILES[module]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in FILES and a.asname:
                    out[a.asname] = a.name
    return out


def test_no_module_reads_another_modules_private_attributes():
    """``ilp._Model`` through a module alias counts as much as ``from .ilp import _Model``."""
    bad = []
    for m, path in FILES.items():
        aliases = _module_aliases(m)
        if not aliases:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    assert bad == [], "private attributes used across modules:\n" + "\n".join(bad)


ALLOWED_IN_KERNELS = {"torch", "triton", "numpy"}


@pytest.mark.parametrize("module", sorted(m for m in FILES if m.startswith("bitalloc.kernels.")))
def test_kernels_import_only_torch_and_triton(module):
    import sys

    std = set(sys.stdlib_module_names)
    bad = []
    for target, _, line in _imports(module):
        top = target.split(".")[0]
        if top in std or top in ALLOWED_IN_KERNELS:
            continue
        if target.startswith("bitalloc.kernels") or target == "bitalloc":
            continue
        bad.append(f"line {line}: {target}")
    assert bad == [], f"{module} imports outside torch/triton/the standard library: {bad}"


@pytest.mark.parametrize("package,forbidden", [("bitalloc.kernels", ("bitalloc.sensitivity", "bitalloc.solvers", "bitalloc.allocator")),
                                               ("bitalloc.sensitivity", ("bitalloc.solvers", "bitalloc.allocator")),
                                               ("bitalloc.solvers", ("bitalloc.sensitivity", "bitalloc.allocator", "bitalloc.kernels"))])
def test_imports_go_only_downwards(package, forbidden):
    bad = []
    for m, targets in _internal_edges().items():
        if m.startswith(package + "."):
            bad += [f"{m} -> {t}" for t in targets if t.startswith(forbidden)]
    assert bad == [], "upward imports: " + "; ".join(bad)


def test_solvers_never_import_torch():
    bad = [f"{m}:{line}" for m in FILES if m.startswith("bitalloc.solvers.")
           for target, _, line in _imports(m) if target.split(".")[0] == "torch"]
    assert bad == []


def test_no_module_over_600_lines():
    big = {m: n for m, p in FILES.items() if (n := len(p.read_text().splitlines())) > 600}
    assert big == {}, f"modules over 600 lines (split them along their seams): {big}"


def _module_bindings(tree: ast.Module) -> set[str]:
    """Names bound at module level: assignments, defs, classes and imports, also inside
    top-level ``if`` / ``try`` / ``with`` blocks (not inside functions or classes)."""
    names: set[str] = set()

    def visit(stmts):
        for node in stmts:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                    names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For)):
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
    visit(tree.body)
    return names


@pytest.mark.parametrize("path", sorted(FILES.values()), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_name_in_all_is_defined(path):
    """``from module import *`` and the API docs trust ``__all__``: every name it lists is bound
    in the module (a module with a lazy ``__getattr__`` resolves its own)."""
    tree = ast.parse(path.read_text(), str(path))
    exported = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            exported = [e.value for e in getattr(node.value, "elts", []) if isinstance(e, ast.Constant)]
    bound = _module_bindings(tree)
    if not exported or "__getattr__" in bound:
        return
    missing = [n for n in exported if n not in bound]
    assert not missing, f"{path.relative_to(ROOT)}: __all__ lists names it does not define: {missing}"
