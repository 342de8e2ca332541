"""The dashboard in a real browser: Debian's chromium, driven by Playwright,
clicking through the real API and worker processes.

Set ASYNCPROC_TEST_SCREENSHOTS=docs/dashboard to refresh the screenshots that
docs/dashboard.md shows.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from asyncproc import db, migrate
from asyncproc.config import Settings
from tests.conftest import wait_for
from tests.e2e.conftest import Service, start_service, stop_service

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
    url = empty_database()
    with db.connect(url) as conn:
        migrate.apply_all(conn, Settings().migrations_dir)
    return url


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
    page.locator("details.sql summary").click()
    assert "FROM tasks" in page.inner_text("details.sql pre")

    page.click("#retry")
    # The retried task runs its second attempt, which succeeds; the page follows it live.
    page.wait_for_function("document.getElementById('task-status').textContent === 'completed'")
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
    # only come from the event stream (the page reloads only once it has finished).
    page.wait_for_function(
        "(() => { const v = document.getElementById('task-progress').value; return v > 0 && v < 100; })()"
    )
    assert page.inner_text("#task-status") == "running"
    page.wait_for_function("document.getElementById('task-status').textContent === 'completed'")
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
