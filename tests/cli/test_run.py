"""`aquasim run` (with its local `celery worker` processes), `simulate` and `assimilate` on
the demo scenario: real PostgreSQL, real Redis (a queue of each test's own)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from pipeline import ledger
from pipeline.cli import app
from pipeline.database import make_engine
from pipeline.services import EmbeddedServices, libpq_url
from workers.checksum import stored_checksums


@pytest.fixture
def env(db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """The test's database, the machine's Redis with a queue of its own, local workers."""
    for name in [k for k in os.environ if k.startswith("AQUASIM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AQUASIM_DATABASE_URL", db_url)
    monkeypatch.setenv("AQUASIM_BROKER_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("AQUASIM_QUEUE", f"aq-test-{uuid.uuid4().hex[:10]}")
    monkeypatch.setenv("AQUASIM_DATA_DIR", str(tmp_path / "data"))
    return db_url


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def _jobs(url: str) -> dict[int, tuple[str, str]]:
    with psycopg.connect(libpq_url(url)) as conn:
        rows = conn.execute("SELECT batch_id, state, checksum FROM batch_job").fetchall()
    return {b: (s, c) for b, s, c in rows}


def test_demo_run_then_rerun_batch_replaces_it_exactly(env: str) -> None:
    result = _invoke("run", "--scenario", "scenarios/demo.toml")
    assert result.exit_code == 0, result.output
    jobs = _jobs(env)
    assert len(jobs) == 10 and {s for s, _ in jobs.values()} == {"succeeded"}

    with psycopg.connect(libpq_url(env)) as conn:
        before = {b: stored_checksums(conn, b) for b in (1, 2)}
        total_before = conn.execute("SELECT count(*) FROM environmental_reading").fetchone()

    result = _invoke("simulate", "--batch", "1")  # a re-run of a finished batch
    assert result.exit_code == 0, result.output
    with psycopg.connect(libpq_url(env)) as conn:
        after = {b: stored_checksums(conn, b) for b in (1, 2)}
        total_after = conn.execute("SELECT count(*) FROM environmental_reading").fetchone()
    assert after == before  # identical rows, and batch 2 untouched (I-19)
    assert total_after == total_before

    for batch in (1, 5, 10):  # harvested, mid-cycle, young
        result = _invoke("assimilate", "--batch", str(batch))
        assert result.exit_code == 0, result.output
        assert "0 differ" in result.output

    result = _invoke("run", "--scenario", "scenarios/demo.toml")  # resume: nothing to do
    assert result.exit_code == 0
    assert "0 generated now" in result.output
    assert _jobs(env) == jobs


def test_assimilate_reports_a_tampered_daily_state(env: str) -> None:
    assert _invoke("run", "--scenario", "scenarios/demo.toml", "--batches", "3").exit_code == 0
    with psycopg.connect(libpq_url(env)) as conn:
        conn.execute(
            "UPDATE daily_assignment_state SET mean_weight_g = mean_weight_g * 1.001 "
            "WHERE batch_id = 2 AND state_date = (SELECT min(state_date) + 30 "
            "FROM daily_assignment_state WHERE batch_id = 2)"
        )
    result = _invoke("assimilate", "--batch", "2")
    assert result.exit_code == 1
    assert "0 differ" not in result.output


def _ledger(url: str) -> dict[int, tuple[str, int]]:
    with psycopg.connect(libpq_url(url)) as conn:
        rows = conn.execute("SELECT batch_id, state, attempts FROM batch_job").fetchall()
    return {b: (s, a) for b, s, a in rows}


def test_run_resumes_unfinished_jobs_and_reset_starts_over(env: str) -> None:
    tiny = ("--scenario", "scenarios/demo.toml", "--batches", "3")
    assert _invoke("plan", *tiny).exit_code == 0
    # A coordinator that was interrupted: job 2 failed, job 3 queued but its message lost.
    engine = make_engine(env)
    try:
        assert ledger.enqueue(engine, 1, [2, 3]) == [2, 3]
        claim = ledger.claim(engine, 1, 2, worker="gone", lease_s=60, max_attempts=3).claim
        ledger.fail(engine, claim, "RuntimeError: boom")
    finally:
        engine.dispose()

    result = _invoke("run", *tiny, "--workers", "1")
    assert result.exit_code == 1, result.output  # a failed job stays failed until requeued
    assert _ledger(env) == {1: ("succeeded", 1), 2: ("failed", 1), 3: ("succeeded", 1)}
    assert "2 generated now, 1 failed" in result.output
    assert "batch 2 failed (attempt 1): RuntimeError: boom" in result.output

    result = _invoke("run", *tiny, "--seed", "99")  # another plan: refused, nothing run
    assert result.exit_code == 2
    assert "seed 7, not 99" in result.output
    assert _ledger(env)[2] == ("failed", 1)

    result = _invoke("run", *tiny, "--workers", "1", "--reset")
    assert result.exit_code == 0, result.output
    assert _ledger(env) == {b: ("succeeded", 1) for b in (1, 2, 3)}


def test_embedded_run_without_urls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AQUASIM_DATABASE_URL / AQUASIM_BROKER_URL: embedded PostgreSQL and Redis under
    the data directory, started for the run and stopped after it; workers get their URLs."""
    for name in [k for k in os.environ if k.startswith("AQUASIM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AQUASIM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)  # no stray .env
    demo = str(Path(__file__).resolve().parents[2] / "scenarios" / "demo.toml")
    result = _invoke("run", "--scenario", demo, "--batches", "2", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "2 generated now, 0 failed" in result.output
    assert not EmbeddedServices(tmp_path / "data").postgres.running  # stopped again
    status = _invoke("status")
    assert status.exit_code == 0
    assert "2 succeeded jobs" in status.output
