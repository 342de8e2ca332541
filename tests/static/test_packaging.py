"""setup.cfg lists its packages by hand (asyncproc.migrations is mapped from the
top-level migrations/), so these check that the list and the tree agree."""

from __future__ import annotations

from fnmatch import fnmatch

from asyncproc.config import Settings
from tests.support import PROJECT_ROOT, package_sources, setup_cfg


def test_every_package_in_the_tree_is_installed_and_every_listed_one_exists():
    sources = package_sources()
    in_tree = {
        init.parent
        for top in ("asyncproc", "worker")
        for init in (PROJECT_ROOT / top).rglob("__init__.py")
    }
    assert in_tree <= set(sources.values()), sorted(str(p) for p in in_tree - set(sources.values()))
    for package, directory in sources.items():
        assert (directory / "__init__.py").is_file(), f"{package}: no {directory}/__init__.py"


def test_the_migrations_are_package_data_of_the_package_settings_reads():
    sources = package_sources()
    assert sources["asyncproc.migrations"] == PROJECT_ROOT / "migrations"
    patterns = [p.strip() for p in setup_cfg()["options.package_data"]["asyncproc.migrations"].split(",")]
    migrations = sorted((PROJECT_ROOT / "migrations").glob("*.sql"))
    assert migrations and all(any(fnmatch(m.name, p) for p in patterns) for m in migrations)
    # The editable install of the checkout resolves the package onto the same directory.
    assert Settings().migrations_dir.resolve() == sources["asyncproc.migrations"]
