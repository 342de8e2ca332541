"""The README's quick start and test commands leave `asyncproc` and `pytest` on
PATH, so that every bare `asyncproc ...` in the docs works as written after them."""

from __future__ import annotations

import re

from tests.support import PROJECT_ROOT

README = (PROJECT_ROOT / "README.md").read_text()
ACTIVATE = ". .venv/bin/activate"


def _block_with(command: str) -> list[str]:
    """The `&&`-separated steps of the README's bash line that runs `command`."""
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            steps = [step.strip() for step in line.split("&&")]
            if steps[-1] == command:
                return steps
    raise AssertionError(f"no bash line of the README ends with `{command}`")


def test_the_quick_start_activates_the_virtualenv_before_it_runs_asyncproc():
    steps = _block_with("asyncproc up")
    assert steps[0] == "python3 -m venv .venv" and steps[1] == ACTIVATE, steps
    assert steps[2] == "pip install -e .", steps


def test_the_test_command_activates_it_too_and_names_the_full_suite():
    steps = _block_with("pytest")
    assert steps[0] == "python3 -m venv .venv" and steps[1] == ACTIVATE, steps
    assert steps[2] == "pip install -e '.[test]'", steps
    assert "`pytest --full`" in README


def test_the_second_terminal_is_told_to_activate_it():
    second = README[README.index("**In a second terminal") :].split("\n- ")[0]
    assert f"`{ACTIVATE}`" in second
