"""`aquasim status` (and `aquasim requeue`, which acts on what status shows): the ledger
of a planned tiny run whose jobs are moved by hand, real PostgreSQL and Redis."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner, Result

from pipeline import ledger
from pipeline.cli import app
from pipeline.database import make_engine
from workers.celery_app import Broker

DEMO = Path(__file__).resolve().parents[2] / "scenarios" / "demo.toml"


@pytest.fixture
def env(db_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Broker:
    for name in [k for k in os.environ if k.startswith("AQUASIM_")]:
        monkeypatch.delenv(name)
    queue = f"aq-test-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("AQUASIM_DATABASE_URL", db_url)
    monkeypatch.setenv("AQUASIM_BROKER_URL", redis_url)
    monkeypatch.setenv("AQUASIM_QUEUE", queue)
    monkeypatch.setenv("AQUASIM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    return Broker(redis_url, queue)


@pytest.fixture
def engine(env: Broker, db_url: str) -> Iterator[Engine]:
    """Four planned jobs: 1 succeeded, 2 failed, 3 running (lease expired), 4 queued."""
    assert aquasim("plan", "--scenario", str(DEMO), "--batches", "4").exit_code == 0
    eng = make_engine(db_url)
    ledger.enqueue(eng, 1)

    def claim(batch_id: int, lease_s: float = 60.0) -> ledger.Claim:
        result = ledger.claim(eng, 1, batch_id, worker=f"w{batch_id}@host[1{batch_id}]",
                              lease_s=lease_s, max_attempts=3)  # fmt: skip
        assert result.claim is not None
        return result.claim

    with ledger.transaction(eng) as conn:
        ledger.succeed(conn, claim(1), rows_written=12_345)
    ledger.fail(eng, claim(2), "ValueError: a bad weight in batch 2")
    claim(3, lease_s=0.0)
    try:
        yield eng
    finally:
        eng.dispose()


def aquasim(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_status_shows_states_rows_running_jobs_and_failures(engine: Engine) -> None:
    result = aquasim("status")
    assert result.exit_code == 0, result.output
    out = result.output
    for state, n in (("planned", 0), ("queued", 1), ("running", 1), ("succeeded", 1),
                     ("failed", 1), ("total", 4)):  # fmt: skip
        assert f"│ {state:<9} │    {n} │" in out, state
    assert "12,345 rows written by 1 succeeded jobs" in out
    assert "w3@host[13]" in out and "(expired)" in out
    assert "ValueError: a bad weight in batch 2" in out
    assert "aquasim requeue" in out


def test_status_of_an_empty_database(env: Broker) -> None:
    result = aquasim("status")
    assert result.exit_code == 0
    assert "No run in this database" in result.output


def test_requeue_failed_jobs_by_default(engine: Engine, env: Broker) -> None:
    result = aquasim("requeue")
    assert result.exit_code == 0, result.output
    assert "Re-queued 1 failed job(s): 2; sent 1" in result.output
    assert env.held(1) == {2}
    job = ledger.jobs(engine, 1, ["queued"])
    assert [(j["batch_id"], j["error"], j["attempts"]) for j in job] == [(2, None, 1), (4, None, 0)]
    assert "No failed jobs to re-queue." in aquasim("requeue").output


def test_requeue_stuck_and_named_batches(engine: Engine, env: Broker) -> None:
    result = aquasim("requeue", "--stuck", "1", "3")
    assert result.exit_code == 1  # batch 1 could not be re-queued
    assert "Re-queued 1 stuck job(s): 3" in result.output
    assert "batch 1: not re-queued (it is succeeded, not running with an expired lease)" in (
        result.output
    )
    assert env.held(1) == {3}
    result = aquasim("requeue", "2", "9")
    assert result.exit_code == 1
    assert "Re-queued 1 failed job(s): 2" in result.output
    assert "batch 9: not re-queued (no such batch)" in result.output
    assert env.held(1) == {2, 3}
