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
