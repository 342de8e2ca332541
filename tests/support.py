"""What several test modules share and pytest does not inject: constants and helpers.

Test modules import from here (or take conftest fixtures), never from each other.
"""

from __future__ import annotations

import configparser
from pathlib import Path

# The checkout the tests run from: its documents, deployment files and packaging.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def setup_cfg() -> configparser.ConfigParser:
    parsed = configparser.ConfigParser(interpolation=None)
    parsed.read_string((PROJECT_ROOT / "setup.cfg").read_text())
    return parsed


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip() and not line.strip().startswith("#")]


def package_sources() -> dict[str, Path]:
    """Each package setup.cfg installs, and the checkout's directory it is built from (package_dir applied)."""
    options = setup_cfg()["options"]
    mapped = dict(
        (name.strip(), PROJECT_ROOT / directory.strip())
        for name, directory in (line.split("=", 1) for line in _lines(options.get("package_dir", "")))
    )
    sources = {}
    for package in _lines(options["packages"]):
        parts = package.split(".")
        for cut in range(len(parts), 0, -1):
            if ".".join(parts[:cut]) in mapped:
                sources[package] = mapped[".".join(parts[:cut])].joinpath(*parts[cut:])
                break
        else:
            sources[package] = PROJECT_ROOT.joinpath(*parts)
    return sources
