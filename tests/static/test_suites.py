"""`pytest` runs the fast suite and `pytest --full` everything, as the README says (tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys

from tests.support import PROJECT_ROOT

FULL_ONLY = ("tests/e2e/", "tests/faults/")


def _collected(*args: str) -> tuple[list[str], str]:
    """The ids pytest collects, without their parameters (some are made afresh at each collection), and its report."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [line.split("[")[0] for line in result.stdout.splitlines() if "::" in line], result.stdout


def test_pytest_runs_the_fast_suite_and_pytest_full_runs_everything():
    fast, report = _collected()
    everything, _ = _collected("--full")
    left_out = len(everything) - len(fast)
    assert set(fast) <= set(everything) and left_out > 0
    assert not [test for test in fast if test.startswith(FULL_ONLY)]
    assert {test.split("/")[1] for test in everything if test not in fast} >= {"e2e", "faults"}
    # The slowest integration tests are the full suite's too.
    assert "tests/integration/test_reporting_scale.py" not in {test.split("::")[0] for test in fast}
    assert f"{len(fast)}/{len(everything)} tests collected ({left_out} deselected)" in report
    assert f"{left_out} tests of the full suite" in report and "pytest --full" in report


def test_a_test_file_named_on_the_command_line_runs_whole_without_full():
    named, _ = _collected("tests/e2e/test_beside_up.py")
    assert named == ["tests/e2e/test_beside_up.py::test_the_tests_beside_a_running_up_leave_its_database_alone"]
