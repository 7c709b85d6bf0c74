"""Embedded PostgreSQL and Redis: real servers in temporary data directories."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest
import redis

from pipeline.services import (
    EmbeddedPostgres,
    EmbeddedRedis,
    EmbeddedServices,
    ServiceUnavailable,
    check_reachable,
    hide_password,
    resolve_urls,
    sqlalchemy_url,
)
from pipeline.settings import Settings

ROOT = Path(__file__).resolve().parent.parent

S = TypeVar("S", EmbeddedPostgres, EmbeddedRedis, EmbeddedServices)
StopAfter = Callable[[S], S]


@pytest.fixture
def stopped_after() -> Iterator[StopAfter]:
    """Register a server to be stopped when the test ends, whatever happens."""
    servers: list[EmbeddedPostgres | EmbeddedRedis | EmbeddedServices] = []

    def register(server: S) -> S:
        servers.append(server)
        return server

    yield register
    for server in reversed(servers):
        server.stop()


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(tmp_path_factory.mktemp("services"))
    pg.start()
    yield pg
    pg.stop()


def _query(url: str, sql: str) -> object:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
    return None if row is None else row[0]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start_in_subprocess(cls: str, data_dir: Path) -> None:
    code = (
        f"import sys, pathlib, pipeline.services as s; s.{cls}(pathlib.Path(sys.argv[1])).start()"
    )
    subprocess.run([sys.executable, "-c", code, str(data_dir)], cwd=ROOT, check=True, timeout=60)


def test_postgres_keeps_data_across_stop_and_start(
    tmp_path: Path, stopped_after: StopAfter
) -> None:
    pg = stopped_after(EmbeddedPostgres(tmp_path))
    pg.start()
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (id int)")
        conn.execute("INSERT INTO kept VALUES (1), (2)")
    pg.stop()
    assert not pg.running
    pg.stop()
    pg.start()
    assert pg.running
    assert _query(pg.url, "SELECT count(*) FROM kept") == 2


def test_postgres_is_tuned_for_bulk_loading(postgres: EmbeddedPostgres) -> None:
    expected = {
        "wal_level": "minimal",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "shared_buffers": "1GB",
        "max_wal_size": "8GB",
        "work_mem": "64MB",
        "jit": "off",
        "fsync": "on",
        "listen_addresses": "",
    }
    for name, value in expected.items():
        assert _query(postgres.url, f"SHOW {name}") == value, name


def test_postgres_creates_btree_gist(postgres: EmbeddedPostgres) -> None:
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS btree_gist")
        conn.execute(
            "CREATE TEMP TABLE spans (k int, during tstzrange,"
            " EXCLUDE USING gist (k WITH =, during WITH &&))"
        )


def test_postgres_url_works_for_sqlalchemy(postgres: EmbeddedPostgres) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(sqlalchemy_url(postgres.url))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
    engine.dispose()


def test_postgres_second_start_reuses_the_running_server(postgres: EmbeddedPostgres) -> None:
    started = _query(postgres.url, "SELECT pg_postmaster_start_time()")
    postgres.start()
    assert _query(postgres.url, "SELECT pg_postmaster_start_time()") == started


def test_postgres_restarts_when_its_tuning_is_not_applied(postgres: EmbeddedPostgres) -> None:
    conf = postgres.pgdata / "aquasim.conf"
    conf.write_text(conf.read_text().replace("'1GB'", "'128MB'"))
    postgres.start()
    assert _query(postgres.url, "SHOW shared_buffers") == "1GB"
    assert "'1GB'" in conf.read_text()


def test_postgres_outlives_the_process_that_started_it(
    tmp_path: Path, stopped_after: StopAfter
) -> None:
    _start_in_subprocess("EmbeddedPostgres", tmp_path)
    pg = stopped_after(EmbeddedPostgres(tmp_path))
    assert pg.running
    assert _query(pg.url, "SELECT 1") == 1


def test_postgres_moves_its_socket_out_of_a_long_or_spaced_path(
    tmp_path: Path, stopped_after: StopAfter
) -> None:
    pg = stopped_after(EmbeddedPostgres(tmp_path / ("long dir " * 10)))
    pg.start()
    assert pg.socket_dir != pg.pgdata
    assert _query(pg.url, "SELECT 1") == 1


def test_redis_starts_answers_stops_and_restarts_on_the_same_port(
    tmp_path: Path, stopped_after: StopAfter
) -> None:
    server = stopped_after(EmbeddedRedis(tmp_path))
    server.start()
    url = server.url
    client = redis.Redis.from_url(url)
    assert client.ping()
    client.set("fish", "salmon")
    assert client.get("fish") == b"salmon"
    server.stop()
    assert not server.running
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, retry=None).ping()
    server.start()
    assert server.url == url
    assert redis.Redis.from_url(url).get("fish") is None


def test_redis_second_start_reuses_the_running_server(
    tmp_path: Path, stopped_after: StopAfter
) -> None:
    server = stopped_after(EmbeddedRedis(tmp_path))
    server.start()
    pid = redis.Redis.from_url(server.url).info("server")["process_id"]
    EmbeddedRedis(tmp_path).start()
    assert redis.Redis.from_url(server.url).info("server")["process_id"] == pid


def test_redis_outlives_the_process_that_started_it(
    tmp_path: Path, stopped_after: StopAfter
) -> None:
    _start_in_subprocess("EmbeddedRedis", tmp_path)
    server = stopped_after(EmbeddedRedis(tmp_path))
    assert server.running
    assert redis.Redis.from_url(server.url).ping()


def test_resolve_urls_uses_given_urls_without_embedded_servers(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,
        database_url="postgresql://u:p@db.example:5432/aq",
        broker_url="redis://broker.example:6379/1",
        data_dir=tmp_path / "data",
    )
    with resolve_urls(settings) as urls:
        assert urls == (
            "postgresql+psycopg://u:p@db.example:5432/aq",
            "redis://broker.example:6379/1",
        )
    assert not (tmp_path / "data").exists()


def test_resolve_urls_stops_only_the_servers_it_started(
    tmp_path: Path, stopped_after: StopAfter
) -> None:
    services = stopped_after(EmbeddedServices(tmp_path))
    services.redis.start()
    settings = Settings(_env_file=None, database_url=None, broker_url=None, data_dir=tmp_path)
    with resolve_urls(settings) as (database_url, broker_url):
        assert database_url == services.database_url
        assert broker_url == services.broker_url
        check_reachable(database_url, broker_url)
    assert not services.postgres.running
    assert services.redis.running


def test_resolve_urls_keep_running_leaves_servers_up(
    tmp_path: Path, stopped_after: StopAfter
) -> None:
    services = stopped_after(EmbeddedServices(tmp_path))
    settings = Settings(_env_file=None, database_url=None, broker_url=None, data_dir=tmp_path)
    with resolve_urls(settings, keep_running=True):
        pass
    assert services.postgres.running
    assert services.redis.running


def test_check_reachable_names_an_unreachable_database() -> None:
    url = f"postgresql+psycopg://aq:secret@127.0.0.1:{_closed_port()}/aq"
    with pytest.raises(ServiceUnavailable, match="PostgreSQL") as caught:
        check_reachable(url, "redis://127.0.0.1:1/0")
    message = str(caught.value)
    assert hide_password(url) in message
    assert "secret" not in message
    assert "\n" not in message


def test_check_reachable_names_an_unreachable_broker(postgres: EmbeddedPostgres) -> None:
    url = f"redis://:secret@127.0.0.1:{_closed_port()}/0"
    with pytest.raises(ServiceUnavailable, match="Redis") as caught:
        check_reachable(postgres.url, url)
    assert f"redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in str(caught.value)
    assert "secret" not in str(caught.value)


def test_url_helpers() -> None:
    assert sqlalchemy_url("postgresql://a@/b?host=/s") == "postgresql+psycopg://a@/b?host=/s"
    assert sqlalchemy_url("postgresql+psycopg://a@h/b") == "postgresql+psycopg://a@h/b"
    assert hide_password("postgresql://u:pw@h:5/d") == "postgresql://u:***@h:5/d"
    assert hide_password("redis://h:6379/0") == "redis://h:6379/0"
