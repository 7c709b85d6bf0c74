"""The run ledger's transitions, the job without Celery (`run_job`) and the sweeper,
against a real PostgreSQL (a fresh database per test) and a real Redis."""

from __future__ import annotations

import functools
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy import Engine
from typer.testing import CliRunner

from pipeline import ledger
from pipeline.cli import app
from pipeline.database import load_run, make_engine
from pipeline.services import libpq_url
from pipeline.sweeper import sweep
from workers.batch import compute_batch, load_job_inputs
from workers.celery_app import Broker
from workers.checksum import rows_checksums, stored_checksums
from workers.signals import Heartbeat
from workers.tasks import BATCH_LOCK_CLASS, BatchBusy, BatchFailed, _write, run_job

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "scenarios" / "demo.toml"


@pytest.fixture
def engine(db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Engine]:
    """A database holding the demo scenario's plan of 4 batches, every job planned."""
    for name in [k for k in os.environ if k.startswith("AQUASIM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AQUASIM_DATABASE_URL", db_url)
    monkeypatch.setenv("AQUASIM_BROKER_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("AQUASIM_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["plan", "--scenario", str(DEMO), "--batches", "4"])
    assert result.exit_code == 0, result.output
    eng = make_engine(db_url)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def run_id(engine: Engine) -> int:
    record = load_run(engine)
    assert record is not None
    return record.id


def _job(engine: Engine, run_id: int, batch_id: int) -> dict:
    (job,) = [j for j in ledger.jobs(engine, run_id) if j["batch_id"] == batch_id]
    return job


def _claim(engine: Engine, run_id: int, batch_id: int, **kw) -> ledger.ClaimResult:
    kw = {"worker": "test", "lease_s": 60.0, "max_attempts": 3, **kw}
    return ledger.claim(engine, run_id, batch_id, **kw)


def test_transitions_are_data() -> None:
    expected = {
        ("planned", "queued"),
        ("queued", "queued"),
        ("queued", "running"),
        ("running", "running"),
        ("running", "succeeded"),
        ("running", "failed"),
        ("running", "queued"),
        ("failed", "queued"),
    }
    assert set(ledger.LEGAL) == expected  # nothing leaves succeeded


def test_enqueue_claim_succeed(engine: Engine, run_id: int) -> None:
    assert ledger.enqueue(engine, run_id) == [1, 2, 3, 4]
    assert ledger.enqueue(engine, run_id) == []  # None = planned jobs only
    assert ledger.enqueue(engine, run_id, [2]) == [2]  # queued → queued: re-send
    assert ledger.counts(engine, run_id)["queued"] == 4

    first = _claim(engine, run_id, 1).claim
    assert first is not None and first.attempts == 1
    job = _job(engine, run_id, 1)
    assert job["state"] == "running" and job["attempt_token"] == first.token
    assert job["worker"] == "test" and job["lease_left"].total_seconds() > 50

    # The lock was free, so the running job's holder is gone: a second claim takes over.
    second = _claim(engine, run_id, 1).claim
    assert second is not None and second.attempts == 2 and second.token != first.token
    assert not ledger.renew_lease(engine, first, 60)
    assert ledger.renew_lease(engine, second, 60)

    with ledger.transaction(engine) as conn, pytest.raises(ledger.StaleAttempt):
        ledger.succeed(conn, first, rows_written=1)
    with ledger.transaction(engine) as conn:
        ledger.succeed(conn, second, rows_written=7, checksums={"t": "x"}, checksum="c")
    job = _job(engine, run_id, 1)
    assert (job["state"], job["rows_written"], job["checksums"]) == ("succeeded", 7, {"t": "x"})
    assert job["finished_at"] >= job["started_at"] and job["lease_expires_at"] is None

    again = _claim(engine, run_id, 1)
    assert again.claim is None and again.state == "succeeded"  # never redone
    assert ledger.enqueue(engine, run_id, [1]) == []
    assert _claim(engine, run_id, 99) == ledger.ClaimResult(None, None)
    counts = ledger.counts(engine, run_id)
    assert (counts["succeeded"], counts["queued"], counts.open, counts.rows_written) == (1, 3, 3, 7)


def test_fail_then_requeue(engine: Engine, run_id: int) -> None:
    ledger.enqueue(engine, run_id)
    claim = _claim(engine, run_id, 2).claim
    assert claim is not None
    assert ledger.fail(engine, claim, "ValueError: bad weight")
    assert not ledger.fail(engine, claim, "again")  # failed is not running
    (failure,) = ledger.failures(engine, run_id)
    assert (failure.batch_id, failure.attempts, failure.error) == (2, 1, "ValueError: bad weight")

    assert ledger.requeue(engine, run_id, [1, 3]) == []  # not failed: untouched
    assert ledger.requeue(engine, run_id) == [2]
    job = _job(engine, run_id, 2)
    assert (job["state"], job["attempts"], job["error"], job["started_at"]) == (
        "queued", 1, None, None,
    )  # fmt: skip
    assert _claim(engine, run_id, 2).claim.attempts == 2


def test_leases_expire_into_the_queue_then_fail(engine: Engine, run_id: int) -> None:
    ledger.enqueue(engine, run_id)
    _claim(engine, run_id, 3, lease_s=0.0)
    _claim(engine, run_id, 4, lease_s=60.0)
    assert ledger.exhaust(engine, run_id, max_attempts=2) == []  # 1 attempt < 2
    assert ledger.expire(engine, run_id, max_attempts=2) == [3]  # 4's lease still runs
    assert _job(engine, run_id, 3)["state"] == "queued"

    _claim(engine, run_id, 3, lease_s=0.0)  # attempt 2 of 2, lost again
    assert ledger.expire(engine, run_id, max_attempts=2) == []
    assert ledger.exhaust(engine, run_id, max_attempts=2) == [3]
    job = _job(engine, run_id, 3)
    assert job["state"] == "failed" and "lease expired on attempt 2 of 2" in job["error"]

    # A take-over with no attempts left fails the job instead of running it again.
    result = _claim(engine, run_id, 4, max_attempts=1)
    assert result.claim is None and result.exhausted
    assert "lost on attempt 1 of 1" in _job(engine, run_id, 4)["error"]


def test_requeue_stuck_takes_only_expired_running_jobs(engine: Engine, run_id: int) -> None:
    ledger.enqueue(engine, run_id)
    _claim(engine, run_id, 1, lease_s=0.0)
    _claim(engine, run_id, 2, lease_s=60.0)
    assert ledger.requeue_stuck(engine, run_id, [1, 2, 3]) == [1]
    assert _job(engine, run_id, 1)["attempt_token"] is None


def test_heartbeat_renews_the_lease_until_the_claim_is_lost(engine: Engine, run_id: int) -> None:
    ledger.enqueue(engine, run_id)
    claim = _claim(engine, run_id, 1, lease_s=1.0).claim
    renew = functools.partial(ledger.renew_lease, engine, claim, 60.0)
    with Heartbeat(renew, 0.05, "batch 1") as heartbeat:
        wait = time.monotonic() + 10
        while heartbeat.beats < 2 and time.monotonic() < wait:
            time.sleep(0.01)
        assert _job(engine, run_id, 1)["lease_left"].total_seconds() > 50
        _claim(engine, run_id, 1)  # taken over
        while not heartbeat.lost and time.monotonic() < wait:
            time.sleep(0.01)
    assert heartbeat.lost and heartbeat.beats >= 2


# ---- the job itself, without Celery ------------------------------------------------------


def _run_job(engine: Engine, run_id: int, batch_id: int) -> object:
    return run_job(engine, run_id, batch_id, worker="test", lease_s=60, max_attempts=3)


def test_run_job_writes_the_batch_and_records_it(engine: Engine, run_id: int) -> None:
    ledger.enqueue(engine, run_id)
    result = _run_job(engine, run_id, 1)
    assert (result.outcome, result.attempt) == ("succeeded", 1)
    job = _job(engine, run_id, 1)
    assert job["state"] == "succeeded" and job["rows_written"] == result.rows
    inputs = load_job_inputs(engine, 1)
    rows, _ = compute_batch(inputs.batch, inputs.scenario, inputs.farm, inputs.run_seed)
    assert job["checksums"] == rows_checksums(rows)  # what a re-simulation gives (I-18)
    with psycopg.connect(libpq_url(engine.url.render_as_string(False))) as conn:
        assert stored_checksums(conn, 1) == job["checksums"]  # what is stored
    assert sum(job["rows_per_table"].values()) == job["rows_written"]
    assert set(job["timings"]) >= {"engine", "assimilation", "write"}

    again = _run_job(engine, run_id, 1)  # a late duplicate delivery
    assert (again.outcome, again.detail) == ("skipped", "job is succeeded")
    assert _job(engine, run_id, 1)["attempts"] == 1


def test_a_delivery_finding_the_batch_locked_backs_off(engine: Engine, run_id: int) -> None:
    ledger.enqueue(engine, run_id)
    with psycopg.connect(libpq_url(engine.url.render_as_string(False))) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, 2)", (BATCH_LOCK_CLASS,))
        with pytest.raises(BatchBusy):
            _run_job(engine, run_id, 2)
    job = _job(engine, run_id, 2)
    assert (job["state"], job["attempts"], job["error"]) == ("queued", 0, None)


