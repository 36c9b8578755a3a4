"""The engine's tree says what runs where: kernels by device under kernels/, the one-token routes
under decode/, the architecture in model.py with no device's kernels behind it, and no module
circles. Read from the source with ast: every import that runs, at the top or inside a function,
but not those under `if TYPE_CHECKING:`."""

from __future__ import annotations

import ast
import fnmatch
import importlib
import tomllib
from pathlib import Path

import llamachat.engine
from llamachat.engine.kernels.cpu import native

ENGINE = Path(llamachat.engine.__file__).parent
ROOT = ENGINE.parent.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(ENGINE.rglob("*.py"))}


def type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(tree: ast.AST):
    """Import nodes that run, skipping the bodies of `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and type_checking_only(node):
            yield from (n for child in node.orelse for n in runtime_imports(child))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from runtime_imports(node)


def imported_names(name: str) -> set[str]:
    """Every module that module `name` imports when it runs, by full name."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = package
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
        found.add(target)
        found.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES)
    return found


GRAPH = {name: {t for t in imported_names(name) if t in MODULES} for name in MODULES}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in GRAPH[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_no_engine_module_imports_itself_through_others():
    circles = sorted(name for name in MODULES if name in reachable(name))
    assert circles == []


def test_only_modules_under_kernels_cuda_import_triton():
    importers = sorted(
        name
        for name in MODULES
        if any(t == "triton" or t.startswith("triton.") for t in imported_names(name))
    )
    assert importers
    assert [n for n in importers if not n.startswith("llamachat.engine.kernels.cuda.")] == []


def test_the_architecture_reaches_no_kernel_or_decode_route():
    device_code = (
        "llamachat.engine.kernels",
        "llamachat.engine.decode",
        "llamachat.engine.quantize",
    )
    for architecture in ("model", "rope", "kv_cache", "config"):
        reached = reachable(f"llamachat.engine.{architecture}")
        assert sorted(n for n in reached if n.startswith(device_code)) == [], architecture


def test_kernels_know_nothing_of_the_engine_around_them():
    for name in MODULES:
        if name.startswith("llamachat.engine.kernels."):
            outside = [t for t in GRAPH[name] if not t.startswith("llamachat.engine.kernels")]
            assert outside == [], name


def test_every_public_name_is_in_all_and_seen_by_type_checkers():
    exports = llamachat.engine._EXPORTS
    assert sorted(llamachat.engine.__all__) == sorted(exports)
    tree = ast.parse((ENGINE / "__init__.py").read_text(encoding="utf-8"))
    block = next(n for n in tree.body if isinstance(n, ast.If) and type_checking_only(n))
    typed = {
        alias.name: node.module
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert typed == exports
    for name, module in exports.items():
        defined = getattr(importlib.import_module(f"llamachat.engine.{module}"), name)
        assert getattr(llamachat.engine, name) is defined


def test_the_c_source_ships_as_package_data_of_the_package_it_lies_in():
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    package_data = settings["tool"]["setuptools"]["package-data"]
    package = module_name(native.SOURCE.parent / "__init__.py")
    globs = package_data.get(package, [])
    assert any(fnmatch.fnmatch(native.SOURCE.name, glob) for glob in globs), (package, globs)
