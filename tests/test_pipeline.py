"""The Celery pipeline end to end: the machine's PostgreSQL and Redis, `aquasim run` as a
process, and workers started as separate `celery -A workers.celery_app worker` processes.

Each test gets its own database on 127.0.0.1:5432 and its own queue on the Redis at
127.0.0.1:6379, so tests (and other users of that Redis) never take each other's
jobs. The helpers here are shared with tests/test_faults.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "scenarios" / "demo.toml"
AQUASIM = str(Path(sys.executable).with_name("aquasim"))
SYSTEM_SERVER = "postgresql://postgres@127.0.0.1:5432"
SYSTEM_BROKER = "redis://127.0.0.1:6379/0"
RUN_TIMEOUT_S = 240


# ---- helpers (shared with test_faults.py) --------------------------------------------------


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A new database on the machine's PostgreSQL (its libpq URL); dropped afterwards."""
    name = f"aq_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{SYSTEM_SERVER}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{SYSTEM_SERVER}/{name}"
    finally:
        with psycopg.connect(f"{SYSTEM_SERVER}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_queues: list[tuple[str, str]] = []  # (broker URL, queue) made by pipeline_env


def pipeline_env(
    database_url: str, data_dir: Path, broker_url: str = SYSTEM_BROKER, **extra: str
) -> dict[str, str]:
    """A process environment: these servers, a queue of its own, no other AQUASIM_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AQUASIM_")}
    queue = f"aq-test-{uuid.uuid4().hex[:10]}"
    _queues.append((broker_url, queue))
    env.update(
        AQUASIM_DATABASE_URL=database_url,
        AQUASIM_BROKER_URL=broker_url,
        AQUASIM_QUEUE=queue,
        AQUASIM_DATA_DIR=str(data_dir),
        **extra,
    )
    return env


@pytest.fixture(scope="module", autouse=True)
def _drop_test_queues() -> Iterator[None]:
    """Leave nothing behind in the shared Redis: the module's queues are deleted."""
    yield
    while _queues:
        url, queue = _queues.pop()
        with contextlib.suppress(redis.RedisError), redis.Redis.from_url(url) as client:
            client.delete(queue)


@dataclass
class Process:
    """A background `aquasim …` or `celery …` process whose output goes to a file."""

    popen: subprocess.Popen
    log: Path

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"{self.popen.args} timed out:\n{self.output[-3000:]}") from None

    def stop(self) -> None:
        """SIGTERM (a worker hands its unacknowledged messages back, `aquasim run` stops
        its workers), then SIGKILL the process group (pool children included)."""
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)  # still ours: its leader is alive
            self.popen.wait()


def spawn(argv: list[str], env: dict[str, str], log: Path) -> Process:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        popen = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return Process(popen, log)


def aquasim(*args: str, env: dict[str, str], log: Path) -> Process:
    return spawn([AQUASIM, *args], env, log)


def aquasim_now(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AQUASIM, *args], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip


