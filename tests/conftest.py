"""Shared fixtures: real PostgreSQL (embedded by default) and real Redis.

`AQUASIM_TEST_DATABASE_URL` points the tests at an existing server instead of
the embedded one; each test that asks for `db_url` gets a fresh database.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pipeline.services import EmbeddedPostgres, EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
SYSTEM_BROKER_URL = "redis://127.0.0.1:6379/0"


def _admin_url(url: str, dbname: str) -> str:
    from sqlalchemy.engine import make_url

    return (
        make_url(url)
        .set(drivername="postgresql", database=dbname)
        .render_as_string(hide_password=False)
    )


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server URL (its `postgres` database) for the whole session."""
    external = os.environ.get("AQUASIM_TEST_DATABASE_URL")
    if external:
        yield external
        return
    pg = EmbeddedPostgres(tmp_path_factory.mktemp("pg"))
    pg.start()
    try:
        yield pg.url
    finally:
        pg.stop()


@pytest.fixture
def db_url(server_url: str) -> Iterator[str]:
    """A fresh, empty database on the session's server; dropped afterwards."""
    name = f"aq_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_admin_url(server_url, "postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _admin_url(server_url, name).replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield url
    finally:
        with psycopg.connect(_admin_url(server_url, "postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    redis = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    redis.start()
    try:
        yield redis.url
    finally:
        redis.stop()


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def system_services() -> tuple[str, str]:
    """The machine's own PostgreSQL and Redis, as in a distributed deployment."""
    if not (_reachable("127.0.0.1", 5432) and _reachable("127.0.0.1", 6379)):
        pytest.skip("system PostgreSQL/Redis not reachable on 127.0.0.1")
    return SYSTEM_DATABASE_URL, SYSTEM_BROKER_URL
