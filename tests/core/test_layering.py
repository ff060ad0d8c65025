"""The package's shape: no import cycle, no import that runs upward, no module over ~500 lines.

Every ``import`` / ``from ... import`` under spobench/ counts, including the lazy ones inside functions
(a lazy import is still a dependency; it only moves the failure to run time). The catalog's
``"module:object"`` strings are not imports: naming every built-in is the catalog's job, and the registry
imports them only when a name is used.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "spobench"

# Lowest first. A module may import its own layer or any layer below it, never one above.
# A layer is a list of module prefixes; the longest matching prefix decides a module's layer (the bare
# package name ``spobench`` matches only its own __init__, so a new module must find its layer here).
LAYERS: list[tuple[str, tuple[str, ...], str]] = [
    ("core", ("spobench", "spobench.core"),
     "errors, registry + catalog, io, weights, checkpoint: what every other layer leans on"),
    ("data", ("spobench.data",),
     "prompts, prompt sets, pairs, images: plain files in, plain objects out; no model needed"),
    ("models", ("spobench.models",),
     "backbones and the SPM as modules with weights; they read data, never drive training"),
    ("engine", ("spobench.engine",),
     "DDIM steps, rollouts and scoring shared by every trainer; they drive models"),
    ("world", ("spobench.toyworld",),
     "the tiny world itself (vocabulary, grammar, renderer, oracle, tiny CLIP): the toy metrics score against it"),
    ("metrics", ("spobench.metrics",),
     "reward models and rule checks; the SPM trainer and eval read their scores"),
    ("trainers", ("spobench.trainers",),
     "one algorithm per file on top of engine + metrics"),
    ("eval", ("spobench.eval",),
     "generate, evaluate, compare, report: runs trained models and metrics, reads SPM checkpoints"),
    ("world-tools", ("spobench.toyworld.pairs", "spobench.toyworld.pretrain", "spobench.toyworld.pickscore_train",
                     "spobench.toyworld.flow_pretrain", "spobench.toyworld.flow_check"),
     "make the tiny world's base model, pairs and PickScore with the generic trainers and generate"),
    ("reproduce", ("spobench.reproduce", "spobench.recipes"),
     "recipes: chains generate -> train -> evaluate -> compare -> report"),
    ("app", ("spobench.cli", "spobench.assets"),
     "the command line and the asset build scripts: nothing imports them"),
]

# Known violations other helpers are fixing. Each is (importing file, imported module): excused from the
# checks below, and test_known_violations_are_still_real fails once it is gone, so the entry gets removed.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}

MAX_LINES = 500
# Oversize modules allowed for a stated reason; test_known_violations_are_still_real drops stale ones.
KNOWN_LONG: dict[str, str] = {}


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported module
    file: str
    line: int

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _owning_module(name: str) -> str | None:
    """``spobench.core.io.atomic_write`` -> ``spobench.core.io``: the longest prefix that is a module."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imported_names(source: str, package: str, filename: str = "<string>") -> list[tuple[str, int]]:
    """(dotted name, line) for every import in ``source``, at any depth; relative ones made absolute
    against ``package``. ``from a.b import c`` names a.b.c when that is a module, else a.b."""
    out = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out += [(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base, node.lineno)
                    for a in node.names]
    return out


def _edges() -> list[Edge]:
    edges = []
    for mod, path in MODULES.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        rel = path.relative_to(ROOT).as_posix()
        for name, line in imported_names(path.read_text(), package, rel):
            target = _owning_module(name) if name.split(".")[0] == "spobench" else None
            if target and target != mod:
                edges.append(Edge(mod, target, rel, line))
    return edges


EDGES = _edges()


def _excused(edge: Edge) -> bool:
    return (edge.file, edge.target) in KNOWN_UPWARD


def layer_of(module: str) -> int:
    best, index = -1, None
    for i, (_, prefixes, _) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or (module.startswith(p + ".") and p != "spobench")) and len(p) > best:
                best, index = len(p), i
    assert index is not None, f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}"
    return index


def _find_cycle(edges: list[Edge]) -> list[Edge] | None:
    graph: dict[str, list[Edge]] = {}
    for e in edges:
        graph.setdefault(e.source, []).append(e)
    done: set[str] = set()
    stack: list[str] = []  # modules on the current path; path[i] is the edge stack[i] -> stack[i + 1]
    path: list[Edge] = []

    def visit(node: str) -> list[Edge] | None:
        stack.append(node)
        for e in graph.get(node, []):
            if e.target in stack:
                return path[stack.index(e.target):] + [e]
            if e.target not in done:
                path.append(e)
                found = visit(e.target)
                if found:
                    return found
                path.pop()
        stack.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done:
            found = visit(node)
            if found:
                return found
    return None


def test_every_module_has_a_layer():
    for mod in MODULES:
        layer_of(mod)


def test_no_import_cycle():
    cycle = _find_cycle([e for e in EDGES if not _excused(e)])
    assert cycle is None, "import cycle: " + " -> ".join(
        [cycle[0].source] + [f"{e.target} ({e.where()})" for e in cycle])


def test_no_import_runs_upward():
    upward = sorted({e for e in EDGES if layer_of(e.target) > layer_of(e.source) and not _excused(e)},
                    key=lambda e: (e.file, e.line))
    assert not upward, "imports that run upward:\n" + "\n".join(
        f"{e.where()}: {e.source} [{LAYERS[layer_of(e.source)][0]}] imports {e.target} "
        f"[{LAYERS[layer_of(e.target)][0]}]" for e in upward)


def test_no_module_over_500_lines():
    long = {}
    for path in MODULES.values():
        rel = path.relative_to(ROOT).as_posix()
        n = len(path.read_text().splitlines())
        if n > MAX_LINES and rel not in KNOWN_LONG:
            long[rel] = n
    assert not long, f"modules over {MAX_LINES} lines (split each into modules that own one idea): {long}"


def test_known_violations_are_still_real():
    live = {(e.file, e.target) for e in EDGES}
    stale = [k for k in KNOWN_UPWARD if k not in live]
    stale += [f for f in KNOWN_LONG if not (ROOT / f).is_file() or len((ROOT / f).read_text().splitlines()) <= MAX_LINES]
    assert not stale, f"fixed - remove from KNOWN_UPWARD / KNOWN_LONG in {Path(__file__).name}: {stale}"


def test_the_scan_sees_lazy_and_relative_imports():
    # the checks above prove nothing unless imports inside functions and relative imports are seen
    src = ("import os\nfrom spobench.core import errors, io\n"
           "def f():\n    from spobench.eval.report import write_report\n"
           "    from . import pairs\n    from ..core.io import atomic_write\n")
    names = imported_names(src, "spobench.data")
    assert ("spobench.core.errors", 2) in names and ("spobench.core.io", 2) in names
    assert ("spobench.eval.report", 4) in names
    assert ("spobench.data.pairs", 5) in names
    assert ("spobench.core.io", 6) in names


def test_the_cycle_finder_reports_the_cycle():
    edges = [Edge("a", "b", "a.py", 1), Edge("b", "c", "b.py", 2), Edge("c", "b", "c.py", 3), Edge("c", "d", "c.py", 4)]
    cycle = _find_cycle(edges)
    assert [(e.source, e.target) for e in cycle] == [("b", "c"), ("c", "b")]
    assert _find_cycle(edges[:2] + edges[3:]) is None
