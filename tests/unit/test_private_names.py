"""asyncproc and worker use no private name of a dependency, Python's own included.

A dependency may rename or drop a private name in any release. So none of our
classes overrides, reads or sets an underscore name of a class it derives from
outside our packages; no underscore name is read from an imported module or
name of theirs; and nothing is assigned into their modules (a class swapped in
a module is a private name too). The exceptions live in one adapter module
each, and are checked against what is installed: the private names of
asyncproc.api.gunicorn_adapter.PRIVATE_NAMES by
tests/unit/test_gunicorn_contract.py, and those of
worker.forkserver_adapter.PRIVATE_NAMES (multiprocessing's fork server) by
tests/unit/test_forkserver_contract.py.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import asyncproc
import worker
from asyncproc.api.gunicorn_adapter import PRIVATE_NAMES
from worker import forkserver_adapter

OURS = ("asyncproc", "worker")
ROOT = Path(asyncproc.__file__).parent.parent
# self._x, cls._x and super()._x, but not self.__x: name mangling keeps those apart from the base class's.
UNDERSCORE_NAME = re.compile(r"\b(?:self|cls|super\(\))\.(_(?!_)\w+)")
ALLOWED = {tuple(name.rsplit(".", 1)) for name in PRIVATE_NAMES}
# Documented public API despite the underscore.
PUBLIC = {("os", "_exit")}
# Module attributes that the fork server's adapter alone may read.
ADAPTED = {
    Path(forkserver_adapter.__file__).resolve(): {
        tuple(name.rsplit(".", 1)) for name in forkserver_adapter.PRIVATE_NAMES
    },
}


def _ours(name: str) -> bool:
    return name.split(".")[0] in OURS


def _modules() -> list[ModuleType]:
    found = []
    for package in (asyncproc, worker):
        found.append(package)
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            found.append(importlib.import_module(info.name))
    return found


def _classes() -> list[type]:
    found = [cls for module in _modules() for cls in vars(module).values()
             if inspect.isclass(cls) and cls.__module__ == module.__name__]
    # The one class made inside a function: gunicorn's logger in our log format.
    from asyncproc.api.server import _gunicorn_logger

    return [*found, _gunicorn_logger("text")]


def _underscore_names_of(cls: type) -> set[str]:
    """The underscore names a class's source defines at class level or uses on itself."""
    tree = ast.parse(inspect.getsource(cls).lstrip())
    (body,) = tree.body
    assert isinstance(body, ast.ClassDef)
    defined = set()
    for statement in body.body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(statement.name)
        elif isinstance(statement, (ast.Assign, ast.AnnAssign)):
            targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
            defined |= {target.id for target in targets if isinstance(target, ast.Name)}
    defined = {name for name in defined if name.startswith("_") and not name.startswith("__")}
    return defined | set(UNDERSCORE_NAME.findall(inspect.getsource(cls)))


def test_no_class_of_ours_touches_an_underscore_name_of_a_base_class_from_a_dependency():
    touched = []
    for cls in _classes():
        for base in cls.__mro__:
            if base is object or _ours(base.__module__):
                continue
            try:
                source = inspect.getsource(base)
            except (OSError, TypeError):
                # Built in (Exception): no source, and only its class attributes to clash with.
                source = ""
            theirs = {name for name in vars(base) if name.startswith("_") and not name.startswith("__")}
            theirs |= set(UNDERSCORE_NAME.findall(source))
            for name in sorted(_underscore_names_of(cls) & theirs):
                if (f"{base.__module__}.{base.__qualname__}", name) not in ALLOWED:
                    touched.append(f"{cls.__module__}.{cls.__qualname__} uses {base.__module__}.{base.__qualname__}.{name}")
    assert not touched, "\n".join(touched)


def _foreign_imports(tree: ast.Module) -> dict[str, object]:
    """The names a module binds by importing from outside our packages, and what they are."""
    bound: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not _ours(alias.name):
                    module = alias.name if alias.asname else alias.name.split(".")[0]
                    bound[alias.asname or module] = importlib.import_module(module)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and not _ours(node.module):
            if node.module == "__future__":
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                bound[alias.asname or alias.name] = getattr(module, alias.name)
    return bound


def _sources() -> list[Path]:
    # The peer benchmark's workers run in the peers' own virtualenvs, whose libraries
    # (PgQueuer, Oban, Celery...) this one has not: their imports cannot be resolved here.
    peers = set((ROOT / "asyncproc" / "bench" / "peers").glob("*_peer.py"))
    return sorted({*(ROOT / "asyncproc").rglob("*.py"), *(ROOT / "worker").rglob("*.py")} - peers)


def test_no_underscore_name_is_read_from_or_assigned_into_a_dependency():
    found = []
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        foreign = _foreign_imports(tree)
        where = path.relative_to(ROOT)
        adapted = ADAPTED.get(path.resolve(), set())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in foreign:
                if node.attr.startswith("_") and not node.attr.startswith("__") and (
                    getattr(foreign[node.value.id], "__name__", None), node.attr) not in PUBLIC | adapted:
                    found.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr}")
                elif isinstance(node.ctx, (ast.Store, ast.Del)) and inspect.ismodule(foreign[node.value.id]):
                    found.append(f"{where}:{node.lineno}: assigns {node.value.id}.{node.attr}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("setattr", "delattr") and node.args
                  and isinstance(node.args[0], ast.Name) and inspect.ismodule(foreign.get(node.args[0].id))):
                found.append(f"{where}:{node.lineno}: {node.func.id}({node.args[0].id}, ...)")
    assert not found, "\n".join(found)
