"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

The compose file must parse, name the services of the distributed deployment, run
only `aquasim` subcommands (and options) that the CLI really has, keep `worker`
scalable, and refuse to start Flower without credentials. The image must install
the project and have `aquasim` as its entrypoint.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib

import pytest
import typer.main
import yaml

from pipeline.cli import app
from tests.conftest import ROOT

SERVICES = {"postgres", "redis", "worker", "beat", "flower", "coordinator"}


@pytest.fixture(scope="module")
def compose() -> dict:
    with open(ROOT / "docker-compose.yml") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            pairs.append((instruction.upper(), args.strip()))
    return pairs


def _argv(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _entrypoint(dockerfile: list[tuple[str, str]]) -> list[str]:
    (args,) = [a for i, a in dockerfile if i == "ENTRYPOINT"]
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def _service_argv(service: dict, dockerfile: list[tuple[str, str]]) -> list[str]:
    """What the container runs: entrypoint + command (the image's, for services we build)."""
    if "build" in service:
        entry = _argv(service["entrypoint"]) if "entrypoint" in service else None
        if entry is None:
            entry = _entrypoint(dockerfile)
        return entry + _argv(service.get("command"))
    return _argv(service.get("entrypoint")) + _argv(service.get("command"))


def test_compose_parses_and_has_the_services(compose: dict) -> None:
    assert set(compose["services"]) >= SERVICES
    services = compose["services"]
    assert services["postgres"]["image"].startswith("timescale/timescaledb:")
    assert services["redis"]["image"].startswith("redis:7")
    for name in ("postgres", "redis"):
        assert "healthcheck" in services[name], name
    assert "pg_isready" in _argv(services["postgres"]["healthcheck"]["test"])
    for name in ("worker", "beat", "flower", "coordinator"):
        assert services[name].get("build") == ".", name


def test_every_aquasim_command_exists_in_the_cli(
    compose: dict, dockerfile: list[tuple[str, str]]
) -> None:
    group = typer.main.get_command(app)
    commands = group.commands  # type: ignore[attr-defined]
    found: list[str] = []
    missing: set[str] = set()
    for name, service in compose["services"].items():
        argv = _service_argv(service, dockerfile)
        if not argv or argv[0] != "aquasim":
            continue
        assert len(argv) > 1 and argv[1] != "aquasim", f"{name}: runs {argv}"
        subcommand, args = argv[1], argv[2:]
        found.append(name)
        command = commands.get(subcommand)
        if command is None:
            missing.add(subcommand)
            continue
        known = {opt for param in command.params for opt in param.opts}
        unknown = {a.split("=")[0] for a in args if a.startswith("-")} - known
        if unknown:
            missing |= {f"{subcommand} {opt}" for opt in unknown}
            continue
        command.make_context(subcommand, list(args))  # parses: values valid for options
    assert set(found) == {"worker", "beat", "flower", "coordinator"}
    assert not missing, f"compose runs what the aquasim CLI lacks: {sorted(missing)}"


def test_worker_scales_and_coordinator_runs_once(
    compose: dict, dockerfile: list[tuple[str, str]]
) -> None:
    services = compose["services"]
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert _service_argv(worker, dockerfile)[:2] == ["aquasim", "worker"]
    env = worker["environment"]
    assert env["AQUASIM_BROKER_URL"] == "redis://redis:6379/0"
    assert re.fullmatch(
        r"postgresql://postgres:\$\{POSTGRES_PASSWORD:\?[^}]*\}@postgres:5432/aquasim",
        env["AQUASIM_DATABASE_URL"],
    )
    assert re.fullmatch(
        r"\$\{POSTGRES_PASSWORD:\?[^}]*\}", services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    )

    coordinator = services["coordinator"]
    assert _service_argv(coordinator, dockerfile) == ["aquasim", "run", "--workers", "0"]
    assert str(coordinator["restart"]) == "no"
    for dependency in ("postgres", "redis"):
        assert coordinator["depends_on"][dependency]["condition"] == "service_healthy"


def test_flower_requires_credentials(compose: dict, dockerfile: list[tuple[str, str]]) -> None:
    flower = compose["services"]["flower"]
    assert _service_argv(flower, dockerfile)[:2] == ["aquasim", "flower"]
    env = flower["environment"]
    for variable in ("AQUASIM_FLOWER_USER", "AQUASIM_FLOWER_PASSWORD"):
        # `${VAR:?message}`: compose refuses to start when VAR is unset or empty
        assert re.fullmatch(rf"\$\{{{variable}:\?[^}}]*\}}", str(env[variable])), env[variable]
    assert any(str(p).endswith(":5555") for p in flower["ports"])


def test_no_default_passwords(compose: dict) -> None:
    """Every password comes from the environment with `:?`: none is written in the file."""
    text = (ROOT / "docker-compose.yml").read_text()
    assert not re.search(r"PASSWORD\w*:?-", text), "a password variable has a default"
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key:
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(value)), (name, key, value)


def test_dockerfile_installs_the_project_with_aquasim_entrypoint(
    dockerfile: list[tuple[str, str]],
) -> None:
    (base,) = [a for i, a in dockerfile if i == "FROM"]
    assert base.startswith("python:3.11-slim")
    assert _entrypoint(dockerfile) == ["aquasim"]
    runs = [a for i, a in dockerfile if i == "RUN"]
    assert any(re.search(r"\bpip install (\S+ )*\.(\s|$)", r) for r in runs), runs

    copied = {a.split()[0] for i, a in dockerfile if i == "COPY"}
    with open(ROOT / "pyproject.toml", "rb") as f:
        packages = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {p.rstrip("*") for p in packages} | {"pyproject.toml", "scenarios"}
    assert needed <= copied, f"not copied into the image: {needed - copied}"
    for source in copied:
        assert (ROOT / source).exists(), source

    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert {".env", ".venv", ".aquasim", ".git"} <= ignored
    assert not needed & ignored
