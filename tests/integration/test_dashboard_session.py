"""The dashboard's session and response hardening (issue 27), in process against the real PostgreSQL:
sessions that end, a sign-in that refuses cross-site posts, the security headers, and bad filters as 400s."""

from __future__ import annotations

import html
import re
import time
import uuid

import pytest

from asyncproc import keys
from asyncproc.dashboard.access import COOKIE
from tests.support import CSRF_TOKEN, api_app, dashboard_sign_in, later_task, wait_for


def dashboard_key(conn, role: str = "operate") -> str:
    return keys.create(conn, f"sess-{uuid.uuid4().hex[:12]}", role)


def token_of(client) -> str:
    return CSRF_TOKEN.search(client.get("/dashboard/workers").get_data(as_text=True)).group(1)


def session_cookie(client) -> str:
    return client.get_cookie(COOKIE, path="/dashboard").value


# ------------------------------------------------------------------ sessions end


def test_a_cookie_saved_before_sign_out_no_longer_works(guarded_app, conn):
    client = guarded_app.test_client()
    assert dashboard_sign_in(client, dashboard_key(conn)).status_code == 303
    saved = session_cookie(client)
    assert client.get("/dashboard/tasks").status_code == 200
    signed_out = client.post("/dashboard/sign-out", data={"csrf_token": token_of(client)})
    assert signed_out.status_code == 303
    replay = guarded_app.test_client()
    replay.set_cookie(COOKIE, saved, path="/dashboard")
    refused = replay.get("/dashboard/tasks")
    assert refused.status_code == 302
    assert refused.headers["Location"].startswith("/dashboard/sign-in")


def test_a_read_key_may_sign_out(guarded_app, conn):
    client = guarded_app.test_client()
    dashboard_sign_in(client, dashboard_key(conn, "read"))
    assert client.post("/dashboard/sign-out", data={"csrf_token": token_of(client)}).status_code == 303
    assert client.get("/dashboard/tasks").status_code == 302


def test_sign_out_needs_the_sessions_csrf_token(guarded_app, conn):
    client = guarded_app.test_client()
    dashboard_sign_in(client, dashboard_key(conn))
    assert client.post("/dashboard/sign-out").status_code == 403
    assert client.get("/dashboard/tasks").status_code == 200


def test_a_session_idle_for_longer_than_the_idle_time_ends(database_url, conn):
    application = api_app(database_url, auth="required", dashboard_idle_seconds=1)
    try:
        client = application.test_client()
        key = dashboard_key(conn)
        dashboard_sign_in(client, key)
        assert client.get("/dashboard/tasks").status_code == 200

        def idle_past_the_limit() -> bool:
            # Read in PostgreSQL: a request would itself count as activity.
            return conn.execute(
                "SELECT bool_and(last_seen_at < now() - interval '1.5 seconds') AS idle"
                " FROM asyncproc_dashboard_sessions WHERE key_id = %s",
                (keys.verify(conn, key).id,),
            ).fetchone()["idle"]

        wait_for(idle_past_the_limit, 15, "the session to be idle for longer than 1 s")
        assert client.get("/dashboard/tasks").status_code == 302
    finally:
        application.extensions["asyncproc"].close()


def test_a_session_in_use_ends_at_its_absolute_lifetime(database_url, conn):
    application = api_app(database_url, auth="required", dashboard_session_max_seconds=2)
    try:
        client = application.test_client()
        started = time.monotonic()
        dashboard_sign_in(client, dashboard_key(conn))
        assert client.get("/dashboard/tasks").status_code == 200
        # Used without pause, so only the absolute lifetime can end it.
        wait_for(lambda: client.get("/dashboard/workers").status_code == 302, 20, "the session to end", interval=0.1)
        assert time.monotonic() - started >= 1.5
    finally:
        application.extensions["asyncproc"].close()


def test_signing_in_prunes_expired_sessions(database_url, conn):
    application = api_app(database_url, auth="required", dashboard_session_max_seconds=1)
    try:
        first = application.test_client()
        key = dashboard_key(conn)
        dashboard_sign_in(first, key)
        wait_for(lambda: first.get("/dashboard/workers").status_code == 302, 20, "the first session to end",
                 interval=0.1)
        dashboard_sign_in(application.test_client(), dashboard_key(conn))
        assert conn.execute(
            "SELECT count(*) AS n FROM asyncproc_dashboard_sessions WHERE key_id = %s", (keys.verify(conn, key).id,)
        ).fetchone()["n"] == 0
    finally:
        application.extensions["asyncproc"].close()


# ------------------------------------------------------------------ sign-in refuses cross-site posts


def test_a_sign_in_post_without_the_forms_token_is_refused(guarded_app, conn):
    # What a cross-site form sends: SameSite=Lax keeps the cookie back, and the attacker has no token.
    client = guarded_app.test_client()
    refused = client.post("/dashboard/sign-in", data={"api_key": dashboard_key(conn), "next": "/dashboard"})
    assert refused.status_code == 403
    assert "reload the sign-in page" in refused.get_data(as_text=True)
    assert client.get("/dashboard/tasks").status_code == 302


