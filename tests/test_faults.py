"""The faults the pipeline must survive (product.md), on a tiny run: the demo scenario
cut to 4 batches. Real PostgreSQL, real Redis, real `celery worker` processes.

Two documented test hooks of workers/tasks.py make the faults land on time:
AQUASIM_FAIL_BATCHES (those jobs raise) and AQUASIM_HOLD_BATCHES / AQUASIM_HOLD_S
(those jobs pause with every row written, just before their commit).
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import redis

from pipeline import ledger
from pipeline.database import make_engine
from pipeline.services import EmbeddedRedis
from tests.test_pipeline import (  # noqa: F401 - _drop_test_queues: an autouse fixture
    DEMO,
    _drop_test_queues,
    aquasim,
    aquasim_now,
    fresh_database,
    jobs,
    pipeline_env,
    start_workers,
    states,
    wait_for,
)
from workers.batch import compute_batch, load_job_inputs
from workers.celery_app import Broker
from workers.checksum import rows_checksums, stored_checksums

TINY = ("--scenario", str(DEMO), "--batches", "4")
pytestmark = pytest.mark.usefixtures("system_services")


def assert_clean(database_url: str) -> None:
    """Every batch's stored rows and ledger checksums equal a clean in-process simulation."""
    engine = make_engine(database_url)
    try:
        with psycopg.connect(database_url) as conn:
            for batch_id, job in jobs(database_url).items():
                inputs = load_job_inputs(engine, batch_id)
                rows, _ = compute_batch(inputs.batch, inputs.scenario, inputs.farm, inputs.run_seed)
                clean = rows_checksums(rows)
                assert job["checksums"] == clean, batch_id
                assert stored_checksums(conn, batch_id) == clean, batch_id
    finally:
        engine.dispose()


def test_a_worker_killed_mid_batch(tmp_path: Path) -> None:
    """SIGKILL the pool process running a batch: the job is redelivered and taken over,
    and the data equals a clean run's."""
    with fresh_database() as url:
        env = pipeline_env(url, tmp_path / "data", AQUASIM_HOLD_BATCHES="2", AQUASIM_HOLD_S="2")
        run = aquasim("run", *TINY, "--workers", "2", env=env, log=tmp_path / "run.log")
        try:
            job = wait_for(
                "batch 2 to run",
                lambda: (j := jobs(url).get(2)) and j["state"] == "running" and j,
            )
            pid = int(re.search(r"\[(\d+)\]$", job["worker"]).group(1))
            time.sleep(0.5)  # into the job: rows being written or written, not committed
            os.kill(pid, signal.SIGKILL)
            assert run.wait() == 0, run.output
        finally:
            run.stop()
        after = jobs(url)
        assert {j["state"] for j in after.values()} == {"succeeded"}
        assert after[2]["attempts"] == 2 and after[2]["worker"] != job["worker"]
        assert_clean(url)


def test_a_dropped_database_connection_is_retried(tmp_path: Path) -> None:
    """The writer's connection is terminated mid-job: a transient error, retried with
    backoff; the retry takes the job over and the run completes cleanly."""
    with fresh_database() as url:
        env = pipeline_env(url, tmp_path / "data", AQUASIM_HOLD_BATCHES="2", AQUASIM_HOLD_S="2")
        run = aquasim("run", *TINY, "--workers", "2", env=env, log=tmp_path / "run.log")
        try:
            with psycopg.connect(url, autocommit=True) as admin:
                terminate = (
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() "
                    "AND application_name = 'aquasim batch 2 writer'"
                )
                wait_for("batch 2's writer", lambda: admin.execute(terminate).fetchall())
            assert run.wait() == 0, run.output
        finally:
            run.stop()
        after = jobs(url)
        assert {j["state"] for j in after.values()} == {"succeeded"}
        assert after[2]["attempts"] == 2
        logs = "".join(p.read_text() for p in (tmp_path / "data" / "logs").glob("*.log"))
        assert "will be retried: Retry in" in logs  # AdminShutdown or OperationalError
        assert_clean(url)


