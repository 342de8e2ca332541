"""The dashboard's access rules, CSRF protection and actions, in process against the real PostgreSQL."""

from __future__ import annotations

import html
import re
import subprocess
import sys
import uuid

import pytest

from asyncproc import keys
from asyncproc.config import WorkerSettings
from asyncproc.embedded import find_bindir
from tests.support import CSRF_TOKEN, PROJECT_ROOT, bare_env, dashboard_sign_in, later_task

def new_key(conn, role: str | None, name: str | None = None) -> str:
    return keys.create(conn, name or f"dash-{uuid.uuid4().hex[:12]}", role)


def status_of(conn, task_id: str) -> str:
    return conn.execute("SELECT status FROM tasks WHERE task_id = %s", (task_id,)).fetchone()["status"]


def token_from(client, task_id: str) -> str:
    page = client.get(f"/dashboard/tasks/{task_id}")
    assert page.status_code == 200
    return CSRF_TOKEN.search(page.get_data(as_text=True)).group(1)


def test_with_auth_required_the_dashboard_asks_for_a_key_with_a_dashboard_role(guarded_app, conn):
    client = guarded_app.test_client()
    asked = client.get("/dashboard/tasks?status=failed")
    assert asked.status_code == 302
    assert asked.headers["Location"].startswith("/dashboard/sign-in?next=/dashboard/tasks")
    refused = dashboard_sign_in(client, new_key(conn, None))
    assert refused.status_code == 401
    assert "no dashboard role" in refused.get_data(as_text=True)
    assert dashboard_sign_in(client, "apk_1_not-a-key").status_code == 401
    assert client.get("/dashboard").status_code == 302


def test_a_read_key_sees_but_cannot_act(guarded_app, conn):
    client = guarded_app.test_client()
    task_id = later_task(conn)
    signed_in = dashboard_sign_in(client, new_key(conn, "read"))
    assert signed_in.status_code == 303 and signed_in.headers["Location"] == "/dashboard/tasks"
    page = client.get(f"/dashboard/tasks/{task_id}").get_data(as_text=True)
    assert 'id="cancel"' not in page
    assert "Cancel all matching" not in client.get("/dashboard/tasks").get_data(as_text=True)
    refused = client.post(f"/dashboard/tasks/{task_id}/cancel", data={"csrf_token": token_from(client, task_id)})
    assert refused.status_code == 403
    assert "dashboard role is &#39;read&#39;" in refused.get_data(as_text=True)
    assert status_of(conn, task_id) == "pending"


def test_an_operate_key_acts_only_with_the_sessions_csrf_token(guarded_app, conn):
    client = guarded_app.test_client()
    task_id = later_task(conn)
    name = f"dash-{uuid.uuid4().hex[:12]}"
    dashboard_sign_in(client, new_key(conn, "operate", name))
    assert client.post(f"/dashboard/tasks/{task_id}/cancel").status_code == 403
    assert client.post(f"/dashboard/tasks/{task_id}/cancel", data={"csrf_token": "forged"}).status_code == 403
    assert status_of(conn, task_id) == "pending"
    done = client.post(f"/dashboard/tasks/{task_id}/cancel", data={"csrf_token": token_from(client, task_id)})
    assert done.status_code == 303
    assert status_of(conn, task_id) == "cancelled"
    # A second cancel is refused by asyncproc_cancel itself, with its own words.
    again = client.post(f"/dashboard/tasks/{task_id}/cancel", data={"csrf_token": token_from(client, task_id)})
    assert again.status_code == 409
    assert "only pending or running tasks can be cancelled" in again.get_data(as_text=True)
    # The dashboard's cookie is not an API credential.
    assert client.get(f"/results/{task_id}").status_code == 401
    # Revoking the key ends its dashboard session at once.
    keys.revoke(conn, name)
    assert client.get("/dashboard/tasks").status_code == 302


def test_with_auth_off_anyone_may_act_but_only_with_the_csrf_token(open_app, conn):
    client = open_app.test_client()
    task_id = later_task(conn)
    assert client.post(f"/dashboard/tasks/{task_id}/cancel").status_code == 403
    other = open_app.test_client()
    stolen_elsewhere = token_from(other, task_id)
    assert client.post(f"/dashboard/tasks/{task_id}/cancel", data={"csrf_token": stolen_elsewhere}).status_code == 403
    done = client.post(f"/dashboard/tasks/{task_id}/cancel", data={"csrf_token": token_from(client, task_id)})
    assert done.status_code == 303
    assert status_of(conn, task_id) == "cancelled"
    retried = client.post(f"/dashboard/tasks/{task_id}/retry", data={"csrf_token": token_from(client, task_id)})
    assert retried.status_code == 303
    assert status_of(conn, task_id) == "pending"


