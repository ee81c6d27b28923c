"""The shape of the code: no import cycle, no reaching into another class's private members, and the package
lists (pyproject's, the add-on zip's) in step with the folders on disk.

The first two read the sources (ast), they import nothing; the zip test builds the add-on and imports every module
of it in a separate Python."""

from __future__ import annotations

import ast
import itertools
import json
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.unit

#: The project's own packages (tests/ excluded: it is no package and imports what it checks).
PACKAGES = ("protocol", "client", "server_addon", "tools")
#: Underscore names that are public, documented API of the standard library (namedtuple's methods, os._exit,
#: sys._getframe): the leading underscore there keeps them apart from field names, it does not make them private.
DOCUMENTED_UNDERSCORE = frozenset({"_asdict", "_replace", "_fields", "_make", "_field_defaults", "_exit", "_getframe"})


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. server_addon.core.server
    path: Path
    is_package: bool

    @property
    def package(self) -> str:
        """The package that relative imports in this module start from."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


def project_modules() -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for top in PACKAGES:
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO)
            if "__pycache__" in rel.parts:
                continue
            parts = list(rel.with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            modules[".".join(parts)] = Module(".".join(parts), path, is_package)
    return modules


def parse(module: Module) -> ast.Module:
    return ast.parse(module.path.read_text(encoding="utf-8"), str(module.path))


def relpath(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


# --- a. no import cycle at run time ----------------------------------------------------------------------------

def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_time_statements(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports a module body runs when it is imported: at the top level, in if/try/with blocks and class
    bodies; not in functions (they run later), not under `if TYPE_CHECKING:` (never at run time)."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from import_time_statements(node.body)
            yield from import_time_statements(node.orelse)
        elif isinstance(node, ast.Try | ast.TryStar):
            for block in (node.body, *(handler.body for handler in node.handlers), node.orelse, node.finalbody):
                yield from import_time_statements(block)
        elif isinstance(node, ast.With | ast.AsyncWith | ast.ClassDef):
            yield from import_time_statements(node.body)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_edges(module: Module, tree: ast.Module, modules: dict[str, Module]) -> dict[str, int]:
    """Project modules that importing `module` runs first -> the line of the import.

    Importing a.b.c runs a and a.b first; those that are packages around `module` itself are already being
    imported when its body runs, so they are no edge, except for `from <such a package> import <a name it
    defines>`, which needs that package's body to have run that far."""
    around = set(_ancestors(module.name)) | ({module.name} if module.is_package else set())
    edges: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        for name in (*_ancestors(target), target):
            if name in modules and name not in around and name != module.name:
                edges.setdefault(name, line)

    for node in import_time_statements(tree.body):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
            continue
        if node.level:
            base = module.package.split(".")
            base = base[:len(base) - (node.level - 1)]
            source = ".".join([*base, *([node.module] if node.module else [])])
        else:
            source = node.module or ""
        add(source, node.lineno)
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            if submodule in modules:
                add(submodule, node.lineno)
            elif source in around and source in modules:
                edges.setdefault(source, node.lineno)  # a name from a package body that is still running
    return edges


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first, colours)."""
    colour: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, {})):
            if colour.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in colour and (found := visit(target)):
                return found
        path.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if node not in colour and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {"c": 2}, "d": {"a": 4, "c": 5}}) is None


def test_the_walk_sees_relative_and_from_imports_and_leaves_out_type_checking_and_functions() -> None:
    modules = {name: Module(name, REPO / "x.py", is_package) for name, is_package in [
        ("pkg", True), ("pkg.sub", True), ("pkg.sub.a", False), ("pkg.sub.b", False), ("pkg.sub.c", False),
        ("pkg.d", False), ("pkg.e", False), ("pkg.f", False), ("other", True), ("other.g", False)]}
    tree = ast.parse("""
from typing import TYPE_CHECKING
import json
from . import b
from .c import thing
from .. import d, VERSION
from pkg import sub
import other.g
try:
    from ..e import x
except ImportError:
    pass
if TYPE_CHECKING:
    from ..f import Later

def later():
    from pkg.f import y
