"""The systemd unit examples in deploy/systemd name real commands, settings and units."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest

from asyncproc.cli import _parser
from asyncproc.config import Settings, WorkerSettings
from tests.support import PROJECT_ROOT

UNITS = sorted((PROJECT_ROOT / "deploy" / "systemd").glob("*.service"))


def _unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str
    unit.read_string(path.read_text())
    return unit


def test_there_are_units_for_migrate_api_and_workers():
    assert {p.name for p in UNITS} == {"asyncproc-migrate.service", "asyncproc-api.service", "asyncproc-worker@.service"}


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_each_unit_runs_a_real_command_with_valid_settings(path):
    service = _unit(path)["Service"]
    words = shlex.split(service["ExecStart"])
    assert words[0].endswith("/bin/asyncproc")
    args = _parser().parse_args(words[1:])
    assert path.name.startswith(f"asyncproc-{args.command}")
    assert service["EnvironmentFile"] == "/etc/asyncproc/asyncproc.env"
    Settings.from_env(dict(word.split("=", 1) for word in shlex.split(service.get("Environment", ""))))
    for name in _unit(path)["Unit"].get("Requires", "").split():
        assert (path.parent / name).exists(), name


def test_the_worker_may_take_longer_to_stop_than_its_grace_period():
    service = _unit(PROJECT_ROOT / "deploy" / "systemd" / "asyncproc-worker@.service")["Service"]
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > WorkerSettings().shutdown_grace_seconds


def test_migrate_waits_for_the_database():
    service = _unit(PROJECT_ROOT / "deploy" / "systemd" / "asyncproc-migrate.service")["Service"]
    assert _parser().parse_args(shlex.split(service["ExecStart"])[1:]).wait > 0


def test_the_api_unit_yields_the_cpu_to_the_worker_units():
    # Units are cgroups of their own, which the API's nice does not order.
    directory = PROJECT_ROOT / "deploy" / "systemd"
    api = _unit(directory / "asyncproc-api.service")["Service"]
    worker = _unit(directory / "asyncproc-worker@.service")["Service"]
    assert int(api["CPUWeight"]) * 8 < int(worker.get("CPUWeight", "100"))


def test_the_api_unit_listens_on_loopback_only_unless_access_control_is_required():
    service = _unit(PROJECT_ROOT / "deploy" / "systemd" / "asyncproc-api.service")["Service"]
    settings = Settings.from_env(dict(word.split("=", 1) for word in shlex.split(service.get("Environment", ""))))
    host = settings.api.bind.rsplit(":", 1)[0]
    assert host in ("127.0.0.1", "localhost", "[::1]") or settings.api.auth == "required", settings.api.bind
