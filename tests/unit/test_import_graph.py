"""The import graph, read statically (ast, nothing imported): asyncproc/ and
worker/ import without cycles, and no test module imports another one.

Every import counts, a function's lazy one too: a cycle hidden behind a lazy
import still ties both modules to each other's load order. A package is its
__init__.py; importing a submodule is an edge to the submodule alone.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

from tests.support import PROJECT_ROOT

RUNTIME_PACKAGES = ("asyncproc", "worker")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(*tops: str) -> dict[str, Path]:
    return {_module_name(path): path for top in tops for path in sorted((PROJECT_ROOT / top).rglob("*.py"))}


def _imported_names(name: str, path: Path) -> set[str]:
    """Every dotted name `path` imports: `import module`, and module.name for each `from module import name`."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module
            # A submodule, or an attribute that _import_graph cuts back to its module.
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Each module's imports among `modules`, each name cut back to the longest module it names."""
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imported_names(name, path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def test_the_graph_reader_sees_lazy_and_from_imports():
    graph = _import_graph(_modules(*RUNTIME_PACKAGES))
    assert "asyncproc.config" in graph["asyncproc.cli"]
    # A lazy import inside _run().
    assert "worker.main" in graph["asyncproc.cli"]
    # `from asyncproc.api import server` names a submodule.
    assert "asyncproc.api.server" in graph["asyncproc.cli"]


def test_the_runtime_packages_import_without_cycles():
    graph = _import_graph(_modules(*RUNTIME_PACKAGES))
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        raise AssertionError(f"import cycle: {' -> '.join(reversed(error.args[1]))}") from None


def test_no_test_module_imports_another_test_module():
    modules = _modules("tests")
    offenders = [
        f"{name} imports {target}"
        for name, targets in _import_graph(modules).items()
        for target in sorted(targets)
        if target.rpartition(".")[2].startswith("test_")
    ]
    assert not offenders, "shared helpers belong in tests/support.py or a conftest: " + "; ".join(offenders)