""")
    edges = import_edges(modules["pkg.sub.a"], tree, modules)
    # pkg and pkg.sub are already being imported around pkg.sub.a; `VERSION` is read from pkg's body
    assert edges == {"pkg.sub.b": 4, "pkg.sub.c": 5, "pkg.d": 6, "pkg": 6, "other": 8, "other.g": 8, "pkg.e": 10}


def test_no_import_cycle() -> None:
    modules = project_modules()
    graph = {name: import_edges(module, parse(module), modules) for name, module in modules.items()}
    cycle = find_cycle(graph)
    if cycle:
        steps = [f"{a} ({relpath(modules[a].path)}:{graph[a][b]}) imports {b}"
                 for a, b in itertools.pairwise(cycle)]
        pytest.fail("import cycle at run time:\n  " + "\n  ".join(steps))


# --- b. no collaborator reaches a private member of another class ----------------------------------------------

def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__")) and name != "_"


def private_names_defined(tree: ast.Module) -> set[str]:
    """The private names a module defines: module-level helpers, and its classes' private methods, class
    attributes, fields and the `self._x` / `cls._x` attributes their methods set."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    for cls in (node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)):
        for item in cls.body:
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(item.name)
            elif isinstance(item, ast.Assign):
                names.update(t.id for t in item.targets if isinstance(t, ast.Name))
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                names.add(item.target.id)
        for node in ast.walk(cls):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = list(node.targets)
            elif isinstance(node, ast.AnnAssign | ast.AugAssign):
                targets = [node.target]
            for target in targets:
                for element in (target.elts if isinstance(target, ast.Tuple) else [target]):
                    if (isinstance(element, ast.Attribute) and isinstance(element.value, ast.Name)
                            and element.value.id in ("self", "cls")):
                        names.add(element.attr)
    return {name for name in names if _is_private(name)}


def private_reaches(tree: ast.Module, where: str) -> Iterator[str]:
    """`x._name` where x is not self, cls or super(), and no class or helper of this module defines _name."""
    own = private_names_defined(tree)
    for node in sorted((n for n in ast.walk(tree) if isinstance(n, ast.Attribute)), key=lambda n: n.lineno):
        if not isinstance(node, ast.Attribute) or not _is_private(node.attr) or node.attr in own:
            continue
        value = node.value
        if isinstance(value, ast.Name) and value.id in ("self", "cls"):
            continue
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super":
            continue
        if node.attr in DOCUMENTED_UNDERSCORE:
            continue
        yield f"{where}:{node.lineno}: {ast.unparse(value)}.{node.attr}"


def test_the_private_check_sees_a_reach_and_allows_a_class_its_own() -> None:
    tree = ast.parse('''
import os
from .helpers import _shared

class Farm:
    _limit = 3

    def __init__(self):
        self._jobs = {}

    def merge(self, other):
        return other._jobs, other._limit, self._jobs, super()._x, os._exit

def _helper(value):
    return value

def handler(server):
    return server._dispatch(), server.farm._jobs, _helper(1), _shared.__name__, server.farm._clients
''')
    assert private_names_defined(tree) == {"_jobs", "_limit", "_helper", "_shared"}
    assert sorted(private_reaches(tree, "m.py")) == ["m.py:18: server._dispatch", "m.py:18: server.farm._clients"]


def _reaches() -> tuple[list[str], list[str]]:
    """Every private reach, split into those into the project's own classes and modules, and the rest (into
    libraries: the asset tracer's internals, the standard library's)."""
    modules = project_modules().values()
    ours = set().union(*(private_names_defined(parse(module)) for module in modules))
    inside, outside = [], []
    for module in modules:
        for line in private_reaches(parse(module), relpath(module.path)):
            (inside if line.rsplit(".", 1)[1] in ours else outside).append(line)
    return inside, outside


def test_no_collaborator_reaches_a_private_member_of_another_class() -> None:
    violations, _ = _reaches()
    assert not violations, (f"{len(violations)} reaches into private members of other classes or modules:\n  "
                            + "\n  ".join(violations))


