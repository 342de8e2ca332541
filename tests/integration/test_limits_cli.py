"""`asyncproc limits`: set, remove, pause, resume and list per-operation limits."""

from __future__ import annotations

import pytest

from asyncproc import cli


@pytest.fixture
def settings_table(clean_db, database_url, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", database_url)
    clean_db.execute("DELETE FROM asyncproc_operation_settings")
    yield clean_db
    clean_db.execute("DELETE FROM asyncproc_operation_settings")


def row(conn, operation: str) -> dict:
    return conn.execute(
        "SELECT max_running, rate_per_second, burst, paused FROM asyncproc_operation_settings WHERE operation = %s",
        (operation,),
    ).fetchone()


def test_limits_are_set_kept_removed_paused_and_listed(settings_table, capsys):
    # resize is no operation of this process: --force, as for one that only the workers know.
    assert cli.main(["limits", "set", "resize", "--max-running", "4", "--force"]) == 0
    assert cli.main(["limits", "set", "resize", "--rate", "2.5", "--burst", "5", "--force"]) == 0
    assert row(settings_table, "resize") == {"max_running": 4, "rate_per_second": 2.5, "burst": 5, "paused": False}
    assert cli.main(["limits", "set", "resize", "--max-running", "none", "--force"]) == 0
    assert cli.main(["limits", "pause", "resize"]) == 0
    assert row(settings_table, "resize") == {"max_running": None, "rate_per_second": 2.5, "burst": 5, "paused": True}
    assert cli.main(["limits", "set", "resize", "--force"]) == 1
    assert cli.main(["limits", "set", "resize", "--rate", "0", "--force"]) == 1
    capsys.readouterr()
    assert cli.main(["limits", "list"]) == 0
    assert capsys.readouterr().out.split("\t") == [
        "resize", "max_running -", "rate 2.5/s burst 5", "paused", "running 0", "held 0\n"
    ]
    assert cli.main(["limits", "resume", "resize"]) == 0
    assert row(settings_table, "resize")["paused"] is False