def test_a_claim_taken_over_cannot_commit(engine: Engine, run_id: int) -> None:
    ledger.enqueue(engine, run_id)
    old = _claim(engine, run_id, 3).claim
    new = _claim(engine, run_id, 3).claim  # e.g. the sweeper judged the first one lost
    url = libpq_url(engine.url.render_as_string(False))
    with pytest.raises(ledger.StaleAttempt):
        _write(engine, url, old, 200_000)
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM assignment WHERE batch_id = 3").fetchone()[0] == 0
    job = _job(engine, run_id, 3)
    assert (job["state"], job["attempt_token"]) == ("running", new.token)


def test_a_job_that_raises_is_failed_with_its_error(
    engine: Engine, run_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger.enqueue(engine, run_id)
    monkeypatch.setenv("AQUASIM_FAIL_BATCHES", "4")
    with pytest.raises(BatchFailed):
        _run_job(engine, run_id, 4)
    job = _job(engine, run_id, 4)
    assert job["state"] == "failed"
    assert job["error"] == "workers.tasks.InjectedFailure: batch 4 failed on purpose " \
        "(AQUASIM_FAIL_BATCHES)"  # fmt: skip


# ---- the sweeper, with a real broker -----------------------------------------------------


@pytest.fixture
def broker(redis_url: str) -> Iterator[Broker]:
    queue = f"aq-test-{uuid.uuid4().hex[:8]}"
    yield Broker(redis_url, queue)
    with redis.Redis.from_url(redis_url) as client:
        client.delete(queue)


def test_sweeper_resends_what_the_broker_lost(engine: Engine, run_id: int, broker: Broker) -> None:
    broker.publish(run_id, ledger.enqueue(engine, run_id))
    broker.publish(run_id + 1, [1])  # another run's message is not this run's
    assert broker.held(run_id) == {1, 2, 3, 4}
    assert not sweep(engine, broker, run_id, 3).changed  # within the grace: not even checked

    with redis.Redis.from_url(broker.url) as client:
        client.delete(broker.queue)  # e.g. Redis restarted
    assert broker.held(run_id) == set()
    report = sweep(engine, broker, run_id, 3, all_queued=True)
    assert report.lost == [1, 2, 3, 4] and broker.held(run_id) == {1, 2, 3, 4}

    _claim(engine, run_id, 2, lease_s=0.0)  # its worker died
    report = sweep(engine, broker, run_id, 3)
    assert (report.expired, report.exhausted, report.lost) == ([2], [], [])
    with redis.Redis.from_url(broker.url) as client:
        assert client.llen(broker.queue) == 5  # 4 re-sent, then 2 again


# ---- beat's tasks, called in-process ---------------------------------------------------------


@pytest.fixture
def worker_process(
    engine: Engine, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """This process as a worker would be: settings from the environment, the test's broker."""
    from workers import tasks
    from workers.celery_app import app

    monkeypatch.setenv("AQUASIM_QUEUE", broker.queue)
    monkeypatch.setitem(app.conf, "broker_url", broker.url)
    tasks._settings.cache_clear()
    try:
        yield
    finally:
        tasks._settings.cache_clear()
        for eng in tasks._engines.values():
            eng.dispose()
        tasks._engines.clear()


def test_beat_schedules_the_sweeper_and_the_verification() -> None:
    from workers.celery_app import SWEEP_INTERVAL_S, app

    schedule = app.conf.beat_schedule
    assert schedule["aquasim.sweep"] == {
        "task": "workers.tasks.sweep",
        "schedule": SWEEP_INTERVAL_S,
    }
    assert schedule["aquasim.verify"]["task"] == "workers.tasks.verify_run"
    conf = app.conf
    assert (conf.task_acks_late, conf.task_reject_on_worker_lost, conf.worker_prefetch_multiplier) \
        == (True, True, 1)  # fmt: skip
    assert conf.broker_transport_options["visibility_timeout"] >= 3600


def test_beat_tasks_sweep_and_verify(
    engine: Engine, run_id: int, broker: Broker, worker_process: None
) -> None:
    from workers import tasks

    ledger.enqueue(engine, run_id, grace_s=0)  # queued in the ledger, never sent
    report = tasks.sweep()
    assert report["lost"] == [1, 2, 3, 4] and broker.held(run_id) == {1, 2, 3, 4}
    assert _run_job(engine, run_id, 1).outcome == "succeeded"

    pytest.importorskip("pipeline.verify")
    tasks.verify_run()
    with psycopg.connect(libpq_url(engine.url.render_as_string(False))) as conn:
        (stored,) = conn.execute("SELECT count(*) FROM verification_result").fetchone()
    assert stored > 0