#: The library internals the project reaches into on purpose, each with its reason (a new one must be added here,
#: with why, so that none creeps in unnoticed).
LIBRARY_REACHES = {
    # BAT 1.23 lacks the node-tree lookup of Blender 5.x files: trace.py replaces its expanders for them.
    "expanders._expand_generic_nodetree", "expanders._expand_generic_nodetree_id", "expanders._microfarm_nodetree_fix",
    # trace.py puts a stand-in for the main .blend into BAT's file cache: BAT reads the stored copy as if it lay
    # in the artist's folder.
    "blendfile._uncache", "blendfile._cache",
    # A pack's planned actions, read to list what a trace found without copying anything.
    "packer._actions",
    # confine.py wraps BAT's walk over linked blocks, to bound the web's traces in time and depth.
    "iterator._visit_linked_blocks", "iterator._queue_dependencies",
    # client/finish.py runs Python's exit handlers itself, then ends without Blender's C++ destructors (bpy 4.x).
    "atexit._run_exitfuncs",
}


def test_reaches_into_libraries_are_the_known_ones() -> None:
    _, outside = _reaches()
    unknown = [line for line in outside if line.split(": ", 1)[1] not in LIBRARY_REACHES]
    assert not unknown, "reaches into a library's private members, not in LIBRARY_REACHES:\n  " + "\n  ".join(unknown)


# --- c. the package lists and the add-on zip -------------------------------------------------------------------

def package_folders() -> set[str]:
    return {relpath(init.parent).replace("/", ".") for top in PACKAGES for init in (REPO / top).rglob("__init__.py")
            if "__pycache__" not in init.parts}


def test_every_folder_of_python_files_is_a_package() -> None:
    folders = {relpath(path.parent) for top in PACKAGES for path in (REPO / top).rglob("*.py")
               if "__pycache__" not in path.parts}
    assert {folder.replace("/", ".") for folder in folders} <= package_folders(), "a folder without __init__.py"


def test_pyproject_lists_every_package() -> None:
    listed = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"]
    assert len(listed) == len(set(listed))
    assert set(listed) == package_folders()


#: Imports every module named on the command line from the unpacked add-on (as `microfarm`, the name the zip's
#: root package gets, like bl_ext.<repository>.microfarm in Blender) and its protocol wheel, and reports per module.
IMPORT_ALL = """
import importlib, json, sys, traceback
root = sys.argv[1]
sys.path.insert(0, root)
results = {}
for name in sys.argv[2:]:
    try:
        module = importlib.import_module(name)
        results[name] = "ok" if module.__file__.startswith(root) else f"imported from {module.__file__}"
    except BaseException:
        results[name] = traceback.format_exc(limit=3)
print(json.dumps(results))
"""


def test_the_built_zip_carries_and_imports_every_module(addon_zip: Path, tmp_path: Path) -> None:
    modules = project_modules()
    root = tmp_path / "unpacked"
    addon = root / "microfarm"
    with zipfile.ZipFile(addon_zip) as zf:
        zf.extractall(addon)
    (wheel,) = (addon / "wheels").glob("microfarm_protocol-*.whl")
    with zipfile.ZipFile(wheel) as wz:
        wz.extractall(root)

    # Every module of server_addon is in the zip, but the headless entry point (tools.build_addon leaves it out:
    # Blender runs the add-on, not `python -m`); every module of protocol and client is in its wheel.
    expected: dict[str, Path] = {}
    for name, module in modules.items():
        top, _, rest = name.partition(".")
        if top == "server_addon" and name != "server_addon.__main__":
            inner = f"microfarm.{rest}" if rest else "microfarm"
            expected[inner] = addon / module.path.relative_to(REPO / "server_addon")
        elif top in ("protocol", "client"):
            expected[name] = root / module.path.relative_to(REPO)
    missing = sorted(name for name, path in expected.items() if not path.is_file())
    assert not missing, f"modules missing from {addon_zip.name}: {missing}"
    assert not (addon / "__main__.py").exists()

    # And each imports from there, in a Python that has the test venv's packages (bpy 5.0.1 among them) but not
    # the repository: entry points (__main__) run their program on import, so they are only checked for presence.
    names = sorted(name for name in expected if not name.endswith(".__main__"))
    result = subprocess.run([sys.executable, "-I", "-c", IMPORT_ALL, str(root), *names], cwd=tmp_path,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    failed = {name: why for name, why in outcome.items() if why != "ok"}
    assert not failed, "modules of the zip that do not import:\n" + "\n".join(f"{n}: {w}" for n, w in failed.items())
    assert set(outcome) == set(names)
