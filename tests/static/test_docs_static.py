"""What the README and docs/ promise about the project's own shape, checked without running anything."""

from __future__ import annotations

import argparse
import re

from asyncproc.cli import _parser
from tests.support import PROJECT_ROOT

CONFIGURATION = PROJECT_ROOT / "docs" / "configuration.md"


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and subcommand the CLI accepts, as word tuples."""
    # argparse has no public way to list its subparsers.
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                found.append((*prefix, name))
                found.extend(_commands(subparser, (*prefix, name)))
    return found


def test_configuration_lists_every_command_and_subcommand():
    text = CONFIGURATION.read_text()
    table = text[text.index("## Commands"):]
    rows = re.findall(r"^\| `asyncproc ([^`]+)`(.*)\|", table, re.M)
    commands = _commands(_parser())
    assert len(commands) > 15
    for words in commands:
        # A subcommand may share its command's row: `keys create NAME` / `revoke NAME` / `list`.
        assert any(written.split()[0] == words[0] and all(w in f"{written} {rest}".replace("`", " ").split() for w in words)
                   for written, rest in rows), f"docs/configuration.md lists no `asyncproc {' '.join(words)}`"


README = PROJECT_ROOT / "README.md"
FIRST_SCREEN = 50


def test_the_readmes_first_screen_says_what_this_is_starts_it_and_links_every_doc():
    screen = "\n".join(README.read_text().splitlines()[:FIRST_SCREEN])
    assert "PostgreSQL" in screen.split("\n## ")[0], "the first paragraph says what this is"
    assert "## Quick start" in screen and "asyncproc up" in screen
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)", screen))
    pages = {f"docs/{path.name}" for path in (PROJECT_ROOT / "docs").glob("*.md")}
    assert pages <= linked, sorted(pages - linked)


def test_the_readme_keeps_a_short_performance_summary_and_the_table_lives_in_performance_md():
    readme = README.read_text()
    summary = readme[readme.index("## Performance"):].split("\n## ")[0]
    prose = [line for line in summary.splitlines()[1:] if line.strip()]
    assert len(prose) <= 3 and "docs/performance.md" in summary, prose
    assert "| figure |" not in readme
    assert "| figure |" in (PROJECT_ROOT / "docs" / "performance.md").read_text()
