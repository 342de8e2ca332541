"""The dashboard's session lifetimes and the trusted proxies: read, checked, and handed to gunicorn."""

from __future__ import annotations

import pytest

from asyncproc.api.server import ApiServer
from asyncproc.config import Settings
from asyncproc.errors import ConfigError


def test_session_lifetimes_have_defaults_and_are_read():
    assert (Settings.from_env({}).api.dashboard_idle_seconds, Settings.from_env({}).api.dashboard_session_max_seconds) == (
        1800, 43200
    )
    api = Settings.from_env(
        {"ASYNCPROC_DASHBOARD_IDLE_SECONDS": "60", "ASYNCPROC_DASHBOARD_SESSION_MAX_SECONDS": "3600"}
    ).api
    assert (api.dashboard_idle_seconds, api.dashboard_session_max_seconds) == (60, 3600)


@pytest.mark.parametrize("name,value", [
    ("ASYNCPROC_DASHBOARD_IDLE_SECONDS", "0"),
    ("ASYNCPROC_DASHBOARD_IDLE_SECONDS", "half an hour"),
    ("ASYNCPROC_DASHBOARD_SESSION_MAX_SECONDS", "-1"),
    ("ASYNCPROC_DASHBOARD_SESSION_MAX_SECONDS", "99999999"),
    ("ASYNCPROC_TRUSTED_PROXIES", "10.0.0.0/33"),
    ("ASYNCPROC_TRUSTED_PROXIES", "lb.internal"),
])
def test_a_bad_value_names_its_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_gunicorn_believes_x_forwarded_proto_from_the_trusted_proxies_only():
    listed = Settings.from_env({"ASYNCPROC_TRUSTED_PROXIES": "10.0.0.1/8, 192.0.2.5,::1"})
    # Normalised: gunicorn refuses a network with host bits set.
    assert listed.api.trusted_proxies == ("10.0.0.0/8", "192.0.2.5/32", "::1/128")
    assert ApiServer(listed, "127.0.0.1:0", 1).cfg.forwarded_allow_ips == ["10.0.0.0/8", "192.0.2.5/32", "::1/128"]
    # Unset: no peer, not even gunicorn's default of 127.0.0.1.
    assert ApiServer(Settings.from_env({}), "127.0.0.1:0", 1).cfg.forwarded_allow_ips == []
