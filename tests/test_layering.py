"""The layering contract: a module imports only from its own stage or earlier ones, and no modules import each other.

Stages follow the data, earliest first:

    core < io < peft < arch < engines < convert < smoke < check < pipeline < scan < api < cli

core is the vocabulary every stage shares (errors, findings, codes, text and the package root); kernels/ ships as
lora_convert.kernels and belongs to smoke; schemas/ ships as lora_convert.schemas (JSON only) and belongs to arch.

Every import counts: top level, inside functions (a lazy import is still a dependency; it only moves the failure
to run time), under `if TYPE_CHECKING:` (a type from a later stage is a dependency too), relative imports, and a
string literal naming a lora_convert module (what `importlib.import_module` and `find_spec` are given).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "lora_convert"
# Folders that ship as a package of their own name (setup.py's MAPPED_FOLDERS).
SOURCE_FOLDERS = {
    PACKAGE: ROOT / "lora_convert",
    "lora_convert.kernels": ROOT / "kernels",
    "lora_convert.schemas": ROOT / "schemas",
}

STAGES = ("core", "io", "peft", "arch", "engines", "convert", "smoke", "check", "pipeline", "scan", "api", "cli")
# Module (or package, covering everything under it) -> stage. The longest matching prefix wins.
STAGE_OF = {
    "lora_convert": "core",  # the package root only; every other top-level module must be listed
    "lora_convert.errors": "core",
    "lora_convert.findings": "core",
    "lora_convert.codes": "core",
    "lora_convert.text": "core",
    "lora_convert.io": "io",
    "lora_convert.peft": "peft",
    "lora_convert.arch": "arch",
    "lora_convert.schemas": "arch",
    "lora_convert.engines": "engines",
    "lora_convert.convert": "convert",
    "lora_convert.smoke": "smoke",
    "lora_convert.kernels": "smoke",
    "lora_convert.check": "check",
    "lora_convert.pipeline": "pipeline",
    "lora_convert.scan": "scan",
    "lora_convert.api": "api",
    "lora_convert.cli": "cli",
    "lora_convert.__main__": "cli",
}

# The package root's `__getattr__` loads the public API on first attribute access: `_API` maps each name to its
# module as a *string*, resolved only when a user outside the package touches `lora_convert.<name>`, never while a
# lora_convert module is being imported. Those strings are therefore not edges of the root. A module inside the
# package that did `from lora_convert import validate_adapter` would reach that module through the root; such an
# import is resolved to the real module below and checked like any other.
LAZY_FACADE = "lora_convert"

# Violations being fixed in other work right now, as (importer, imported). Must end empty; do not add to it.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()
KNOWN_CYCLES: list[set[str]] = []


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported} (line {self.line})"


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCE_FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if package == PACKAGE and parts and parts[0] in ("kernels", "schemas"):
                continue  # never a folder inside lora_convert/; the mapped folders are authoritative
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _lazy_api() -> dict[str, str]:
    """The root's `_API` literal: public name -> the module that defines it."""
    tree = ast.parse(MODULES[LAZY_FACADE].read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_API" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("lora_convert/__init__.py has no `_API` literal; update LAZY_FACADE's handling")


def _known(name: str) -> str | None:
    """The lora_convert module `name` names, or the nearest package above it (for `import a.b.c` of an object)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _resolve_relative(importer: str, level: int, module: str | None) -> str:
    package = importer if _is_package(importer) else importer.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{module}" if module else package


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _imports_of(module: str, lazy_api: dict[str, str]) -> list[Import]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"), filename=str(MODULES[module]))
    found: list[Import] = []

    def add(name: str, line: int) -> None:
        target = _known(name)
        if target is not None and target != module:
            found.append(Import(module, target, line))

    docstrings = _docstring_nodes(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "kernels" or alias.name.startswith("kernels."):
                    raise AssertionError(
                        f"{module} line {node.lineno}: imports the top-level name `kernels` "
                        "(another PyPI package); use lora_convert.kernels"
                    )
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(module, node.level, node.module) if node.level else (node.module or "")
            if base == "kernels" or base.startswith("kernels."):
                raise AssertionError(f"{module} line {node.lineno}: imports from the top-level name `kernels`")
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:  # `from pkg import submodule`
                    add(f"{base}.{alias.name}", node.lineno)
                elif base == LAZY_FACADE and alias.name in lazy_api:  # through the root's __getattr__
                    add(lazy_api[alias.name], node.lineno)
                else:
                    add(base, node.lineno)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and node.value in MODULES
            and node.value.startswith(PACKAGE + ".")
            and module != LAZY_FACADE
        ):
            # A module named by string (import_module, find_spec, resources.files) is still a dependency.
            add(node.value, getattr(node, "lineno", 0))
    return found


def _stage(module: str) -> str | None:
    if module == PACKAGE:
        return STAGE_OF[PACKAGE]
    for prefix in sorted(STAGE_OF, key=len, reverse=True):
        if prefix != PACKAGE and (module == prefix or module.startswith(prefix + ".")):
            return STAGE_OF[prefix]
    return None


LAZY_API = _lazy_api()
IMPORTS = [imp for module in sorted(MODULES) for imp in _imports_of(module, LAZY_API)]


def _cycles(edges: list[Import]) -> list[list[str]]:
    """One cycle through each strongly connected component with more than one module (Tarjan, then a walk)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in edges:
        graph[imp.importer].add(imp.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)

    cycles = []
    for component in components:
        start = min(component)
        # Breadth-first back to start inside the component gives a shortest cycle through it.
        previous: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in previous:
            nxt_frontier = []
            for node in frontier:
                for nxt in sorted(graph[node] & component):
                    if nxt not in previous:
                        previous[nxt] = node
                        nxt_frontier.append(nxt)
            frontier = nxt_frontier
        path = [start]
        node = previous[start]
        while node != start:
            path.append(node)
            node = previous[node]
        cycles.append([start, *reversed(path[1:]), start])
    return cycles


def test_the_contract_sees_the_package():
    # Guards the scanner itself: if it found nothing, every check below would pass vacuously.
    assert {"lora_convert.errors", "lora_convert.cli", "lora_convert.kernels.availability", "lora_convert.api"} <= set(
        MODULES
    )
    assert len(IMPORTS) > 50
    assert any(
        i.importer.startswith("lora_convert.kernels.") and i.imported.startswith("lora_convert.kernels")
        for i in IMPORTS
    ), "relative imports inside kernels/ were not seen"


def test_every_module_has_a_stage():
    unplaced = sorted(m for m in MODULES if _stage(m) is None)
    assert not unplaced, f"modules without a stage (add them to STAGE_OF in tests/test_layering.py): {unplaced}"


def test_the_lazy_api_points_at_real_modules():
    missing = {name: module for name, module in LAZY_API.items() if module not in MODULES}
    assert not missing, f"lora_convert._API names modules that do not exist: {missing}"


def test_no_module_imports_a_later_stage():
    later = []
    for imp in IMPORTS:
        a, b = _stage(imp.importer), _stage(imp.imported)
        if a is None or b is None or (imp.importer, imp.imported) in KNOWN_VIOLATIONS:
            continue
        if STAGES.index(b) > STAGES.index(a):
            later.append(f"{imp}: {a} imports {b}")
    assert not later, "imports of a later stage:\n  " + "\n  ".join(sorted(set(later)))


def test_no_import_cycles():
    cycles = [c for c in _cycles(IMPORTS) if set(c) not in KNOWN_CYCLES]
    assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


def test_known_violations_are_still_real():
    # The allow-lists shrink as fixes land; an entry that no longer happens must be removed, not kept as a hole.
    edges = {(i.importer, i.imported) for i in IMPORTS}
    stale = sorted(KNOWN_VIOLATIONS - edges)
    components = [set(c) for c in _cycles(IMPORTS)]
    stale_cycles = [sorted(c) for c in KNOWN_CYCLES if c not in components]
    assert not stale and not stale_cycles, f"remove from the known lists: {stale} {stale_cycles}"


# ----------------------------------------------------------------------------- the checker catches what it should
@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import lora_convert.cli._app", "lora_convert.cli._app"),
        ("def f():\n    from lora_convert.convert import plan", "lora_convert.convert.plan"),
        ("from ..check.validate import x", "lora_convert.check.validate"),
        ("from lora_convert import validate_adapter", "lora_convert.api"),
        ("import importlib\nimportlib.import_module('lora_convert.smoke.runner')", "lora_convert.smoke.runner"),
    ],
    ids=["plain", "lazy", "relative", "through-the-root", "by-string"],
)
def test_the_scanner_sees_every_kind_of_import(source, expected, tmp_path, monkeypatch):
    fake = tmp_path / "probe.py"
    fake.write_text(source)
    monkeypatch.setitem(MODULES, "lora_convert.io.probe", fake)
    imported = {i.imported for i in _imports_of("lora_convert.io.probe", LAZY_API)}
    assert expected in imported


def test_cycles_are_reported_as_a_path():
    edges = [
        Import("lora_convert.errors", "lora_convert.text", 1),
        Import("lora_convert.text", "lora_convert.findings", 1),
        Import("lora_convert.findings", "lora_convert.errors", 1),
    ]
    assert _cycles(edges) == [
        ["lora_convert.errors", "lora_convert.text", "lora_convert.findings", "lora_convert.errors"]
    ]
