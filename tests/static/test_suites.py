"""`pytest` runs the fast suite and `pytest --full` everything, as the README says (tests/conftest.py)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.support import PROJECT_ROOT

FULL_ONLY = ("tests/e2e/", "tests/faults/")
NAMED = "tests/e2e/test_beside_up.py"


def _collected(*args: str) -> tuple[list[str], str]:
    """The ids pytest collects, without their parameters (some are made afresh at each collection), and its report."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [line.split("[")[0] for line in result.stdout.splitlines() if "::" in line], result.stdout


def _counts(report: str) -> tuple[int, int]:
    """(selected, collected) from pytest's "N/M tests collected (K deselected)"."""
    found = re.search(r"(\d+)/(\d+) tests collected \((\d+) deselected\)", report)
    assert found and int(found[1]) + int(found[3]) == int(found[2]), report
    return int(found[1]), int(found[2])


def test_pytest_leaves_the_full_suite_out_but_runs_a_file_named_on_the_command_line():
    # No argument inside another: pytest 8.4, the lowest setup.cfg allows, given `tests` and a file
    # under it, collected the file alone.
    fast, report = _collected("tests/unit", "tests/integration", "tests/static", "tests/faults", NAMED)
    assert {test.split("::")[0] for test in fast if test.startswith(FULL_ONLY)} == {NAMED}
    # The slowest integration tests are the full suite's too.
    assert not {"tests/integration/test_reporting_scale.py", "tests/integration/test_plans.py"} & {
        test.split("::")[0] for test in fast
    }
    selected, collected = _counts(report)
    assert selected == len(fast) and collected - selected > 50
    assert f"{collected - selected} tests of the full suite" in report and "pytest --full" in report



def test_a_marker_expression_chooses_for_itself():
    # docs/reliability.md: `pytest -m faults` runs the fault tests.
    faults, report = _collected("-m", "faults", "tests/faults")
    assert faults and all(test.startswith("tests/faults/") for test in faults)
    assert "pytest --full" not in report


@pytest.mark.full
def test_pytest_full_runs_every_test_pytest_collects():
    fast, report = _collected()
    everything, full_report = _collected("--full")
    assert set(fast) < set(everything)
    assert len(everything) == _counts(report)[1]
    assert "deselected" not in full_report
    assert {test.split("/")[1] for test in everything if test not in fast} >= {"e2e", "faults"}
