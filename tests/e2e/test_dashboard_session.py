"""The dashboard with access control on, through the real gunicorn, worker and Chromium: the cookie is
Secure behind a trusted TLS proxy and not from any other peer, the pages work under their
Content-Security-Policy, and a cookie saved before sign-out is refused after it."""

from __future__ import annotations

import http.client
import re
import shutil
import uuid
from typing import Iterator
from urllib.parse import urlsplit

import pytest
import requests

from asyncproc import keys
from tests.e2e.conftest import Service, start_service, stop_service
from tests.support import bearer, new_key

# The test's stand-in for a TLS proxy: a second loopback address, the only trusted one.
PROXY = "127.0.0.2"
TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, database_url, redis_url) -> Iterator[Service]:
    running, processes = start_service(
        tmp_path_factory.mktemp("dashboard-session"), database_url, redis_url, concurrency=4,
        extra_env={"ASYNCPROC_AUTH": "required", "ASYNCPROC_TRUSTED_PROXIES": PROXY},
    )
    yield running
    assert stop_service(processes) == [0, 0], f"a process did not exit cleanly; logs in {running.logs}"


def _request(service: Service, source: str, method: str, path: str, body: str | None = None,
             headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    """One request from the loopback address `source`, as if through a proxy saying the client used HTTPS."""
    address = urlsplit(service.base_url)
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=10, source_address=(source, 0))
    conn.request(method, path, body=body, headers={"X-Forwarded-Proto": "https", **(headers or {})})
    response = conn.getresponse()
    response.body = response.read().decode()
    conn.close()
    return response


def _attributes(set_cookie: str) -> set[str]:
    return {part.strip().split("=")[0].lower() for part in set_cookie.split(";")[1:]}


def _sign_in(service: Service, source: str, key: str) -> http.client.HTTPResponse:
    form = _request(service, source, "GET", "/dashboard/sign-in")
    assert form.status == 200
    cookie = form.getheader("Set-Cookie").split(";")[0]
    body = f"api_key={key}&csrf_token={TOKEN.search(form.body).group(1)}&next=/dashboard"
    return _request(service, source, "POST", "/dashboard/sign-in", body, {
        "Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded", "Sec-Fetch-Site": "same-origin",
    })


def test_the_cookie_is_secure_behind_a_trusted_tls_proxy(guarded, conn):
    form = _request(guarded, PROXY, "GET", "/dashboard/sign-in")
    assert "secure" in _attributes(form.getheader("Set-Cookie"))
    signed_in = _sign_in(guarded, PROXY, keys.create(conn, f"proxy-{uuid.uuid4().hex[:8]}", "read"))
    assert signed_in.status == 303, signed_in.body
    assert {"secure", "httponly", "samesite", "max-age"} <= _attributes(signed_in.getheader("Set-Cookie"))


def test_the_cookie_is_not_secure_from_an_untrusted_peer_saying_https(guarded, conn):
    form = _request(guarded, "127.0.0.1", "GET", "/dashboard/sign-in")
    assert "secure" not in _attributes(form.getheader("Set-Cookie"))
    signed_in = _sign_in(guarded, "127.0.0.1", keys.create(conn, f"direct-{uuid.uuid4().hex[:8]}", "read"))
    assert signed_in.status == 303, signed_in.body
    assert "secure" not in _attributes(signed_in.getheader("Set-Cookie"))


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: apt-get install chromium")
def test_sign_in_live_progress_and_sign_out_in_a_browser_under_the_csp(guarded, conn):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install -e '.[test]')")
    operator = keys.create(conn, f"oncall-{uuid.uuid4().hex[:8]}", "operate")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            context = browser.new_context()
            page = context.new_page()
            page.set_default_timeout(15_000)
            refused: list[str] = []
            page.on("console", lambda message: refused.append(message.text)
                    if "Content Security Policy" in message.text else None)
            page.goto(f"{guarded.base_url}/dashboard")
            page.wait_for_url("**/dashboard/sign-in**")
            page.fill("input[name=api_key]", operator)
            page.click("button:has-text('Sign in')")
            page.wait_for_url(lambda url: urlsplit(url).path == "/dashboard")
            assert page.inner_text("h1") == "Overview"

            submitted = requests.post(
                f"{guarded.base_url}/process", timeout=10, headers=bearer(new_key(conn)),
                json={"operation": "steps", "delay_seconds": 1, "data": {"count": 4, "seconds": 0.4}},
            )
            assert submitted.status_code == 202, submitted.text
            page.goto(f"{guarded.base_url}/dashboard/tasks/{submitted.json()['task_id']}")
            assert page.inner_text("#task-status") in ("pending", "running")
            # Only dashboard.js, loaded under the policy, moves the open page on to 'completed'.
            # (A locator, not wait_for_function: the policy refuses the eval that one needs.)
            sync_api.expect(page.locator("#task-status")).to_have_text("completed", timeout=15_000)
            saved = context.cookies()
            page.click("button:has-text('Sign out')")
            page.wait_for_url("**/dashboard/sign-in**")
            assert refused == []

            replay = browser.new_context()
            replay.add_cookies(saved)
            replayed = replay.new_page()
            replayed.goto(f"{guarded.base_url}/dashboard/tasks")
            assert urlsplit(replayed.url).path == "/dashboard/sign-in"
        finally:
            browser.close()
