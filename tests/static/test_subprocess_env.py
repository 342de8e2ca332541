"""No test starts a command in an environment of its own making: one without
ASYNCPROC_DATA_DIR looks for `asyncproc up`'s database in ./.asyncproc/ of the
directory pytest runs in, where a developer's `up` may be running (README)."""

from __future__ import annotations

import ast

from tests.support import PROJECT_ROOT

STARTERS = {"run", "Popen", "call", "check_call", "check_output"}


def _from_scratch(tree: ast.AST) -> list[int]:
    """Lines of the subprocess calls whose env= is a dict display that spreads no other mapping."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in STARTERS:
            for keyword in node.keywords:
                if keyword.arg == "env" and isinstance(keyword.value, ast.Dict) and None not in keyword.value.keys:
                    lines.append(node.lineno)
    return lines


def test_the_reader_sees_an_environment_from_scratch():
    assert _from_scratch(ast.parse("subprocess.run(['x'], env={'PATH': '/bin'})")) == [1]
    assert _from_scratch(ast.parse("subprocess.run(['x'], env={**os.environ, 'A': '1'})")) == []
    assert _from_scratch(ast.parse("subprocess.Popen(['x'], env=bare_env(A='1'))")) == []


def test_every_command_a_test_starts_gets_the_sessions_data_directory_or_its_own():
    found = []
    for path in sorted((PROJECT_ROOT / "tests").rglob("*.py")):
        found += [f"{path.relative_to(PROJECT_ROOT)}:{line}" for line in _from_scratch(ast.parse(path.read_text()))]
    assert not found, f"build these environments with tests.support.bare_env(): {found}"
