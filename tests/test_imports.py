"""The package's import graph: no cycle, layers point one way, and the lazy entry points stay light.

The graph is read from the source with `ast`, so every import counts, also one inside a function
(a lazy import is still a dependency). An edge goes to the module named by the import: `from
upernet.models.registry import build_model` -> upernet.models.registry, `from upernet.models import
zoo` -> upernet.models.zoo, `from upernet.models import build_model` -> upernet.models (its
__init__). `import upernet` followed by `upernet.load_model` (the lazy public API) -> upernet.loading.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "upernet"

# Bottom to top. A module may import modules of its own layer or of lower layers.
LAYERS = [
    {"upernet.errors", "upernet.io", "upernet.config", "upernet.distributed", "upernet.labelsets"},
    {"upernet.ops"},
    {"upernet.models", "upernet.data", "upernet.convert"},
    {"upernet.loading"},
    {"upernet.inference"},
    {"upernet.evaluation"},
    {"upernet.training"},
    {"upernet.serve"},
    {"upernet.cli"},
]
# Inside the models/data/convert layer: data stands alone, models do not know the converters.
FORBIDDEN_WITHIN_LAYER = {
    "upernet.data": {"upernet.models", "upernet.convert"},
    "upernet.models": {"upernet.convert", "upernet.data"},
}
EXEMPT = {"upernet"}  # upernet/__init__.py: the lazy public API names modules of every layer


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    where: str  # "upernet/x.py:12"

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported} ({self.where})"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def lazy_exports(modules: dict[str, Path]) -> dict[str, str]:
    """Name -> module of the lazy public API (the `_EXPORTS` table of upernet/__init__.py)."""
    tree = ast.parse(modules["upernet"].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("upernet/__init__.py has no _EXPORTS table: update lazy_exports() in this test")


def resolve_from(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an `ImportFrom` reads from (relative levels resolved)."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, modules: dict[str, Path], exports: dict[str, str]) -> list[Edge]:
    """Every import of an upernet module in one file, wherever it stands in the file."""
    rel = path.relative_to(PACKAGE.parent).as_posix()
    is_package = path.name == "__init__.py"
    edges = []

    def add(target: str, node: ast.AST) -> None:
        if target == "upernet" or target.startswith("upernet."):
            edges.append(Edge(name, target, f"{rel}:{node.lineno}"))

    imports_root = False
    for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
                imports_root |= alias.name == "upernet" and alias.asname is None
        elif isinstance(node, ast.ImportFrom):
            source = resolve_from(name, is_package, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:  # `from upernet.models import zoo`: the submodule
                    add(f"{source}.{alias.name}", node)
                elif source == "upernet" and alias.name in exports:  # `from upernet import load_model`
                    add(exports[alias.name], node)
                else:
                    add(source, node)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            add(node.args[0].value, node)
    if imports_root:  # `import upernet` then `upernet.load_model(...)`
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "upernet"
                    and node.attr in exports):
                add(exports[node.attr], node)
    return edges


def import_graph() -> list[Edge]:
    modules = package_modules()
    exports = lazy_exports(modules)
    edges = [e for name, path in modules.items() for e in imports_of(name, path, modules, exports)]
    unknown = sorted({e.imported for e in edges} - set(modules))
    assert not unknown, f"imports of upernet modules that do not exist: {unknown}"
    return edges


def find_cycles(edges: list[Edge]) -> list[tuple[list[Edge], list[str]]]:
    """(one shortest cycle, all modules of its strongly connected component) per component of the
    graph that has a cycle (self-imports included)."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e.importer, {}).setdefault(e.imported, e)
    # Tarjan's strongly connected components, iteratively.
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, {}))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, {})))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    components.append(component)
    cycles = []
    for component in components:
        start = min(component)
        if len(component) == 1 and start not in graph.get(start, {}):
            continue
        # breadth-first search for the shortest way back to `start` inside the component
        paths = {nxt: [graph[start][nxt]] for nxt in sorted(graph[start]) if nxt in component}
        frontier = list(paths)
        while start not in paths:
            step = []
            for node in frontier:
                for nxt in sorted(graph.get(node, {})):
                    if nxt in component and nxt not in paths:
                        paths[nxt] = paths[node] + [graph[node][nxt]]
                        step.append(nxt)
            frontier = step
        cycles.append((paths[start], sorted(component)))
    return sorted(cycles, key=lambda c: c[1])