def test_two_deliveries_of_one_batch_write_once(tmp_path: Path) -> None:
    with fresh_database() as url:
        env = pipeline_env(url, tmp_path / "data", AQUASIM_HOLD_BATCHES="1", AQUASIM_HOLD_S="2")
        assert aquasim_now("plan", *TINY, env=env).returncode == 0
        engine = make_engine(url)
        workers = [  # one started the project's way, one the Celery way
            aquasim("worker", "-n", f"aw-{uuid.uuid4().hex[:6]}@%h", "--without-mingle",
                    "--without-gossip", env=env, log=tmp_path / "aw.log"),
            *start_workers(1, env, tmp_path),
        ]  # fmt: skip
        try:
            broker = Broker(env["AQUASIM_BROKER_URL"], env["AQUASIM_QUEUE"])
            assert ledger.enqueue(engine, 1, [1]) == [1]
            broker.publish(1, [1, 1])  # the same job twice, at once, to two idle workers
            logs = lambda: "".join(w.output for w in workers)  # noqa: E731
            wait_for("both deliveries", lambda: logs().count("simulate_batch(1, 1) started") >= 2)
            assert broker.held(1) == {1}  # delivered, not acknowledged: still the broker's
            wait_for("the job to finish", lambda: states(url)[1] == "succeeded", timeout=60)
            wait_for("the backed-off delivery to give up", lambda: "job is succeeded" in logs())
            assert "being run by another delivery" in logs()
        finally:
            for worker in workers:
                worker.stop()
            engine.dispose()
        job = jobs(url)[1]
        assert job["attempts"] == 1  # one claim, so one write
        with psycopg.connect(url) as conn:
            for table, n in job["rows_per_table"].items():
                (stored,) = conn.execute(
                    f"SELECT count(*) FROM {table} WHERE batch_id = 1"
                ).fetchone()
                assert stored == n, table
        assert states(url) == {1: "succeeded", 2: "planned", 3: "planned", 4: "planned"}


def test_a_failing_job_then_requeue(tmp_path: Path) -> None:
    with fresh_database() as url:
        env = pipeline_env(url, tmp_path / "data")
        failing = aquasim_now("run", *TINY, "--workers", "2",
                              env={**env, "AQUASIM_FAIL_BATCHES": "3"})  # fmt: skip
        assert failing.returncode == 1, failing.stdout + failing.stderr
        assert "1 failed" in failing.stdout and "batch 3 failed" in failing.stdout
        assert states(url) == {1: "succeeded", 2: "succeeded", 3: "failed", 4: "succeeded"}
        error = jobs(url)[3]["error"]
        assert error.startswith("workers.tasks.InjectedFailure: batch 3 failed on purpose")

        status = aquasim_now("status", env=env)
        assert status.returncode == 0 and "InjectedFailure" in status.stdout

        requeued = aquasim_now("requeue", env=env)
        assert requeued.returncode == 0, requeued.stdout + requeued.stderr
        assert "Re-queued 1 failed job(s): 3" in requeued.stdout
        assert states(url)[3] == "queued"

        resumed = aquasim_now("run", *TINY, "--workers", "1", env=env)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "1 generated now, 0 failed" in resumed.stdout
        done = jobs(url)
        assert {j["state"] for j in done.values()} == {"succeeded"}
        assert done[3]["attempts"] == 2 and done[3]["error"] is None
        assert_clean(url)


def test_redis_restarted_mid_run(tmp_path: Path) -> None:
    """The embedded Redis keeps nothing: restarting it loses the queue; the sweeper of
    `aquasim run` sends the lost jobs again and the run completes."""
    broker = EmbeddedRedis(tmp_path / "redis-home")
    broker.start()
    try:
        with fresh_database() as url:
            env = pipeline_env(url, tmp_path / "data", broker_url=broker.url,
                               AQUASIM_HOLD_BATCHES="1,2", AQUASIM_HOLD_S="3")  # fmt: skip
            run = aquasim("run", *TINY, "--workers", "2", env=env, log=tmp_path / "run.log")
            try:
                queue = env["AQUASIM_QUEUE"]
                wait_for("both workers busy, two jobs waiting in Redis",
                         lambda: list(states(url).values()).count("running") == 2
                         and _llen(broker.url, queue) == 2)  # fmt: skip
                port = broker.port
                broker.stop()
                time.sleep(1.0)
                broker.start()
                assert broker.port == port and _llen(broker.url, queue) == 0  # queue lost
                assert run.wait() == 0, run.output
            finally:
                run.stop()
            assert {j["state"] for j in jobs(url).values()} == {"succeeded"}
            assert "lost by the broker, re-sent: 3, 4" in run.output
            assert_clean(url)
    finally:
        broker.stop()


def _llen(url: str, queue: str) -> int:
    with redis.Redis.from_url(url) as client:
        return int(client.llen(queue))
