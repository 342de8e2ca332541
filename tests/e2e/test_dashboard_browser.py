"""The dashboard in a real browser: Debian's chromium, driven by Playwright,
clicking through the real API and worker processes.

Set ASYNCPROC_TEST_SCREENSHOTS=docs/dashboard to refresh the screenshots that
docs/dashboard.md shows.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path
from typing import Iterator

import pytest
import requests

from asyncproc import db
from tests.conftest import wait_for
from tests.e2e.conftest import Service, start_service, stop_service
from tests.support import migrated_database

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: apt-get install chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install -e '.[test]')")
SCREENSHOTS = os.environ.get("ASYNCPROC_TEST_SCREENSHOTS")


@pytest.fixture(scope="module")
def dashboard_db(empty_database) -> str:
    """A database of the module's own, so that counts and lists are this module's tasks only."""
    return migrated_database(empty_database)


@pytest.fixture
def dash_conn(dashboard_db):
    with db.connect(dashboard_db) as connection:
        yield connection


@pytest.fixture(scope="module")
def service(tmp_path_factory, dashboard_db, redis_url) -> Iterator[Service]:
    running, processes = start_service(tmp_path_factory.mktemp("dashboard"), dashboard_db, redis_url, concurrency=4)
    yield running
    assert stop_service(processes) == [0, 0], f"a process did not exit cleanly; logs in {running.logs}"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(15_000)
    yield opened
    context.close()


def shoot(page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)


def test_filter_then_open_a_failed_task_then_retry_it(service, page):
    service.wait_finished(service.submit({"operation": "compute", "data": {"n": 10}}))
    failing = service.submit({"operation": "fail", "max_attempts": 1, "data": {"times": 1, "message": "flaky disk"}})
    assert service.wait_finished(failing)["status"] == "failed"

    page.goto(f"{service.base_url}/dashboard/tasks")
    page.select_option("select[name=status]", "failed")
    page.fill("input[name=error]", "FLAKY")
    page.click("text=Filter")
    page.wait_for_url("**status=failed**")
    statuses = page.locator("#task-list td.status").all_inner_texts()
    assert statuses == ["failed"]
    shoot(page, "tasks")

    page.click(f"a.task-link:text('{failing}')")
    page.wait_for_url(f"**/dashboard/tasks/{failing}")
    assert page.inner_text("#task-error") == "RuntimeError: flaky disk"
    assert page.inner_text("#task-status") == "failed"
    page.locator("details.sql summary").last.click()
    assert "FROM tasks" in page.locator("details.sql pre").last.inner_text()

    page.click("#retry")
    # The retried task runs its second attempt, which succeeds; the page follows it live.
    page.wait_for_selector("#task-status:text-is('completed')")
    page.wait_for_selector("#task-result:not(:text('—'))")
    assert '"succeeded_on_attempt": 2' in page.inner_text("#task-result")
    assert service.get(failing).json()["attempts"] == 2
    shoot(page, "task")


def test_bulk_cancel_states_the_count_then_cancels_exactly_those(service, page, dash_conn):
    later = [service.submit({"operation": "shout", "delay_seconds": 3600, "data": {"text": str(i)}}) for i in range(7)]
    service.submit({"operation": "compute", "delay_seconds": 3600, "data": {"n": 1}})

    page.goto(f"{service.base_url}/dashboard/tasks?status=pending&operation=shout")
    page.click("#bulk-cancel")
    assert "This will cancel 7 task(s)" in page.inner_text("#bulk-count")
    shoot(page, "bulk-confirm")
    page.click("#bulk-confirm")
    assert page.inner_text("#done") == "cancel: 7 task(s) changed."
    rows = dash_conn.execute(
        "SELECT status, count(*) AS tasks FROM tasks WHERE task_id = ANY(%s::uuid[]) GROUP BY status", (later,)
    ).fetchall()
    assert rows == [{"status": "cancelled", "tasks": 7}]
    assert dash_conn.execute(
        "SELECT count(*) AS n FROM tasks WHERE operation = 'compute' AND status = 'pending'"
    ).fetchone()["n"] == 1


def test_task_page_shows_progress_live(service, page):
    task_id = service.submit({"operation": "steps", "delay_seconds": 1, "data": {"count": 4, "seconds": 0.4}})
    page.goto(f"{service.base_url}/dashboard/tasks/{task_id}")
    assert page.inner_text("#task-progress-text") == "—"
    # The page was served before the task was due; a value between the ends can
    # only come from the event stream (the page never reloads).
    # No wait_for_function: the dashboard's Content-Security-Policy forbids evaluating strings.
    wait_for(lambda: page.inner_text("#task-progress-text") not in ("—", "0", "100"), 15, "progress between the ends")
    assert page.inner_text("#task-status") == "running"
    page.wait_for_selector("#task-status:text-is('completed')")
    assert page.inner_text("#task-result").replace(" ", "").replace("\n", "") == '{"steps":4}'


def test_every_view_renders_with_javascript_off(service, browser):
    context = browser.new_context(java_script_enabled=False, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        for path, name, heading in [
            ("/dashboard", "overview", "Overview"),
            ("/dashboard/operations", "operations", "Operations"),
            ("/dashboard/workers", "workers", "Workers"),
        ]:
            response = page.goto(f"{service.base_url}{path}")
            assert response.status == 200
            assert page.inner_text("h1") == heading
            shoot(page, name)
        wait_for(lambda: page.goto(f"{service.base_url}/dashboard/workers") and page.locator("td.alive").count() >= 1,
                 15, "a live worker on the workers page")
        page.goto(f"{service.base_url}/dashboard")
        page.locator("#counts details.sql summary").click()
        assert "asyncproc_status_counts" in page.inner_text("#counts details.sql pre")
    finally:
        context.close()


RAW_TIMEDELTA = re.compile(r"\d:\d\d:\d\d\.\d{6}")


def test_charts_have_a_time_axis_ticks_and_values(service, page, dash_conn):
    # Three hours ago, in the history the charts read: in the day's chart, not the hour's.
    dash_conn.execute(
        "INSERT INTO asyncproc_rollups (bucket_start, bucket_width, operation, status, tasks) "
        "VALUES (date_trunc('minute', now() - interval '3 hours'), '1 minute', 'history.demo', 'completed', 40), "
        "       (date_trunc('minute', now() - interval '3 hours'), '1 minute', 'history.demo', 'failed', 2)"
    )
    service.wait_finished(service.submit({"operation": "compute", "data": {"n": 3}}))
    page.goto(f"{service.base_url}/dashboard")
    hour, day = page.locator("#throughput-hour svg"), page.locator("#throughput-day svg")
    for chart in (hour, day):
        ticks = chart.locator(".x-axis text").all_text_contents()
        assert len(ticks) >= 4 and all(re.fullmatch(r"\d\d:\d\d", tick) for tick in ticks), ticks
        assert chart.locator(".y-axis text").count() >= 2
    assert hour.locator(".x-axis text").first.text_content() != day.locator(".x-axis text").first.text_content()
    hour_total = int(page.inner_text("#throughput-hour .total-completed").replace(",", ""))
    day_total = int(page.inner_text("#throughput-day .total-completed").replace(",", ""))
    assert hour_total >= 1 and day_total == hour_total + 40
    assert "40 completed, 2 failed" in " ".join(day.locator("rect.hover title").all_text_contents())
    assert "42" in day.locator("text.value").all_text_contents()
    shoot(page, "overview")


def test_durations_ids_and_workers_read_as_a_person_would(service, page, dash_conn):
    waiting = service.submit({"operation": "shout", "delay_seconds": 3600, "data": {"text": "later"}})
    running = service.submit({"operation": "steps", "data": {"count": 40, "seconds": 0.25}})
    wait_for(lambda: service.get(running).json()["status"] == "running", 15, "the steps task to run")
    page.goto(f"{service.base_url}/dashboard")
    assert not RAW_TIMEDELTA.search(page.inner_text("main"))
    assert re.search(r"waiting \d+(\.\d)? (ms|s|min)\b", page.inner_text("#oldest-pending"))
    page.goto(f"{service.base_url}/dashboard/workers")
    assert not RAW_TIMEDELTA.search(page.inner_text("main"))
    hosts = dash_conn.execute("SELECT host, pid FROM asyncproc_worker_hosts").fetchall()
    assert hosts and all(host["host"] == socket.gethostname() for host in hosts)
    shown = {(row.locator("td.host").inner_text(), row.locator("td.pid").inner_text())
             for row in page.locator("#workers tbody tr").all()}
    assert {(host["host"], str(host["pid"])) for host in hosts} <= shown
    # Ids made in the same minute share their first 8 characters: the page shows the whole id.
    assert running in page.locator("#workers a.task-id").all_inner_texts()
    shoot(page, "workers")
    page.goto(f"{service.base_url}/dashboard/tasks")
    ids = page.locator("#task-list a.task-link").all_inner_texts()
    assert waiting in ids and running in ids
    requests.post(f"{service.base_url}/results/{running}/cancel", timeout=10)


def test_a_task_page_lists_every_attempt_with_its_worker(service, page, dash_conn):
    task_id = service.submit({"operation": "fail", "max_attempts": 2, "data": {"times": 1, "message": "flaky disk"}})
    assert service.wait_finished(task_id)["status"] == "completed"
    page.goto(f"{service.base_url}/dashboard/tasks/{task_id}")
    rows = page.locator("#attempts tbody tr")
    assert rows.count() == 2
    ledger = dash_conn.execute(
        "SELECT attempt, host, pid, outcome, error FROM asyncproc_task_attempts WHERE task_id = %s ORDER BY attempt",
        (task_id,),
    ).fetchall()
    for row, run in zip(rows.all(), ledger):
        assert row.locator("td.attempt").inner_text() == str(run["attempt"])
        assert row.locator("td.worker").inner_text() == f"{run['host']} pid {run['pid']}"
        assert row.locator("td.outcome").inner_text() == run["outcome"]
        assert re.fullmatch(r"\d+(\.\d)? (ms|s)", row.locator("td.duration").inner_text())
    assert rows.first.locator("td.error").inner_text() == "RuntimeError: flaky disk"
    assert page.locator("#attempts tbody tr td.outcome").all_inner_texts() == ["retried", "completed"]
    assert not RAW_TIMEDELTA.search(page.inner_text("main"))


def test_a_requeued_task_reads_as_information_not_as_an_error(service, page, dash_conn):
    task_id = service.submit({"operation": "fail", "max_attempts": 1, "data": {"message": "flaky disk"}})
    assert service.wait_finished(task_id)["status"] == "failed"
    # Re-queued by an operator, due in an hour: pending, with the last attempt's error.
    with dash_conn.transaction():
        dash_conn.execute("SELECT asyncproc_retry(%s)", (task_id,))
        dash_conn.execute("UPDATE tasks SET scheduled_at = now() + interval '1 hour' WHERE task_id = %s", (task_id,))
    page.goto(f"{service.base_url}/dashboard/tasks/{task_id}")
    assert page.inner_text("#task-status") == "pending"
    note = page.locator("#task-note")
    assert "flaky disk" in note.inner_text() and "queued again" in note.inner_text()
    assert "info" in note.get_attribute("class")
    assert page.inner_text("#task-error") == "—"
    page.goto(f"{service.base_url}/dashboard/tasks?status=pending&operation=fail")
    cell = page.locator("#task-list tbody tr").first.locator("td").last
    assert "flaky disk" in cell.inner_text() and "error" not in cell.get_attribute("class")


def test_the_task_page_and_the_list_follow_a_task_live_without_reloading(service, page):
    task_id = service.submit({"operation": "steps", "delay_seconds": 3, "data": {"count": 3, "seconds": 0.3}})
    page.goto(f"{service.base_url}/dashboard/tasks/{task_id}")
    assert page.inner_text("#attempts tbody") == "No attempt yet."
    loads = []
    page.on("load", lambda _: loads.append(page.url))
    page.wait_for_selector("#task-status:text-is('completed')")
    page.wait_for_selector("#attempts td.outcome:text-is('completed')")
    page.wait_for_selector("#task-result:not(:text('—'))")
    assert re.fullmatch(rf"{re.escape(socket.gethostname())} pid \d+", page.inner_text("#attempts td.worker"))
    assert loads == []

    later = service.submit({"operation": "steps", "delay_seconds": 3, "data": {"count": 2, "seconds": 0.2}})
    page.goto(f"{service.base_url}/dashboard/tasks")
    row = page.locator(f"#task-list tr[data-task-id='{later}']")
    assert row.locator("td.status").inner_text() == "pending"
    loads.clear()
    page.wait_for_selector(f"#task-list tr[data-task-id='{later}'] td.status:text-is('completed')")
    assert row.locator("td.progress").inner_text() == "100"
    assert loads == []
