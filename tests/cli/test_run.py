"""`aquasim run`, `simulate` and `assimilate` on the demo scenario, real PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.services import libpq_url
from workers.checksum import stored_checksums


@pytest.fixture
def env(db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AQUASIM_DATABASE_URL", db_url)
    monkeypatch.setenv("AQUASIM_BROKER_URL", "redis://127.0.0.1:6379/0")
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