def test_bulk_confirmation_counts_what_the_change_then_changes(open_app, conn):
    operation = f"bulk{uuid.uuid4().hex[:8]}"
    for _ in range(3):
        conn.execute("INSERT INTO tasks (operation, scheduled_at) VALUES (%s, now() + interval '1 hour')", (operation,))
    client = open_app.test_client()
    confirm = client.get(f"/dashboard/tasks/bulk?action=cancel&operation={operation}").get_data(as_text=True)
    assert "This will cancel <strong>3</strong> task(s)" in confirm
    assert "asyncproc_cancel(t.task_id)" in confirm
    token = CSRF_TOKEN.search(confirm).group(1)
    form = {"csrf_token": token, "action": "cancel", "operation": operation, "confirmed": "3"}
    conn.execute("INSERT INTO tasks (operation, scheduled_at) VALUES (%s, now() + interval '1 hour')", (operation,))
    moved = client.post("/dashboard/tasks/bulk", data=form)
    assert moved.status_code == 409
    assert "4 task(s) match now, not the 3 you confirmed; nothing was changed" in moved.get_data(as_text=True)
    assert conn.execute(
        "SELECT count(*) AS n FROM tasks WHERE operation = %s AND status = 'pending'", (operation,)
    ).fetchone()["n"] == 4
    done = client.post("/dashboard/tasks/bulk", data={**form, "confirmed": "4"})
    assert done.status_code == 303 and "done=cancel:4" in done.headers["Location"]
    assert conn.execute(
        "SELECT count(*) AS n FROM tasks WHERE operation = %s AND status = 'cancelled'", (operation,)
    ).fetchone()["n"] == 4
    recount = client.get(f"/dashboard/tasks/bulk?action=cancel&operation={operation}").get_data(as_text=True)
    assert "This will cancel <strong>0</strong> task(s)" in recount
    assert 'id="bulk-confirm"' not in recount


def test_the_shown_sql_runs_in_psql_and_gives_the_page(open_app, conn, database_url):
    task_id = later_task(conn)
    page = open_app.test_client().get("/dashboard/tasks?operation=sleep&status=pending").get_data(as_text=True)
    shown = re.search(r'<details class="sql"><summary>Show SQL</summary><pre>(.*?)</pre>', page, re.S).group(1)
    psql = subprocess.run(
        [str(find_bindir() / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", database_url, "-c", html.unescape(shown)],
        capture_output=True, text=True, check=True,
    )
    assert task_id in psql.stdout


@pytest.mark.parametrize("path,status", [
    ("/dashboard/tasks?status=lost", 400),
    ("/dashboard/tasks?from=yesterday", 400),
    ("/dashboard/tasks?after=nonsense", 400),
    ("/dashboard/tasks/not-a-uuid", 400),
    (f"/dashboard/tasks/{uuid.uuid4()}", 404),
    ("/dashboard/tasks/bulk?action=delete", 400),
])
def test_bad_input_is_a_clear_4xx_page(open_app, path, status):
    response = open_app.test_client().get(path)
    assert response.status_code == status
    assert response.mimetype == "text/html"


def test_keys_cli_grants_a_dashboard_role(database_url, conn):
    name = f"cli-{uuid.uuid4().hex[:10]}"
    created = subprocess.run(
        [sys.executable, "-m", "asyncproc.cli", "keys", "create", name, "--dashboard", "read"],
        env=bare_env(DATABASE_URL=database_url), capture_output=True, text=True, check=True,
    )
    assert created.stdout.startswith("apk_")
    assert conn.execute("SELECT dashboard_role FROM api_keys WHERE name = %s", (name,)).fetchone() == {"dashboard_role": "read"}


def test_the_docs_sql_runs_in_psql_and_retries_what_it_lists(database_url, conn, worker_conn):
    task_id = conn.execute("INSERT INTO tasks (operation) VALUES ('fail') RETURNING task_id").fetchone()["task_id"]
    worker_conn.execute("UPDATE tasks SET status = 'running', attempts = 1 WHERE task_id = %s", (task_id,))
    worker_conn.execute(
        "UPDATE tasks SET status = 'failed', error_message = 'upstream Timeout' WHERE task_id = %s", (task_id,)
    )
    snippets = re.findall(r"```sql\n(.*?)```", (PROJECT_ROOT / "docs" / "dashboard.md").read_text(), re.DOTALL)
    assert len(snippets) == 1
    result = subprocess.run(
        [str(find_bindir() / "psql"), database_url, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"],
        input=snippets[0], capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert str(task_id) in result.stdout
    assert status_of(conn, str(task_id)) == "pending"


def test_operations_show_each_ones_limits_and_schema(open_app):
    page = open_app.test_client().get("/dashboard/operations").get_data(as_text=True)
    compute = page[page.index(">compute</a>"):].split("</tr>")[0]
    assert "a process of its own" in compute
    assert f"{WorkerSettings().handler_timeout_seconds} s (default)" in compute
    assert "\"n\": {" in compute  # the input schema's property


def test_operations_show_the_fleets_limits_and_schedules(open_app, conn):
    conn.execute(
        "INSERT INTO asyncproc_operation_settings (operation, max_running, rate_per_second, burst, paused)"
        " VALUES ('sleep', 2, 5, 10, true)"
        " ON CONFLICT (operation) DO UPDATE SET max_running = 2, rate_per_second = 5, burst = 10, paused = true"
    )
    name = f"nightly-{uuid.uuid4().hex[:6]}"
    conn.execute(
        "INSERT INTO asyncproc_schedules (name, cron, operation) VALUES (%s, '0 3 * * *', 'compute')", (name,)
    )
    try:
        page = open_app.test_client().get("/dashboard/operations").get_data(as_text=True)
        limits = page[page.index('<table id="limits">'):].split("</table>")[0]
        sleep_row = limits[limits.index("<td>sleep</td>"):].split("</tr>")[0]
        assert re.findall(r'<td class="num">([^<]*)</td>', sleep_row) == ["2", "5.0", "10"]
        assert "paused" in sleep_row
        schedules = page[page.index('<table id="schedules">'):].split("</table>")[0]
        assert name in schedules and "<code>0 3 * * *</code>" in schedules
        assert "FROM asyncproc_operation_settings" in page and "FROM asyncproc_schedules" in page
    finally:
        conn.execute("DELETE FROM asyncproc_operation_settings WHERE operation = 'sleep'")
        conn.execute("DELETE FROM asyncproc_schedules WHERE name = %s", (name,))
