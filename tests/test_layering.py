"""The import layering of src/sparseforge (DESIGN.md, "Layering without cycles"), checked on the source.

Every module under ``src/sparseforge`` is parsed with :mod:`ast` (nothing is
imported) and every ``import`` of a sparseforge module is an edge: at module
level or inside a function alike (a function-local import is a dependency
too, only a later one), except inside ``if TYPE_CHECKING:`` blocks, which
never run. Plug-in lookups by ``"module:attr"`` strings (the architecture
registry of :mod:`sparseforge.architectures`) are not imports and not edges:
that is how a lower layer reaches a registered object without depending on
its package.

The rules, at the level of the top-level modules and packages
(``sparseforge.<first component>``):

- no cycles: the graph of packages has no strongly connected component of
  more than one package;
- no package imports one of a higher layer (:data:`LAYERS`);
- every module has a layer (a new top-level module must be placed);
- at module level (the imports that run when a module is first imported)
  no two modules import each other, inside a package or across packages.

:data:`KNOWN_VIOLATIONS` lists the edges that break a rule today, each with
why it is left and where it goes; a listed edge that no longer exists fails
the test, so the list only shrinks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "sparseforge"

# The layer of every top-level module and package of sparseforge. A module may import modules of its own
# layer or of lower layers, never of a higher one; within a layer only the no-cycle rule applies.
# The order is DESIGN.md's: parts <- sparsifier/methods <- oneshot/merge/peft/quant <- io/kernels <- recipes
# <- cli, with zoo and bench on top. Two refinements the code teaches:
# - compact (dependency groups and compaction) sits with oneshot and merge, not with io: channel pruning
#   (oneshot.channels) and permutation alignment (merge.rebasin) are built on its dependency groups, and it
#   imports only base modules;
# - "recipes" in DESIGN.md's sense are the recipe objects that run a pipeline (pipelines.py: PruneRecipe,
#   QuantizeRecipe, ExportRecipe); recipes.py is the YAML <-> dataclass mapping every recipe object uses
#   (MergeRecipe in merge, TrainRecipe in distributed), a base module.
# registry, architectures, extras, training and pipelines arrive with the other branches of issue 15.
BASE, CORE, TOOLS, FORMATS, PIPELINES, CLI, TOP = range(7)
LAYERS: dict[str, int] = {
    # base: no sparseforge imports but each other
    "errors": BASE, "files": BASE, "oserrors": BASE, "progress": BASE, "threads": BASE, "timing": BASE,
    "version": BASE, "registry": BASE, "extras": BASE, "recipes": BASE, "architectures": BASE,
    "formats": BASE,  # names and digests every file format shares (merge and peft write files too)
    "collectives": BASE,  # the torch.distributed collectives the Sparsifier runs
    "layers": BASE,  # transformers' Conv1D and PreTrainedModel, recognised without importing transformers
    "tokens": BASE, "quality": BASE, "report": BASE,  # measuring a model
    "datasets": BASE,  # datasets by name (the zoo's registered lazily) and the in-memory batch loader
    # the six parts
    "targets": BASE, "patterns": BASE, "scores": BASE, "allocation": BASE, "schedules": BASE, "updates": BASE,
    "method": BASE,  # Method: the composition of the six parts, which the Sparsifier runs and methods/ presets
    # the lifecycle and the method presets
    "sparsifier": CORE, "methods": CORE,
    # what is built on methods and the sparsifier
    "oneshot": TOOLS, "merge": TOOLS, "peft": TOOLS, "quant": TOOLS, "distributed": TOOLS, "training": TOOLS,
    "compact": TOOLS,
    # storing and running what is left
    "io": FORMATS, "kernels": FORMATS,
    # recipe objects that run a pipeline; the demo is one (it names its model and data through the registries)
    "pipelines": PIPELINES, "demo": PIPELINES,
    "speed": PIPELINES,  # times a model's deployment paths (kernels, oneshot's layer selection) for cli and bench
    "cli": CLI,
    # on top: nothing below imports them
    "zoo": TOP, "bench": TOP, "export": TOP, "__main__": TOP, ROOT: TOP,
}

# Edges (importing module, imported module) that break a rule today, with why they stay for now.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {
}


@dataclass(frozen=True)
class Edge:
    """One import of a sparseforge module: where it is and whether it runs at import time."""

    source: str
    target: str
    path: str
    line: int
    module_level: bool

    def where(self) -> str:
        return f"{self.path}:{self.line} ({self.source} -> {self.target})"


def _modules(src: Path = SRC) -> dict[str, Path]:
    mods = {}
    for path in (src / ROOT).rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _resolve(mods: dict[str, Path], current: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The sparseforge modules an import statement loads (a name imported from a package that is a
    submodule counts as that submodule)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            package = current.split(".") if mods[current].name == "__init__.py" else current.split(".")[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base for alias in node.names]
    for name in names:
        if name != ROOT and not name.startswith(ROOT + "."):
            continue
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in mods and name != current:
            yield name


def _edges(src: Path = SRC) -> list[Edge]:
    mods = _modules(src)
    edges = []
    for name, path in sorted(mods.items()):
        rel = str(path.relative_to(src.parent))

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                    visit(child, True)
                elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    for stmt in child.orelse:  # the else branch of `if TYPE_CHECKING:` runs
                        visit(ast.Module(body=[stmt], type_ignores=[]), in_function)
                elif isinstance(child, ast.Import | ast.ImportFrom):
                    for target in dict.fromkeys(_resolve(mods, name, child)):  # once per statement
                        edges.append(Edge(name, target, rel, child.lineno, not in_function))
                else:
                    visit(child, in_function)

        visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return edges


def _top(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _short(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def _sccs(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return _edges()


def _counted(edges: list[Edge]) -> list[Edge]:
    return [e for e in edges if (e.source, e.target) not in KNOWN_VIOLATIONS]


def test_every_top_level_module_has_a_layer() -> None:
    unplaced = sorted({_short(_top(m)) for m in _modules()} - set(LAYERS))
    assert not unplaced, f"place these modules in LAYERS of tests/test_layering.py: {unplaced}"


def test_no_import_cycles_between_packages(edges: list[Edge]) -> None:
    graph: dict[str, set[str]] = {}
    for e in _counted(edges):
        a, b = _top(e.source), _top(e.target)
        graph.setdefault(a, set())
        graph.setdefault(b, set())
        if a != b:
            graph[a].add(b)
    cycles = _sccs(graph)
    details = []
    for component in cycles:
        inside = [e.where() for e in _counted(edges)
                  if _top(e.source) in component and _top(e.target) in component and _top(e.source) != _top(e.target)]
        details.append(f"{component}: " + "; ".join(inside[:8]))
    assert not cycles, "import cycles between packages:\n" + "\n".join(details)


def test_no_package_imports_a_higher_layer(edges: list[Edge]) -> None:
    upward = [e.where() + f" [{_short(_top(e.source))}: layer {LAYERS[_short(_top(e.source))]}, "
              f"{_short(_top(e.target))}: layer {LAYERS[_short(_top(e.target))]}]"
              for e in _counted(edges)
              if LAYERS.get(_short(_top(e.target)), -1) > LAYERS.get(_short(_top(e.source)), TOP)]
    assert not upward, "imports of a higher layer (DESIGN.md, layering):\n" + "\n".join(upward)


def test_no_module_level_import_cycles(edges: list[Edge]) -> None:
    graph: dict[str, set[str]] = {}
    for e in edges:
        if e.module_level:
            graph.setdefault(e.source, set()).add(e.target)
            graph.setdefault(e.target, set())
    assert not _sccs(graph), f"modules importing each other at import time: {_sccs(graph)}"


def test_known_violations_still_exist_and_still_violate(edges: list[Edge]) -> None:
    """Each listed edge must still be in the code and still break a rule: fixed ones leave the list."""
    present = {(e.source, e.target) for e in edges}
    stale = [edge for edge in KNOWN_VIOLATIONS if edge not in present]
    assert not stale, f"no longer in the code, remove from KNOWN_VIOLATIONS: {stale}"
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(_top(e.source), set()).add(_top(e.target))
        graph.setdefault(_top(e.target), set())
    in_cycle = {node for component in _sccs(graph) for node in component}
    harmless = [(a, b) for a, b in KNOWN_VIOLATIONS
                if LAYERS[_short(_top(b))] <= LAYERS[_short(_top(a))] and not {_top(a), _top(b)} <= in_cycle]
    assert not harmless, f"these edges break no rule, remove them from KNOWN_VIOLATIONS: {harmless}"


def test_the_check_sees_function_local_and_relative_imports_but_not_type_checking_ones(tmp_path: Path) -> None:
    pkg = tmp_path / "src" / ROOT
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import inner\n")
    (pkg / "sub" / "inner.py").write_text("")
    (pkg / "b.py").write_text("")
    (pkg / "c.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nimport os\n"
        "if TYPE_CHECKING:\n    from sparseforge.c import C\n"
        "def f():\n    from sparseforge import b\n    return b\n"
        "from .sub import inner\n"
    )
    found = {(e.source, e.target, e.module_level) for e in _edges(tmp_path / "src")}
    assert found == {
        ("sparseforge.a", "sparseforge.b", False),
        ("sparseforge.a", "sparseforge.sub.inner", True),
        ("sparseforge.sub", "sparseforge.sub.inner", True),
    }
    assert _sccs({"x": {"y"}, "y": {"x"}, "z": {"x"}}) == [["x", "y"]]
