"""Who is looking at the dashboard, and may they act.

With ASYNCPROC_AUTH=required a person signs in once with an API key whose
dashboard_role is 'read' or 'operate'; the dashboard then keeps the key's id in
a signed cookie and re-reads the role on every request, so a revoked key or a
changed role takes effect at once. With auth off the dashboard follows the
API's rule: anyone who can reach it may read and act.

Every action is a POST carrying the session's CSRF token, compared in constant
time; the cookie is SameSite=Lax and HttpOnly.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from flask import Response, current_app, request
from itsdangerous import BadSignature, URLSafeSerializer

from asyncproc import keys
from asyncproc.app_resources import resources
from asyncproc.dashboard import queries
from asyncproc.db import translate_errors

COOKIE = "asyncproc_dashboard"
ROLES = ("read", "operate")


class SignInRequired(Exception):
    """The request has no live dashboard session; the view sends it to sign in."""


class Forbidden(Exception):
    """The session may not do this; the message says why."""


@dataclass(frozen=True)
class Viewer:
    key_id: int | None
    role: str
    csrf_token: str

    @property
    def may_act(self) -> bool:
        return self.role == "operate"


def _serializer() -> URLSafeSerializer:
    extensions = current_app.extensions
    if "asyncproc_dashboard_secret" not in extensions:
        with translate_errors(), resources().pool.connection() as conn:
            extensions["asyncproc_dashboard_secret"] = queries.run(conn, "dashboard_secret_get").rows[0]["secret"]
    return URLSafeSerializer(extensions["asyncproc_dashboard_secret"], salt="asyncproc-dashboard")


def _cookie() -> dict[str, Any] | None:
    raw = request.cookies.get(COOKIE)
    if raw is None:
        return None
    try:
        value = _serializer().loads(raw)
    except BadSignature:
        return None
    return value if isinstance(value, dict) else None


def _role_of(key_id: int) -> str | None:
    with translate_errors(), resources().pool.connection() as conn:
        rows = queries.run(conn, "dashboard_key_role", {"id": key_id}).rows
    return rows[0]["dashboard_role"] if rows else None


def viewer() -> tuple[Viewer, bool]:
    """The current viewer, and whether its cookie must be (re)set."""
    stored = _cookie() or {}
    token = stored.get("csrf")
    if resources().api.auth_required:
        key_id = stored.get("key")
        role = _role_of(key_id) if isinstance(key_id, int) else None
        if role is None or not isinstance(token, str):
            raise SignInRequired()
        return Viewer(key_id, role, token), False
    if isinstance(token, str):
        return Viewer(None, "operate", token), False
    return Viewer(None, "operate", secrets.token_urlsafe(32)), True


def sign_in(api_key: str) -> Viewer:
    """The viewer for `api_key`; Forbidden when it is unknown or has no dashboard role."""
    with translate_errors(), resources().pool.connection() as conn:
        caller = keys.verify(conn, api_key.strip())
    key_id = None if caller is None else caller.id
    role = None if key_id is None else _role_of(key_id)
    if role is None:
        raise Forbidden("That key is unknown, revoked, or has no dashboard role (asyncproc keys create NAME --dashboard read|operate).")
    return Viewer(key_id, role, secrets.token_urlsafe(32))


def set_cookie(response: Response, who: Viewer) -> Response:
    value = _serializer().dumps({"key": who.key_id, "csrf": who.csrf_token})
    response.set_cookie(COOKIE, value, httponly=True, samesite="Lax", secure=request.is_secure, path="/dashboard")
    return response


def clear_cookie(response: Response) -> Response:
    response.delete_cookie(COOKIE, path="/dashboard")
    return response


def check_action(who: Viewer) -> None:
    """Refuse a POST without this session's CSRF token, or from a read-only key."""
    sent = request.form.get("csrf_token", "")
    if not hmac.compare_digest(sent.encode(), who.csrf_token.encode()):
        raise Forbidden("The form's security token is missing or stale; reload the page and try again.")
    if not who.may_act:
        raise Forbidden("This key may read the dashboard but not act: its dashboard role is 'read'.")
