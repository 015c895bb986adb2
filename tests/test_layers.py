"""The layers of moescope: packages by concept, every import going strictly down, no cycles.

:data:`LAYERS` is the package table (README "Layout"): a package may import only packages of a
lower level, type-only imports (``if TYPE_CHECKING:``) included, and the package root holds
only :data:`ROOT_FILES`. Within a package, modules may import each other, but no cycle is
allowed anywhere, type-only edges included.

How the graph is read: no import cycles among moescope's modules, function-level imports included.

The files are read, not imported: every ``import moescope.x`` and ``from moescope.x import y``
(also relative ones, and those inside functions; not those under ``if TYPE_CHECKING:``)
becomes an edge from the importing module to the module it names. ``from package import
name`` points at ``package.name`` when that is a module, else at the package's
``__init__``. Importing a submodule also runs its package's ``__init__``, but that edge is
left out: a package that re-exports its submodules would otherwise always be a cycle. Every
cycle found is reported, each as one path ``a -> b -> ... -> a``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "moescope"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


#: package (or root module) -> level; imports go from a higher level to a strictly lower one
LAYERS: dict[str, int] = {
    # leaves: errors and the version; owned output directories; the shipped demo files
    "errors": 0,
    "__init__": 0,
    "outdir": 1,
    "demo": 1,
    # plain data and records: family records, corpus reading, trace directory files
    "families": 2,
    "corpus": 2,
    "tracedir": 2,
    # what a checkpoint is (no I/O), statistics of a trace
    "arch": 3,
    "stats": 3,
    # reading checkpoints: references, headers, hub
    "checkpoint": 4,
    # using a checkpoint: accounting (no torch), running it (torch, transformers)
    "accounting": 5,
    "execution": 5,
    # the passes over a corpus
    "tracing": 6,
    "evaluation": 6,
    "redundancy": 6,
    "serving": 6,
    # what is built from passes and traces
    "pruning": 7,
    "importers": 7,
    "reporting": 7,
    # the faces: Python API, command line
    "api": 8,
    "cli": 9,
    "__main__": 10,
}

#: the only files at the package root (everything else lives in a package of LAYERS)
ROOT_FILES = {"__init__.py", "__main__.py", "api.py", "errors.py", "outdir.py", "py.typed"}


def _unit(module: str) -> str:
    """The LAYERS entry a module belongs to (``moescope.arch.moe`` -> ``arch``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks (not run at import time)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def _imports(name: str, path: Path, modules: dict[str, Path], typing: bool = False) -> set[str]:
    """The moescope modules that module ``name`` imports (anywhere in the file; ``typing``: type-only too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skipped = set() if typing else _type_checking_nodes(tree)
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule; `from pkg import name`, the package
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import moescope.x.y` -> nearest module
                target = target.rpartition(".")[0]
            if target.split(".")[0] == PACKAGE and target != name:
                found.add(target)
    return found


def import_graph(typing: bool = False) -> dict[str, set[str]]:
    """moescope module -> the moescope modules it imports (``typing``: type-only imports too)."""
    modules = _modules()
    return {name: _imports(name, path, modules, typing) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the number of modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(comp, graph) for comp in sorted(components)]


def _cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module, as a path back to it."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    return [*component, component[0]]  # unreachable for a strongly connected component


def test_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "moescope.errors" in graph["moescope.checkpoint.ref"]  # top-level `from moescope.x import`
    assert "moescope.arch.inventory" in graph["moescope.arch.closedform"]
    assert "moescope.arch.specfile" in graph["moescope.checkpoint.ref"]  # function-level import


def test_find_cycles_reports_each_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["d", "e", "d"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("typing", [False, True], ids=["run time", "type-only included"])
def test_no_import_cycles(typing: bool) -> None:
    cycles = find_cycles(import_graph(typing))
    assert not cycles, "import cycles among moescope modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_module_has_a_layer() -> None:
    units = {_unit(m) for m in _modules()}
    assert units <= set(LAYERS), f"modules outside the LAYERS table: {sorted(units - set(LAYERS))}"
    assert set(LAYERS) <= units, f"LAYERS names packages that do not exist: {sorted(set(LAYERS) - units)}"


def test_imports_go_strictly_down() -> None:
    upward = []
    for module, targets in import_graph(typing=True).items():
        here = _unit(module)
        for target in targets:
            there = _unit(target)
            if there != here and LAYERS[there] >= LAYERS[here]:
                upward.append(f"{module} ({here}, {LAYERS[here]}) -> {target} ({there}, {LAYERS[there]})")
    assert not upward, "imports that do not go down a layer:\n" + "\n".join(sorted(upward))


def test_root_holds_only_the_named_files() -> None:
    root = ROOT / PACKAGE
    files = {p.name for p in root.iterdir() if p.is_file()}
    assert files == ROOT_FILES, f"unexpected files at the package root: {sorted(files ^ ROOT_FILES)}"
    folders = {p.name for p in root.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(LAYERS) - {Path(f).stem for f in ROOT_FILES}, sorted(folders)


def test_layer_check_catches_an_upward_import() -> None:
    """The check would fail on a real upward edge (arch importing tracing, say)."""
    graph = {"moescope.arch.moe": {"moescope.tracing.run"}}
    assert any(LAYERS[_unit(t)] >= LAYERS[_unit(m)] for m, ts in graph.items() for t in ts)


def test_inventory_is_a_leaf() -> None:
    """The tensor types sit below everything that reads or builds an inventory."""
    graph = import_graph()
    assert graph["moescope.arch.inventory"] <= {"moescope.errors"}
    assert graph["moescope.checkpoint.jsonfiles"] <= {"moescope.errors", "moescope.arch.inventory"}
    assert graph["moescope.checkpoint.header"] <= {
        "moescope.errors",
        "moescope.arch.inventory",
        "moescope.checkpoint.jsonfiles",
    }
    assert graph["moescope.checkpoint.forksplit"] == set()