def layer_of(module: str) -> tuple[int, str]:
    """(layer number, top-level unit such as upernet.models) of a module."""
    unit = ".".join(module.split(".")[:2])
    for number, units in enumerate(LAYERS):
        if unit in units:
            return number, unit
    raise AssertionError(f"{module} is in no layer: add {unit} to LAYERS in tests/test_imports.py")


def layer_violations(edges: list[Edge]) -> list[str]:
    found = []
    for e in edges:
        if e.importer in EXEMPT or e.imported == "upernet":  # the bare lazy package carries no dependency
            continue
        (low, low_unit), (high, high_unit) = layer_of(e.importer), layer_of(e.imported)
        if high > low:
            found.append(f"{e}: layer {low} ({low_unit}) imports layer {high} ({high_unit})")
        elif high_unit in FORBIDDEN_WITHIN_LAYER.get(low_unit, ()):
            found.append(f"{e}: {low_unit} must not import {high_unit}")
    return sorted(set(found))


# ---- the tests ---------------------------------------------------------------------------------
def test_graph_sees_lazy_relative_and_api_imports():
    """The parser itself: function-level, relative and lazy-API imports all become edges."""
    edges = {(e.importer, e.imported) for e in import_graph()}
    assert ("upernet.cli", "upernet.training.loop") in edges  # inside run_train
    assert ("upernet.cli", "upernet.loading") in edges  # `import upernet` + upernet.load_model
    assert ("upernet.config", "upernet.errors") in edges  # `from .errors import UserError`
    assert ("upernet.models", "upernet.models.zoo") in edges  # `from . import multitask, zoo`
    assert ("upernet", "upernet.models") in edges  # importlib.import_module("upernet.models")


def test_find_cycles_reports_the_cycle():
    a_b, b_c, c_a, c_d = (Edge("a", "b", "a:1"), Edge("b", "c", "b:1"), Edge("c", "a", "c:1"),
                          Edge("c", "d", "c:2"))
    c_b = Edge("c", "b", "c:3")
    assert find_cycles([a_b, b_c, c_d]) == []
    assert find_cycles([a_b, b_c, c_a, c_d]) == [([a_b, b_c, c_a], ["a", "b", "c"])]
    assert find_cycles([a_b, b_c, c_b, c_d]) == [([b_c, c_b], ["b", "c"])]
    assert find_cycles([Edge("a", "a", "a:3")]) == [([Edge("a", "a", "a:3")], ["a"])]


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    text = "\n\n".join(
        " -> ".join([cycle[0].importer] + [e.imported for e in cycle]) + "\n  " + "\n  ".join(map(str, cycle))
        + (f"\n  (the modules {', '.join(component)} all import each other through cycles)"
           if len(component) > len(cycle) else "")
        for cycle, component in cycles)
    assert not cycles, f"{len(cycles)} import cycle(s) in upernet/:\n{text}"


def test_layers_point_one_way():
    violations = layer_violations(import_graph())
    assert not violations, (f"{len(violations)} import(s) against the layering (bottom to top: errors/io/config/"
                            f"distributed -> ops -> models, data, convert -> loading -> inference -> evaluation -> "
                            f"training -> cli):\n" + "\n".join(violations))


def loaded_after(code: str) -> list[str]:
    """Top-level names of the modules in sys.modules of a fresh interpreter after running `code`."""
    script = (f"import sys\n{code}\n"
              "print('\\n' + __import__('json').dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_upernet_is_light():
    loaded = loaded_after("import upernet")
    assert "upernet" in loaded
    heavy = sorted({"timm", "transformers", "torchvision"} & set(loaded))
    assert not heavy, f"`import upernet` imports {heavy}"


def test_cli_help_is_light():
    code = ("import runpy\nsys.argv = ['upernet', '--help']\n"
            "try:\n    runpy.run_module('upernet.cli', run_name='__main__', alter_sys=True)\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code")
    loaded = loaded_after(code)
    assert "upernet" in loaded
    heavy = sorted({"timm", "transformers", "torchvision", "torch"} & set(loaded))
    assert not heavy, f"`python -m upernet.cli --help` imports {heavy}"