def start_workers(count: int, env: dict[str, str], log_dir: Path, name: str = "w") -> list[Process]:
    """`celery -A workers.celery_app worker` processes, as an operator would start them."""
    return [
        spawn(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.celery_app",
                "worker",
                "--concurrency",
                "1",
                "--pool",
                "prefork",
                "--loglevel",
                "INFO",
                "-n",
                f"{name}{i}-{uuid.uuid4().hex[:6]}@%h",
                "--without-mingle",
                "--without-gossip",
            ],
            env,
            log_dir / f"{name}{i}.log",
        )  # fmt: skip
        for i in range(1, count + 1)
    ]


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(psycopg.Error):
            value = predicate()
            if value:
                return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def jobs(database_url: str) -> dict[int, dict[str, Any]]:
    """The ledger: batch_id → its batch_job row."""
    with psycopg.connect(database_url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as c:
        rows = c.execute("SELECT * FROM batch_job ORDER BY batch_id").fetchall()
    return {r["batch_id"]: r for r in rows}


def states(database_url: str) -> dict[int, str]:
    return {b: j["state"] for b, j in jobs(database_url).items()}


# ---- the demo run with two external workers --------------------------------------------------


@dataclass
class DemoRun:
    database_url: str
    env: dict[str, str]
    returncode: int
    output: str
    second: subprocess.CompletedProcess[str]
    jobs: dict[int, dict[str, Any]]


@pytest.fixture(scope="module")
def two_worker_run(
    system_services: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DemoRun]:
    """`aquasim run --workers 0` on the demo scenario, two workers started separately
    once it has enqueued (and, meanwhile, a second `aquasim run` that must refuse)."""
    tmp = tmp_path_factory.mktemp("two-workers")
    with fresh_database() as url:
        env = pipeline_env(url, tmp / "data")
        coordinator = aquasim("run", "--scenario", str(DEMO), "--workers", "0", env=env,
                              log=tmp / "run.log")  # fmt: skip
        workers: list[Process] = []
        try:
            wait_for("the demo run to enqueue", lambda: set(states(url).values()) == {"queued"})
            second = aquasim_now("run", "--scenario", str(DEMO), env=env)
            # Batch 1 pauses before its commit, so the second worker surely takes part.
            worker_env = {**env, "AQUASIM_HOLD_BATCHES": "1", "AQUASIM_HOLD_S": "2"}
            workers = start_workers(2, worker_env, tmp)
            returncode = coordinator.wait()
        finally:
            coordinator.stop()
            for worker in workers:
                worker.stop()
        yield DemoRun(url, env, returncode, coordinator.output, second, jobs(url))


def test_demo_run_with_two_external_workers(two_worker_run: DemoRun) -> None:
    run = two_worker_run
    assert run.returncode == 0, run.output
    assert len(run.jobs) == 10
    assert {j["state"] for j in run.jobs.values()} == {"succeeded"}, run.output
    assert {j["attempts"] for j in run.jobs.values()} == {1}
    assert all(j["checksums"] and j["rows_written"] for j in run.jobs.values())
    assert len({j["worker"].split("-")[0] for j in run.jobs.values()}) == 2  # both worked
    assert "10 generated now, 0 failed" in run.output
    assert "all 20 invariants checked hold" in run.output or "verification skipped" in run.output

    verify = aquasim_now("verify", env=run.env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    status = aquasim_now("status", env=run.env)
    assert status.returncode == 0 and "succeeded" in status.stdout


def test_a_second_run_on_the_same_database_refuses(two_worker_run: DemoRun) -> None:
    second = two_worker_run.second
    assert second.returncode == 2
    assert second.stderr.startswith("aquasim: error: another `aquasim run` is already running")
    assert len(second.stderr.strip().splitlines()) == 1
    assert "Traceback" not in second.stdout + second.stderr


def test_one_worker_and_two_workers_write_identical_batches(
    two_worker_run: DemoRun, tmp_path: Path
) -> None:
    with fresh_database() as url:
        env = pipeline_env(url, tmp_path / "data")
        result = aquasim_now("run", "--scenario", str(DEMO), "--workers", "1", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        one = jobs(url)
    assert {j["worker"].split("@")[0].rsplit(".", 1)[0] for j in one.values()} == {"aquasim-1"}
    two = two_worker_run.jobs
    assert one.keys() == two.keys()
    for batch_id in one:  # I-18: per-table checksums independent of who ran the batch
        assert one[batch_id]["checksums"] == two[batch_id]["checksums"], batch_id
        assert one[batch_id]["rows_per_table"] == two[batch_id]["rows_per_table"], batch_id
        assert one[batch_id]["checksum"] == two[batch_id]["checksum"], batch_id


def test_beat_schedules_verification_for_workers(two_worker_run: DemoRun, tmp_path: Path) -> None:
    """`aquasim beat` and `aquasim worker`: the scheduled verification runs and stores rows."""
    url = two_worker_run.database_url

    def stored() -> int:
        with psycopg.connect(url) as conn:
            return conn.execute("SELECT count(*) FROM verification_result").fetchone()[0]

    before = stored()
    env = {**two_worker_run.env, "AQUASIM_VERIFY_INTERVAL_S": "1",
           "AQUASIM_DATA_DIR": str(tmp_path / "data")}  # fmt: skip
    worker = aquasim("worker", "-n", f"beat-{uuid.uuid4().hex[:6]}@%h", "--without-mingle",
                     "--without-gossip", env=env, log=tmp_path / "worker.log")  # fmt: skip
    beat = aquasim("beat", env=env, log=tmp_path / "beat.log")
    try:
        wait_for("a scheduled verification", lambda: stored() > before, timeout=90)
    finally:
        beat.stop()
        worker.stop()
    assert "Sending due task aquasim.verify (workers.tasks.verify_run)" in beat.output
    assert "verify_run() started" in worker.output
