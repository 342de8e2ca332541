"""docs/reliability.md and docs/handlers.md state one rule for when a re-run costs an attempt."""

from __future__ import annotations

import re

import pytest

from tests.support import PROJECT_ROOT

# The rule, word for word, in both documents (line breaks and emphasis aside).
ATTEMPT_RULE = "A run cut short by shutdown gives its attempt back; a run lost to a crash counts."
DOCUMENTS = ["docs/reliability.md", "docs/handlers.md"]


def _prose(path: str) -> str:
    """The document's text with Markdown emphasis and line wrapping taken out."""
    text = (PROJECT_ROOT / path).read_text()
    return re.sub(r"\s+", " ", re.sub(r"[*`]", "", text))


@pytest.mark.parametrize("path", DOCUMENTS)
def test_the_document_states_the_attempt_rule(path):
    assert ATTEMPT_RULE in _prose(path), f"{path} must say, word for word: {ATTEMPT_RULE!r}"


def test_handlers_md_no_longer_counts_a_shutdowns_re_run():
    # What docs/handlers.md's Shutdown section said, against docs/reliability.md and the code.
    assert "each re-run counts against max_attempts" not in _prose("docs/handlers.md")
