"""/metrics is protected by its own token, or served to this host only."""

from __future__ import annotations

from asyncproc.api import create_app
from asyncproc.config import ApiSettings, DatabaseSettings, Settings

TOKEN = "s3cret-metrics-token-0123456789"


def test_without_a_token_metrics_are_for_this_host_only(database_url):
    app = create_app(Settings(db=DatabaseSettings(url=database_url)))
    try:
        client = app.test_client()
        assert client.get("/metrics").status_code == 200
        remote = client.get("/metrics", environ_base={"REMOTE_ADDR": "198.51.100.1"})
        assert remote.status_code == 403
        assert remote.get_json()["error"]["code"] == "forbidden"
    finally:
        app.extensions["asyncproc"].close()


def test_with_a_token_metrics_need_it_and_api_keys_do_not_open_them(database_url):
    app = create_app(Settings(db=DatabaseSettings(url=database_url), api=ApiSettings(auth="required", metrics_token=TOKEN)))
    try:
        client = app.test_client()
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code == 401
        remote = client.get(
            "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, environ_base={"REMOTE_ADDR": "198.51.100.1"}
        )
        assert remote.status_code == 200
        assert b"asyncproc_http_requests" in remote.data
    finally:
        app.extensions["asyncproc"].close()
