"""`aquasim plan` against a real PostgreSQL (a fresh database per test)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg.errors
import pytest
from sqlalchemy import Engine, insert, text
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner, Result

from pipeline.cli import app
from pipeline.database import load_batch_plan, load_run, make_engine
from pipeline.farm import build_farm
from pipeline.planner import Plan, plan
from pipeline.scenario import Scenario, load_scenario
from schema import reading_partition_name
from schema.models import Assignment, ContainerReservation

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "scenarios" / "default.toml"
DEMO = ROOT / "scenarios" / "demo.toml"
RESERVATION_KEYS = ("batch_id", "container_id", "stage_id", "start_date", "end_date")
BROKER_URL = "redis://127.0.0.1:6379/0"  # set, so no embedded Redis starts (plan needs none)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """A clean AQUASIM_* environment with its own data directory."""
    for name in [k for k in os.environ if k.startswith("AQUASIM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AQUASIM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("AQUASIM_BROKER_URL", BROKER_URL)
    monkeypatch.chdir(tmp_path)  # no stray .env is read
    return monkeypatch


@pytest.fixture
def on_db(env: pytest.MonkeyPatch, db_url: str) -> str:
    env.setenv("AQUASIM_DATABASE_URL", db_url)
    return db_url


@pytest.fixture
def engine(on_db: str) -> Iterator[Engine]:
    eng = make_engine(on_db)
    try:
        yield eng
    finally:
        eng.dispose()


def aquasim(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def error_line(result: Result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("aquasim: error: ")
    return lines[0]


def expected(path: Path, **kwargs: int) -> tuple[Scenario, Plan]:
    scenario = load_scenario(path)
    return scenario, plan(scenario, build_farm(scenario), **kwargs)


def count(engine: Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(text(sql)) or 0)


# ---- --dry-run -------------------------------------------------------------------------


def test_dry_run_prints_batches_utilisation_and_bottleneck(env: pytest.MonkeyPatch) -> None:
    env.setenv("AQUASIM_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")  # never used
    result = aquasim("plan", "--dry-run", "--scenario", str(DEFAULT))
    assert result.exit_code == 0, result.output
    batches = int(re.search(r"Plan: (\d+) batches", result.stdout).group(1))
    assert batches >= 144
    assert re.search(r"Bottleneck: .+, \d+\.\d% used \(target 80%\)", result.stdout)
    assert "Steady-state window: 2023-06-20 → 2026-01-01" in result.stdout
    assert re.search(r"planned in \d+\.\d\d s", result.stdout)
    for geography in ("Faroe Islands", "Scotland"):
        assert geography in result.stdout
    assert result.stderr == ""


def test_dry_run_of_an_infeasible_count_names_the_largest(env: pytest.MonkeyPatch) -> None:
    result = aquasim("plan", "--dry-run", "--scenario", str(DEMO), "--batches", "500")
    line = error_line(result)
    assert re.search(r"the largest feasible count is \d+$", line)


def test_seed_option_changes_the_plan(env: pytest.MonkeyPatch) -> None:
    one = aquasim("plan", "--dry-run", "--scenario", str(DEMO), "--seed", "1")
    assert "seed 1," in one.stdout
    env.setenv("AQUASIM_SEED", "3")
    three = aquasim("plan", "--dry-run", "--scenario", str(DEMO))
    assert "seed 3," in three.stdout


def test_bad_setting_is_one_line_naming_the_variable(env: pytest.MonkeyPatch) -> None:
    env.setenv("AQUASIM_SEED", "-1")
    line = error_line(aquasim("plan", "--dry-run", "--scenario", str(DEMO)))
    assert "AQUASIM_SEED" in line


def test_unreachable_database_is_one_line(env: pytest.MonkeyPatch) -> None:
    env.setenv("AQUASIM_DATABASE_URL", "postgresql://someone:secret@127.0.0.1:1/none")
    line = error_line(aquasim("plan", "--scenario", str(DEMO)))
    assert "PostgreSQL is unreachable" in line
    assert "secret" not in line


# ---- persisting ------------------------------------------------------------------------


def test_plan_persists_the_plan_once(engine: Engine) -> None:
    scenario, planned = expected(DEFAULT)
    farm = build_farm(scenario)
    result = aquasim("plan", "--scenario", str(DEFAULT))
    assert result.exit_code == 0, result.output
    assert f"Plan: {len(planned.batches)} batches" in result.stdout
    assert "Saved run 1" in result.stdout

    reservations = sum(len(b.reservations) for b in planned.batches)
    assert count(engine, "SELECT count(*) FROM batch") == len(planned.batches)
    assert count(engine, "SELECT count(*) FROM container_reservation") == reservations
    assert count(engine, "SELECT count(*) FROM batch_job WHERE state = 'planned'") == len(
        planned.batches
    )
    assert count(engine, "SELECT count(*) FROM container") == len(farm.containers)
    assert count(engine, "SELECT count(*) FROM sensor") == len(farm.sensors)
    run = load_run(engine)
    assert run is not None
    assert (run.id, run.seed, run.as_of, run.status) == (1, scenario.seed, planned.as_of, "planned")
    assert run.scenario_hash == scenario.content_hash()
    assert run.scenario == scenario.model_dump(mode="json")
    with engine.connect() as conn:
        summary = conn.scalar(text("SELECT plan_summary FROM run"))
        partitions = set(
            conn.scalars(
                text(
                    "SELECT inhrelid::regclass::text FROM pg_inherits"
                    " WHERE inhparent = 'environmental_reading'::regclass"
                )
            )
        )
    assert summary["batches"] == len(planned.batches)
    assert summary["bottleneck"]["utilisation"] == pytest.approx(planned.bottleneck.utilisation)
    assert len(summary["usage"]) == len(planned.usage)
    for month in (planned.batches[0].start_date, planned.as_of):
        assert reading_partition_name(month) in partitions

    again = aquasim("plan", "--scenario", str(DEFAULT))
    assert again.exit_code == 0, again.output
    assert "Plan exists: run 1" in again.stdout
    assert count(engine, "SELECT count(*) FROM run") == 1
    assert count(engine, "SELECT count(*) FROM container_reservation") == reservations


def test_load_batch_plan_gives_back_the_planners_entry(engine: Engine) -> None:
    scenario, planned = expected(DEFAULT, seed=99)
    assert aquasim("plan", "--scenario", str(DEFAULT), "--seed", "99").exit_code == 0
    for entry in planned.batches:
        assert load_batch_plan(engine, entry.batch_id, scenario) == entry
    with pytest.raises(KeyError):
        load_batch_plan(engine, len(planned.batches) + 1, scenario)


def test_another_scenario_or_seed_is_refused(engine: Engine) -> None:
    assert aquasim("plan", "--scenario", str(DEMO)).exit_code == 0
    line = error_line(aquasim("plan", "--scenario", str(DEFAULT)))
    assert "database holds a run of another scenario (hash" in line
    assert "aquasim run --reset" in line
    assert "seed 7, not 8" in error_line(aquasim("plan", "--scenario", str(DEMO), "--seed", "8"))
    assert "12" in error_line(aquasim("plan", "--scenario", str(DEMO), "--batches", "12"))
    assert count(engine, "SELECT count(*) FROM run") == 1


def test_infeasible_plan_writes_nothing(engine: Engine) -> None:
    line = error_line(aquasim("plan", "--scenario", str(DEMO), "--batches", "500"))
    assert "largest feasible count" in line
    assert load_run(engine) is None
    assert count(engine, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0


def test_database_rejects_overlapping_stays_on_the_persisted_farm(engine: Engine) -> None:
    _, planned = expected(DEMO)
    assert aquasim("plan", "--scenario", str(DEMO)).exit_code == 0
    first, other = planned.batches[0], planned.batches[1]
    held = first.reservations[0]
    stay = {
        "batch_id": first.batch_id,
        "container_id": held.container_id,
        "stage_id": held.stage_id,
        "start_date": held.start,
        "end_date": held.end,
        "tgc": 1.0,
    }
    with engine.begin() as conn:
        conn.execute(insert(Assignment).values(id=1, **stay))
    overlapping = {
        **stay,
        "batch_id": other.batch_id,
        "start_date": held.end - timedelta(days=1),
        "end_date": held.end + timedelta(days=5),
    }
    for table, row in (
        (Assignment, {"id": 2, **overlapping}),
        (ContainerReservation, {"id": 10_000, **{k: overlapping[k] for k in RESERVATION_KEYS}}),
    ):
        with pytest.raises(IntegrityError) as info, engine.begin() as conn:
            conn.execute(insert(table).values(**row))
        assert isinstance(info.value.orig, psycopg.errors.ExclusionViolation)
    # a hand-over on the boundary day is fine (half-open ranges)
    with engine.begin() as conn:
        after = {**stay, "start_date": held.end, "end_date": held.end + timedelta(days=1)}
        conn.execute(insert(Assignment).values(id=3, **after))
