"""The house rules, checked on the source: floors, no import circles, no private cross-module imports.

Why a test: these rules erode one convenient import at a time. Every import counts, also those
inside functions (a circle held together by a function-level import is still a circle); only
imports under ``if TYPE_CHECKING:`` (annotations) are exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# import package -> source folder (pyproject's package-dir)
PACKAGES = {"kvpipe": "core", "kvpipe.pipeline": "pipeline", "kvpipe.store": "store", "kvpipe.probes": "probes",
            "kvpipe.cli": "cli", "kvpipe.benchmarks": "benchmarks"}

# Floors, lowest first: a module may import its own floor and the floors below it.
FLOORS = [
    ("core", ("kvpipe.errors", "kvpipe.registry", "kvpipe.roots", "kvpipe.provenance", "kvpipe.device",
              "kvpipe.raycluster", "kvpipe", "kvpipe.pipeline")),
    ("store", ("kvpipe.store",)),
    ("data", ("kvpipe.pipeline.datasets", "kvpipe.pipeline.vqa")),
    ("models", ("kvpipe.pipeline.models",)),
    ("extraction", ("kvpipe.pipeline.extraction",)),
    ("evaluation", ("kvpipe.pipeline.evaluation",)),
    ("top", ("kvpipe.cli", "kvpipe.benchmarks")),
]
# probes read stores (and dataset annotation readers, which import no model code), never models;
# the model-in-the-loop workflow and the top floor read probe results (their table's contract)
PROBES_MAY_IMPORT = ("core", "store", "data")
READS_PROBES = ("evaluation", "top")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every kvpipe import outside TYPE_CHECKING."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: list[tuple[str, list[str], int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, [], child.lineno) for a in child.names if a.name.startswith("kvpipe"))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                    pkg = pkg[:len(pkg) - child.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                if base.startswith("kvpipe"):
                    found.append((base, [a.name for a in child.names], child.lineno))
            visit(child)
    visit(tree)
    return found


def _resolve(base: str, names: list[str]) -> list[str]:
    """The kvpipe modules an import statement loads: ``from pkg import submodule`` counts as the submodule."""
    out = []
    for n in names:
        if f"{base}.{n}" in MODULES:
            out.append(f"{base}.{n}")
    if base in MODULES and (not names or len(out) < len(names)):
        out.append(base)
    return out


GRAPH: dict[str, set[str]] = {
    m: {t for base, names, _ in _imports(p, m) for t in _resolve(base, names) if t != m} for m, p in MODULES.items()
}


def _floor(module: str) -> str:
    best, best_len = "", -1
    for name, prefixes in FLOORS:
        for p in prefixes:
            exact_only = p in ("kvpipe", "kvpipe.pipeline")  # the bare packages, not what is below them
            if (module == p or (module.startswith(p + ".") and not exact_only)) and len(p) > best_len:
                best, best_len = name, len(p)
    return best


def test_every_module_is_seen():
    assert "kvpipe.pipeline.extraction.worker" in MODULES and "kvpipe.store.reader" in MODULES
    assert GRAPH["kvpipe.pipeline.extraction.job"] >= {"kvpipe.pipeline.extraction.worker", "kvpipe.store.writer"}


def test_no_import_circles():
    """Tarjan's strongly connected components over every import (package __init__s included)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH.get(v, ())):
            if w not in index:
                strong(w)
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
                circles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            strong(v)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_no_private_names_imported_from_another_module():
    bad = [f"{m}:{line} imports {n} from {base}"
           for m, p in MODULES.items() for base, names, line in _imports(p, m)
           for n in names if n.startswith("_") and not n.startswith("__") and base != m]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_floors(module):
    order = [name for name, _ in FLOORS]
    if module.startswith("kvpipe.probes"):
        allowed = set(PROBES_MAY_IMPORT)
    else:
        allowed = set(order[:order.index(_floor(module)) + 1])
    if _floor(module) in READS_PROBES or module.startswith("kvpipe.probes"):
        allowed.add("probes")
    wrong = []
    for target in GRAPH[module]:
        floor = "probes" if target.startswith("kvpipe.probes") else _floor(target)
        if floor not in allowed:
            wrong.append(f"{target} ({floor})")
    assert not wrong, f"{module} ({_floor(module)}) imports above its floor: {', '.join(sorted(wrong))}"
