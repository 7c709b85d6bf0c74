"""`aquasim verify` on the clean demo dataset and with planted violations, real PostgreSQL.

The dataset is the one of tests/test_verify.py (a template database with all ten demo
batches and their jobs succeeded); each test works on its own copy, so a planted
violation is committed and seen by the command's own connection.
"""

from __future__ import annotations

import re

import psycopg
import pytest
from click.testing import Result
from typer.testing import CliRunner

from pipeline.cli import app
from tests.test_verify import HARVESTED, demo_url, execute, verify_template  # noqa: F401

ALL_INVARIANTS = [f"I-{n}" for n in range(1, 21)]


@pytest.fixture
def env(demo_url: str, monkeypatch: pytest.MonkeyPatch) -> str:  # noqa: F811
    monkeypatch.setenv("AQUASIM_DATABASE_URL", demo_url)
    monkeypatch.setenv("AQUASIM_BROKER_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("COLUMNS", "160")
    return demo_url


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(app, ["verify", *args], catch_exceptions=False)


def _failing(output: str) -> set[str]:
    match = re.search(r"failing invariants: ([I0-9, -]+)", output)
    return set(match.group(1).replace(" ", "").strip(",").split(",")) if match else set()


def _stored(url: str) -> list[tuple[str, int, bool, list]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT invariant, violations, passed, examples FROM verification_result ORDER BY id"
        ).fetchall()


def test_clean_demo_passes_every_invariant(env: str) -> None:
    result = _invoke()
    assert result.exit_code == 0, result.output
    assert "all 20 invariants checked hold" in result.output
    assert "10 batches checked" in result.output
    for name in ("I-18", "I-19", "I-20"):
        row = next(line for line in result.output.splitlines() if f"│ {name} " in line)
        assert "pass" in row, row
    assert "I-18: re-simulated 3 of 10 succeeded batches: 1, 5, 10" in result.output
    assert "Realism (farm-model.md §6)" in result.output
    assert "Economic FCR, sea phase" in result.output
    assert "FAIL" not in result.output
    stored = _stored(env)
    assert [s[0] for s in stored] == ALL_INVARIANTS
    assert all(passed and violations == 0 for _, violations, passed, _ in stored)


MORTALITY_OF_BATCH_5 = """
    DELETE FROM mortality_event
     WHERE (assignment_id, event_date, cause) = (
             SELECT assignment_id, event_date, cause FROM mortality_event
              WHERE batch_id = 5 AND cause <> 'HANDLING'
              ORDER BY event_date DESC, assignment_id LIMIT 1)"""

PLANTS = {
    "I-8": ("a recorded death missing from the daily state", MORTALITY_OF_BATCH_5),
    "I-18": (
        "a stored checksum the re-simulation disagrees with",
        """UPDATE batch_job
              SET checksums = jsonb_set(checksums, '{feeding_event}', '"7:00000000deadbeef"')
            WHERE batch_id = 1""",
    ),
    "I-19": (
        "one stored row altered",
        """UPDATE environmental_reading SET value = value + 0.5
            WHERE (batch_id, sensor_id, reading_time) = (
                  SELECT batch_id, sensor_id, reading_time FROM environmental_reading
                   WHERE batch_id = 7 AND parameter_id = (
                         SELECT id FROM parameter WHERE name = 'Salinity')
                   ORDER BY reading_time, sensor_id LIMIT 1)""",
    ),
    "I-20": (
        "harvest weights half as high again",
        f"""UPDATE harvest_event
               SET biomass_kg = biomass_kg * 1.5, mean_weight_g = mean_weight_g * 1.5
             WHERE batch_id = ANY(ARRAY{HARVESTED})""",
    ),
}


@pytest.mark.parametrize(
    ("invariant", "statement"),
    [pytest.param(k, sql, id=f"{k}: {label}") for k, (label, sql) in PLANTS.items()],
)
def test_planted_violation_fails_verify(env: str, invariant: str, statement: str) -> None:
    execute(env, statement)
    result = _invoke()
    assert result.exit_code == 1, result.output
    assert invariant in _failing(result.output), result.output
    assert f"{invariant} " in result.output and "example offenders:" in result.output
    stored = {
        name: (violations, passed, examples) for name, violations, passed, examples in _stored(env)
    }
    violations, passed, examples = stored[invariant]
    assert violations > 0 and not passed and 1 <= len(examples) <= 10
    assert len(stored) == 20


def test_invariant_option_runs_only_that_one(env: str) -> None:
    result = _invoke("--invariant", "I-8")
    assert result.exit_code == 0, result.output
    assert "│ I-8 " in result.output and "│ I-9 " not in result.output
    assert "all 1 invariants checked hold" in result.output
    assert "Realism" not in result.output
    assert [s[0] for s in _stored(env)] == ["I-8"]

    execute(env, MORTALITY_OF_BATCH_5)
    result = _invoke("--invariant", "I-8")
    assert result.exit_code == 1
    assert _failing(result.output) == {"I-8"}
    result = _invoke("--invariant", "I-9", "-i", "i-14")  # the plant is not theirs
    assert result.exit_code == 0, result.output
    assert [s[0] for s in _stored(env)][-2:] == ["I-9", "I-14"]


def test_sample_option(env: str) -> None:
    result = _invoke("--invariant", "I-18", "--sample", "1")
    assert result.exit_code == 0, result.output
    assert "I-18: re-simulated 1 of 10 succeeded batches: 5" in result.output


def test_unknown_invariant_is_a_user_error(env: str) -> None:
    result = CliRunner().invoke(app, ["verify", "--invariant", "I-42"])
    assert result.exit_code == 2
    assert "unknown invariant 'I-42'" in result.output
    assert _stored(env) == []


def test_an_empty_database_is_a_user_error(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AQUASIM_DATABASE_URL", db_url)
    monkeypatch.setenv("AQUASIM_BROKER_URL", "redis://127.0.0.1:6379/0")
    result = CliRunner().invoke(app, ["verify"])
    assert result.exit_code == 2
    assert "holds no run" in result.output
