from __future__ import annotations

import re

from asyncproc import db


def test_every_named_query_is_loaded_and_uses_named_parameters():
    queries = db.queries()
    assert {"task_insert", "task_get", "tasks_mark_completed", "task_mark_failed", "task_mark_retry"} <= set(queries)
    for name, text in queries.items():
        assert text, name
        assert not re.search(r"%s|\?", text), f"{name} uses positional parameters"