def test_a_sign_in_post_from_another_site_is_refused_even_with_a_token(guarded_app, conn):
    client = guarded_app.test_client()
    token = CSRF_TOKEN.search(client.get("/dashboard/sign-in").get_data(as_text=True)).group(1)
    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
        refused = client.post(
            "/dashboard/sign-in", data={"api_key": dashboard_key(conn), "csrf_token": token}, headers=headers
        )
        assert refused.status_code == 403, headers
    assert client.get("/dashboard/tasks").status_code == 302
    same_origin = client.post(
        "/dashboard/sign-in", data={"api_key": dashboard_key(conn), "csrf_token": token},
        headers={"Sec-Fetch-Site": "same-origin", "Origin": "http://localhost"},
    )
    assert same_origin.status_code == 303


# ------------------------------------------------------------------ headers


CSP_DIRECTIVES = {"default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'",
                  "base-uri 'none'", "form-action 'self'"}


def _pages(conn) -> list[str]:
    return [
        "/dashboard", "/dashboard/tasks", f"/dashboard/tasks/{later_task(conn)}", "/dashboard/operations",
        "/dashboard/workers", "/dashboard/tasks/bulk?action=cancel&operation=sleep", "/dashboard/sign-in",
        "/dashboard/tasks?status=lost", f"/dashboard/tasks/{uuid.uuid4()}", "/dashboard/no-such-page",
    ]


def _assert_hardened(response, path: str) -> None:
    headers = response.headers
    directives = {part.strip() for part in headers["Content-Security-Policy"].split(";")}
    assert CSP_DIRECTIVES <= directives, (path, directives)
    assert "unsafe-inline" not in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY", path
    assert headers["X-Content-Type-Options"] == "nosniff", path
    assert headers["Referrer-Policy"] == "same-origin", path


def test_every_dashboard_response_has_the_security_headers(open_app, guarded_app, conn):
    client = open_app.test_client()
    for path in _pages(conn):
        response = client.get(path)
        _assert_hardened(response, path)
        assert response.headers["Cache-Control"] == "no-store", path
    static = client.get("/dashboard/static/dashboard.css")
    assert static.status_code == 200
    _assert_hardened(static, "static")
    assert "no-store" not in static.headers.get("Cache-Control", "")
    redirected = guarded_app.test_client().get("/dashboard/tasks")
    assert redirected.status_code == 302
    _assert_hardened(redirected, "the sign-in redirect")


def test_no_page_has_inline_script_style_or_handlers(open_app, conn):
    client = open_app.test_client()
    for path in _pages(conn):
        page = client.get(path).get_data(as_text=True)
        assert not re.search(r"<script(?![^>]*\bsrc=)", page), path
        assert not re.search(r"<[^>]*\sstyle\s*=", page), path
        assert not re.search(r"<[^>]*\son[a-z]+\s*=", page, re.I), path


# ------------------------------------------------------------------ bad filters are 400s


@pytest.mark.parametrize("path,parameter", [
    ("/dashboard/tasks?done=x", "done"),
    ("/dashboard/tasks?done=cancel:3%20tasks.%20Call%20555-0100%20now", "done"),
    ("/dashboard/tasks?error=%00", "error"),
    ("/dashboard/tasks?from=0001-01-01T00:00%2B23:59", "from"),
    ("/dashboard/tasks?to=9999-12-31T23:59-23:59", "to"),
    (f"/dashboard/tasks?after=2026-01-01T00:00:00%2B23:59_{uuid.uuid4()}", "after"),
    ("/dashboard/tasks/bulk?action=cancel&error=a%00b", "error"),
    ("/dashboard/tasks/bulk?action=retry&from=0001-01-01T00:00%2B23:59", "from"),
])
def test_each_bad_filter_is_a_400_page_naming_the_parameter(open_app, path, parameter):
    response = open_app.test_client().get(path)
    assert response.status_code == 400
    assert response.mimetype == "text/html"
    body = response.get_data(as_text=True)
    assert f"{parameter} must" in body
    assert "555-0100" not in body


def test_done_shows_only_what_the_bulk_action_wrote(open_app):
    page = open_app.test_client().get("/dashboard/tasks?done=cancel:4").get_data(as_text=True)
    assert '<p class="notice" id="done">cancel: 4 task(s) changed.</p>' in page


def test_a_confirmed_count_that_is_not_plain_digits_is_a_400(open_app, conn):
    client = open_app.test_client()
    token = CSRF_TOKEN.search(client.get(f"/dashboard/tasks/{later_task(conn)}").get_data(as_text=True)).group(1)
    for confirmed in ("²", "9" * 5000):
        response = client.post("/dashboard/tasks/bulk", data={
            "csrf_token": token, "action": "cancel", "operation": "nothing-matches", "confirmed": confirmed})
        assert response.status_code == 400, confirmed


def test_the_next_links_cursor_is_utc_and_pages_on(open_app, conn):
    operation = f"page{uuid.uuid4().hex[:8]}"
    conn.execute(
        "INSERT INTO tasks (operation, scheduled_at) SELECT %s, now() + interval '1 hour' FROM generate_series(1, 51)",
        (operation,),
    )
    client = open_app.test_client()
    first = client.get(f"/dashboard/tasks?operation={operation}").get_data(as_text=True)
    next_link = html.unescape(re.search(r'id="next-page" href="([^"]+)"', first).group(1))
    assert "%2B00:00_" in next_link
    second = client.get(next_link)
    assert second.status_code == 200
    assert second.get_data(as_text=True).count('class="task-link') == 1
