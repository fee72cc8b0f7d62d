"""Style rules a machine can check (our STYLE notes: "privates stay private").

A name with a leading underscore belongs to its module. When another module needs it, it belongs in
a shared, public place instead. Read from the source with `ast`, so imports inside functions count.
Tests may still reach into privates (e.g. to monkeypatch them); production code under upernet/ may not.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "upernet"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(importer: str, is_package: bool, module: str | None, level: int) -> str:
    """The absolute name of the module an ImportFrom points to."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(path: Path, root: Path = PACKAGE) -> list[str]:
    """'file:line: name from module' for every underscore name this file takes from another upernet module:
    `from upernet.x import _name`, and `x._name` where `x` is an upernet module imported here."""
    importer = module_name(path, root)
    where = path.relative_to(root.parent)
    tree = ast.parse(path.read_text(), str(path))
    found, modules = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = resolve(importer, path.name == "__init__.py", node.module, node.level)
            if not source.startswith("upernet") or source == importer:
                continue
            for alias in node.names:
                if is_private(alias.name):
                    found.append(f"{where}:{node.lineno}: {alias.name} from {source}")
                else:
                    modules[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("upernet.") and alias.asname:
                    modules[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and is_private(node.attr) and isinstance(node.value, ast.Name)
                and node.value.id in modules and modules[node.value.id] != importer):
            found.append(f"{where}:{node.lineno}: {node.attr} from {modules[node.value.id]}")
    return found


def test_resolve_relative_imports():
    assert resolve("upernet.data.multitask", False, "synthetic", 1) == "upernet.data.synthetic"
    assert resolve("upernet.convert.mmseg", False, "models.registry", 2) == "upernet.models.registry"
    assert resolve("upernet.models", True, "registry", 1) == "upernet.models.registry"


def test_the_check_sees_private_imports(tmp_path):
    """The rule fails on the forms it is meant to catch (so an empty result below means something)."""
    package = tmp_path / "upernet"
    (package / "data").mkdir(parents=True)
    (package / "data" / "multitask.py").write_text(
        "from .synthetic import _generator, public\n"
        "from .. import io as files\n"
        "def f():\n    from ..ops.resize import _band\n    return files._private\n")
    found = private_imports(package / "data" / "multitask.py", package)
    assert [f.split(": ")[1] for f in found] == [
        "_generator from upernet.data.synthetic", "_band from upernet.ops.resize", "_private from upernet.io"]


def test_no_private_names_imported_across_modules():
    found = [f for path in sorted(PACKAGE.rglob("*.py")) for f in private_imports(path)]
    assert not found, "make these public in a shared place:\n" + "\n".join(found)
