"""The dashboard's pages and actions."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

from flask import Blueprint, Response, g, make_response, redirect, render_template, request, url_for

from asyncproc import humanize, service
from asyncproc.app_resources import resources
from asyncproc.api.routes import event_stream, parked_events
from asyncproc.dashboard import access, charts, live, queries
from asyncproc.dashboard.filters import PAGE_SIZE, STATUSES, BadFilter, TaskFilter, done_notice, keyset, keyset_of
from asyncproc.db import translate_errors
from asyncproc.errors import AsyncprocError, Conflict
from asyncproc.operations import registry

log = logging.getLogger(__name__)
bp = Blueprint("dashboard", __name__, url_prefix="/dashboard", template_folder="templates", static_folder="static")

# What each bulk action changes, and the statuses it applies to (as in asyncproc_retry/asyncproc_cancel).
BULK = {
    "retry": ("dashboard_tasks_bulk_retry", ["failed", "cancelled"]),
    "cancel": ("dashboard_tasks_bulk_cancel", ["pending", "running"]),
}
OPEN_VIEWS = frozenset({"dashboard.sign_in", "dashboard.static"})
# Scripts, styles and images from the dashboard's static folder only: nothing
# inline, so that text a page shows can never run. No page may be framed.
CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self'", "font-src 'self'",
    "connect-src 'self'", "form-action 'self'", "base-uri 'none'", "frame-ancestors 'none'",
))
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
bp.add_app_template_filter(humanize.duration, "duration")


@bp.before_request
def _admit():
    g.dashboard_started = time.perf_counter()
    if request.endpoint in OPEN_VIEWS:
        return None
    try:
        g.viewer, g.set_cookie = access.viewer()
    except access.SignInRequired:
        # full_path ends in a bare "?" when there is no query string.
        return redirect(url_for("dashboard.sign_in", next=request.full_path if request.query_string else request.path))
    if request.method == "POST":
        access.check_token(g.viewer)
        if request.endpoint != "dashboard.sign_out":
            access.check_may_act(g.viewer)
    return None


@bp.after_request
def _finish(response: Response) -> Response:
    if g.get("set_cookie"):
        access.set_cookie(response, g.viewer.csrf_token)
    elapsed = (time.perf_counter() - g.dashboard_started) * 1000
    response.headers["Server-Timing"] = f"app;dur={elapsed:.1f}"
    return response


@bp.after_app_request
def _harden(response: Response) -> Response:
    # Every answer under /dashboard, a 404 or a refusal before any view included.
    if request.path == bp.url_prefix or request.path.startswith(f"{bp.url_prefix}/"):
        response.headers.update(SECURITY_HEADERS)
        if request.endpoint != "dashboard.static":
            # Pages show payloads and results: no cache may keep them.
            response.headers["Cache-Control"] = "no-store"
    return response


@bp.app_template_global()
def csrf_token() -> str:
    return g.viewer.csrf_token


def _page(template: str, status: int = 200, **context: Any) -> Response:
    return make_response(render_template(template, viewer=g.get("viewer"), **context), status)


@bp.errorhandler(access.Forbidden)
def _forbidden(error: access.Forbidden):
    return _page("message.html", 403, title="Not allowed", message=str(error))


@bp.errorhandler(BadFilter)
def _bad_filter(error: BadFilter):
    return _page("message.html", 400, title="Bad filter", message=str(error))


@bp.errorhandler(AsyncprocError)
def _refused(error: AsyncprocError):
    log.warning("dashboard: %s %s: %s", error.status, error.code, error.message)
    return _page("message.html", error.status, title="Refused", message=error.message)


def _now() -> datetime:
    return datetime.now(timezone.utc)


@bp.get("")
def overview():
    with translate_errors(), resources().pool.connection() as conn:
        counts = queries.run(conn, "dashboard_status_counts")
        hour = queries.run(conn, "dashboard_throughput", {"since": "1 hour"})
        day = queries.run(conn, "dashboard_throughput", {"since": "24 hours"})
        oldest = queries.run(conn, "dashboard_oldest_pending")
        workers = queries.run(conn, "dashboard_workers", {"alive_seconds": resources().worker.stalled_seconds})
    now = _now()
    return _page(
        "overview.html",
        counts=counts,
        grid=_grid(counts.rows),
        hour=hour,
        hour_chart=charts.throughput(hour.rows, now, 60, 1, 10, "Finished per minute, last hour"),
        day=day,
        day_chart=charts.throughput(day.rows, now, 24 * 60, 30, 180, "Finished per 30 minutes, last 24 hours"),
        oldest=oldest,
        workers=workers,
        live_workers=sum(1 for row in workers.rows if row["alive"]),
    )


def _grid(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """{operation: {status: tasks}} with every status present."""
    grid: dict[str, dict[str, int]] = {}
    for row in rows:
        grid.setdefault(row["operation"], dict.fromkeys(STATUSES, 0))[row["status"]] = row["tasks"]
    return grid


@bp.get("/tasks")
def tasks():
    task_filter = TaskFilter.from_args(request.args)
    after_created_at, after_task_id = keyset(request.args.get("after"))
    done = done_notice(request.args.get("done"))
    params = {
        **task_filter.params(),
        "after_created_at": after_created_at,
        "after_task_id": after_task_id,
        # One more than a page tells whether there is a next page, without counting.
        "limit": PAGE_SIZE + 1,
    }
    with translate_errors(), resources().pool.connection() as conn:
        page = queries.run(conn, "dashboard_tasks_page", params)
    rows = page.rows[:PAGE_SIZE]
    next_args = None
    if len(page.rows) > PAGE_SIZE:
        next_args = {**task_filter.args(), "after": keyset_of(rows[-1])}
    return _page(
        "tasks.html",
        page=page,
        rows=rows,
        task_filter=task_filter,
        filter_args=task_filter.args(),
        next_args=next_args,
        done=done,
        statuses=STATUSES,
        operations=registry.names(),
    )


def _task_id(raw: str) -> UUID:
    try:
        return UUID(raw)
    except ValueError:
        raise BadFilter(f"{raw!r} is not a task id") from None


@bp.get("/tasks/<raw_id>")
def task(raw_id: str):
    task_id = _task_id(raw_id)
    with translate_errors(), resources().pool.connection() as conn:
        found = queries.run(conn, "task_get", {"task_id": task_id})
        attempts = queries.run(conn, "dashboard_task_attempts", {"task_id": task_id})
    if not found.rows:
        return _page("message.html", 404, title="No such task", message=f"No task with id {task_id}")
    row = found.rows[0]
    timeline = [
        (label, row[column])
        for label, column in (
            ("created", "created_at"),
            ("scheduled", "scheduled_at"),
            ("started (latest attempt)", "started_at"),
            ("finished", "completed_at"),
            ("last changed", "updated_at"),
        )
        if row[column] is not None
    ]
    timeline.sort(key=lambda item: item[1])
    return _page("task.html", found=found, task=row, timeline=timeline, attempts=attempts)


@bp.get("/tasks/<raw_id>/events")
def task_events(raw_id: str):
    # The dashboard sees every task, whoever owns it.
    return event_stream(_task_id(raw_id), owner=None)


@bp.get("/tasks/events")
def tasks_events():
    """The changes of several tasks (`id=`, repeated; at most a page of them) in one stream."""
    task_ids = [_task_id(raw) for raw in request.args.getlist("id")]
    if not 0 < len(task_ids) <= PAGE_SIZE:
        raise BadFilter(f"give between 1 and {PAGE_SIZE} task ids (id=...)")
    waiters = resources().waiters
    # The dashboard sees every task, whoever owns it.
    return parked_events(live.merged([waiters.stream_changes(task_id, None, None) for task_id in task_ids]))


@bp.post("/tasks/<raw_id>/<any(retry, cancel):action>")
def task_action(raw_id: str, action: str):
    task_id = _task_id(raw_id)
    res = resources()
    change = service.retry if action == "retry" else service.cancel
    changed = change(res.pool, res.cache, task_id)
    log.info("dashboard: %s task %s, now %s", action, task_id, changed.status)
    return redirect(url_for("dashboard.task", raw_id=str(task_id)), 303)


def _bulk_action(raw: str | None) -> str:
    if raw not in BULK:
        raise BadFilter("action must be retry or cancel")
    return raw


@bp.get("/tasks/bulk")
def bulk_confirm():
    action = _bulk_action(request.args.get("action"))
    task_filter = TaskFilter.from_args(request.args)
    change_query, from_statuses = BULK[action]
    with translate_errors(), resources().pool.connection() as conn:
        count = queries.run(
            conn, "dashboard_tasks_bulk_count", {**task_filter.params(), "from_statuses": from_statuses}
        )
        change_sql = queries.bound_sql(conn, change_query, task_filter.params())
    return _page(
        "bulk.html",
        action=action,
        count=count,
        tasks=count.rows[0]["tasks"],
        change_sql=change_sql,
        from_statuses=from_statuses,
        filter_args=task_filter.args(),
    )


@bp.post("/tasks/bulk")
def bulk_apply():
    action = _bulk_action(request.form.get("action"))
    task_filter = TaskFilter.from_args(request.form)
    confirmed = _confirmed_count(request.form.get("confirmed"))
    with translate_errors(), resources().pool.connection() as conn, conn.transaction():
        changed = queries.run(conn, BULK[action][0], task_filter.params()).rows[0]["changed"]
        if changed != confirmed:
            # Raised inside the transaction, so the change rolls back: the
            # person agreed to a number, and this is not it.
            raise Conflict(
                f"{changed} task(s) match now, not the {confirmed} you confirmed; nothing was changed. "
                "Review the count and confirm again."
            )
    log.info("dashboard: bulk %s changed %s task(s) (filter %s)", action, changed, task_filter.args())
    return redirect(url_for("dashboard.tasks", **task_filter.args(), done=f"{action}:{changed}"), 303)


def _confirmed_count(raw: str | None) -> int:
    # isdigit() alone takes "²", which int() refuses.
    if raw is None or not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise BadFilter("confirmed must be the count the confirmation showed")
    return int(raw)


@bp.get("/operations")
def operations():
    with translate_errors(), resources().pool.connection() as conn:
        counts = queries.run(conn, "dashboard_status_counts")
        latency = queries.run(conn, "dashboard_operation_latency", {"since": "1 hour"})
        limits = queries.run(conn, "dashboard_operation_limits")
        schedules = queries.run(conn, "dashboard_schedules")
    grid = _grid(counts.rows)
    by_operation = {row["operation"]: row for row in latency.rows}
    names = sorted(set(registry.names()) | set(grid))
    return _page(
        "operations.html",
        counts=counts,
        latency=latency,
        limits=limits,
        schedules=schedules,
        rows=[
            {
                "name": name,
                "operation": registry.find(name),
                "counts": grid.get(name, dict.fromkeys(STATUSES, 0)),
                "latency": by_operation.get(name),
            }
            for name in names
        ],
        statuses=STATUSES,
        worker=resources().worker,
    )


@bp.get("/workers")
def workers():
    with translate_errors(), resources().pool.connection() as conn:
        found = queries.run(conn, "dashboard_workers", {"alive_seconds": resources().worker.stalled_seconds})
    return _page("workers.html", workers=found, alive_seconds=resources().worker.stalled_seconds)


@bp.route("/sign-in", methods=["GET", "POST"])
def sign_in():
    target = request.values.get("next") or url_for("dashboard.overview")
    if not target.startswith("/dashboard"):
        target = url_for("dashboard.overview")
    token, new = access.sign_in_form_token()
    if request.method == "GET":
        page = _page("sign_in.html", next=target, error=None, form_token=token)
        return access.set_cookie(page, token) if new else page
    try:
        who = access.sign_in(request.form.get("api_key", ""))
    except access.UnknownKey as refused:
        return _page("sign_in.html", 401, next=target, error=str(refused), form_token=token)
    log.info("dashboard: key %s signed in, role %s", who.key_id, who.role)
    return access.set_cookie(redirect(target, 303), who.csrf_token, who.session)


@bp.post("/sign-out")
def sign_out():
    access.sign_out(g.viewer)
    log.info("dashboard: key %s signed out", g.viewer.key_id)
    return access.clear_cookie(redirect(url_for("dashboard.sign_in"), 303))
