"""Who is looking at the dashboard, and may they act.

With ASYNCPROC_AUTH=required a person signs in with an API key whose
dashboard_role is 'read' or 'operate'. Signing in starts a session held on the
server (asyncproc_dashboard_sessions); the signed cookie carries its random
token. Every request looks the session up, with the key's current role, so a
revoked key or a changed role takes effect at once; a session ends when its
person signs out (every copy of the cookie with it), when it has been idle for
ASYNCPROC_DASHBOARD_IDLE_SECONDS, and ASYNCPROC_DASHBOARD_SESSION_MAX_SECONDS
after sign-in. With auth off the dashboard follows the API's rule: anyone who
can reach it may read and act, and the cookie holds only a CSRF token.

Every POST carries the cookie's CSRF token, compared in constant time, the
sign-in form's included: a sign-in posted from another site has no cookie
(SameSite=Lax keeps it back) and so no token. The cookie is HttpOnly.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from flask import Response, current_app, request
from itsdangerous import BadSignature, URLSafeSerializer

from asyncproc import keys
from asyncproc.app_resources import resources
from asyncproc.dashboard import queries
from asyncproc.db import query, translate_errors

COOKIE = "asyncproc_dashboard"
# A session's last activity is written when it is older than this share of the
# idle time: an idle session ends up to a tenth early, and pages seldom write.
_TOUCH_SHARE = 0.1
# What a browser says of a request's origin (Sec-Fetch-Site) that may sign in:
# a page of this origin, or the person typing the address.
_SIGN_IN_SITES = frozenset({"same-origin", "none"})


class SignInRequired(Exception):
    """The request has no live dashboard session; the view sends it to sign in."""


class Forbidden(Exception):
    """The session may not do this; the message says why."""


class UnknownKey(Exception):
    """The key given to sign in is unknown, revoked, or has no dashboard role."""


@dataclass(frozen=True)
class Viewer:
    key_id: int | None
    role: str
    csrf_token: str
    # The session's token; None with auth off.
    session: str | None = None

    @property
    def may_act(self) -> bool:
        return self.role == "operate"


def _serializer() -> URLSafeSerializer:
    extensions = current_app.extensions
    if "asyncproc_dashboard_secret" not in extensions:
        with translate_errors(), resources().pool.connection() as conn:
            extensions["asyncproc_dashboard_secret"] = queries.run(conn, "dashboard_secret_get").rows[0]["secret"]
    return URLSafeSerializer(extensions["asyncproc_dashboard_secret"], salt="asyncproc-dashboard")


def _cookie() -> dict[str, Any]:
    raw = request.cookies.get(COOKIE)
    if raw is None:
        return {}
    try:
        value = _serializer().loads(raw)
    except BadSignature:
        return {}
    return value if isinstance(value, dict) else {}


def _hash(session: str) -> bytes:
    return hashlib.sha256(session.encode()).digest()


def _lifetimes() -> dict[str, float]:
    api = resources().api
    return {"idle_seconds": api.dashboard_idle_seconds, "max_seconds": api.dashboard_session_max_seconds}


def _live_session(session: str) -> tuple[int, str] | None:
    """The key id and role of a live session, and its activity noted."""
    lifetimes = _lifetimes()
    params = {"token_hash": _hash(session), **lifetimes, "touch_seconds": lifetimes["idle_seconds"] * _TOUCH_SHARE}
    with translate_errors(), resources().pool.connection() as conn:
        rows = conn.execute(query("dashboard_session_get"), params).fetchall()
    return (rows[0]["key_id"], rows[0]["dashboard_role"]) if rows else None


def viewer() -> tuple[Viewer, bool]:
    """The current viewer, and whether its cookie must be (re)set."""
    stored = _cookie()
    token = stored.get("csrf")
    if resources().api.auth_required:
        session = stored.get("sid")
        live = _live_session(session) if isinstance(session, str) else None
        if live is None or not isinstance(token, str):
            raise SignInRequired()
        return Viewer(live[0], live[1], token, session), False
    if isinstance(token, str):
        return Viewer(None, "operate", token), False
    return Viewer(None, "operate", secrets.token_urlsafe(32)), True


def sign_in_form_token() -> tuple[str, bool]:
    """The token the sign-in form carries, and whether the cookie must be set to hold it."""
    token = _cookie().get("csrf")
    if isinstance(token, str):
        return token, False
    return secrets.token_urlsafe(32), True


def sign_in(api_key: str) -> Viewer:
    """A new session for `api_key`, ending the one this browser had.

    Forbidden when the post came from another site; UnknownKey when the key may not sign in.
    """
    stored = _cookie()
    _check_sign_in_origin(stored.get("csrf"))
    with translate_errors(), resources().pool.connection() as conn:
        caller = keys.verify(conn, api_key.strip())
        rows = [] if caller is None else conn.execute(query("dashboard_key_role"), {"id": caller.id}).fetchall()
        role = rows[0]["dashboard_role"] if rows else None
        if role is None:
            raise UnknownKey(
                "That key is unknown, revoked, or has no dashboard role"
                " (asyncproc keys create NAME --dashboard read|operate)."
            )
        session = secrets.token_urlsafe(32)
        with conn.transaction():
            # Each sign-in clears away the sessions that have ended, so the table never grows past the live ones.
            conn.execute(query("dashboard_sessions_prune"), _lifetimes())
            if isinstance(stored.get("sid"), str):
                conn.execute(query("dashboard_session_delete"), {"token_hash": _hash(stored["sid"])})
            conn.execute(query("dashboard_session_create"), {"token_hash": _hash(session), "key_id": caller.id})
    return Viewer(caller.id, role, secrets.token_urlsafe(32), session)


def _check_sign_in_origin(expected: Any) -> None:
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in _SIGN_IN_SITES:
        raise Forbidden("A sign-in from another site is refused: open this dashboard's sign-in page and sign in there.")
    sent = request.form.get("csrf_token", "")
    if not isinstance(expected, str) or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise Forbidden("The sign-in form's security token is missing or stale: reload the sign-in page and sign in again.")


def sign_out(who: Viewer) -> None:
    """End `who`'s session on the server, for every copy of its cookie."""
    if who.session is None:
        return
    with translate_errors(), resources().pool.connection() as conn:
        conn.execute(query("dashboard_session_delete"), {"token_hash": _hash(who.session)})


def set_cookie(response: Response, csrf_token: str, session: str | None = None) -> Response:
    """The cookie that carries a session and its CSRF token, or only a CSRF token."""
    value: dict[str, Any] = {"csrf": csrf_token}
    max_age = None
    if session is not None:
        value["sid"] = session
        max_age = round(resources().api.dashboard_session_max_seconds)
    response.set_cookie(
        COOKIE, _serializer().dumps(value), max_age=max_age, httponly=True, samesite="Lax",
        secure=request.is_secure, path="/dashboard",
    )
    return response


def clear_cookie(response: Response) -> Response:
    response.delete_cookie(COOKIE, path="/dashboard", httponly=True, samesite="Lax", secure=request.is_secure)
    return response


def check_token(who: Viewer) -> None:
    """Refuse a POST without this session's CSRF token."""
    sent = request.form.get("csrf_token", "")
    if not hmac.compare_digest(sent.encode(), who.csrf_token.encode()):
        raise Forbidden("The form's security token is missing or stale; reload the page and try again.")


def check_may_act(who: Viewer) -> None:
    if not who.may_act:
        raise Forbidden("This key may read the dashboard but not act: its dashboard role is 'read'.")
