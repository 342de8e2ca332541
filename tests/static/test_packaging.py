"""setup.cfg lists its packages by hand (asyncproc.migrations is mapped from the
top-level migrations/), so these check that the list and the tree agree."""

from __future__ import annotations

from packaging.requirements import Requirement

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
    directory = sources["asyncproc.migrations"]
    assert directory == PROJECT_ROOT / "migrations"
    patterns = [p.strip() for p in setup_cfg()["options.package_data"]["asyncproc.migrations"].split(",")]
    # setuptools globs each pattern from the package's directory, where a `*` stays within one directory.
    packaged = {path for pattern in patterns for path in directory.glob(pattern)}
    sql = set(directory.rglob("*.sql"))
    assert sql and packaged == sql, sorted(str(p.relative_to(directory)) for p in sql ^ packaged)
    assert any(path.parent.name == "current" for path in packaged)
    # The editable install of the checkout resolves the package onto the same directory.
    assert Settings().migrations_dir.resolve() == sources["asyncproc.migrations"]


def test_every_dependency_has_an_upper_bound():
    # An install of the same commit a month later must not pick up a release
    # nobody has run the tests on; the CI's lowest-versions run keeps the lower bounds honest.
    options = setup_cfg()["options"]
    lists = [options["install_requires"], *setup_cfg()["options.extras_require"].values()]
    lines = [line.strip() for text in lists for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(lines) > 10
    unbounded = [line for line in lines if not any(spec.operator in ("<", "<=", "==", "~=") for spec in Requirement(line).specifier)]
    assert not unbounded, unbounded
