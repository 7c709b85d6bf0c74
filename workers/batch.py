"""One batch job: engine → assimilation → writer. Callable in-process or from a task."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import psycopg
from sqlalchemy import Engine

from pipeline.database import load_batch_plan, load_run
from pipeline.farm import Farm, build_farm
from pipeline.planner import BatchPlan
from pipeline.scenario import Scenario, parse_scenario
from workers.assimilation import assimilate_rows
from workers.engine import BatchRows, simulate
from workers.writer import WriteResult, write_batch


@dataclass
class BatchOutcome:
    rows: BatchRows
    written: WriteResult
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def rows_written(self) -> int:
        return sum(self.written.rows.values())


def compute_batch(
    batch: BatchPlan, scenario: Scenario, farm: Farm, run_seed: int
) -> tuple[BatchRows, dict[str, float]]:
    """Engine and assimilation, no database: the rows a job writes, with phase times."""
    began = time.perf_counter()
    rows = simulate(batch, scenario, farm, run_seed)
    simulated = time.perf_counter()
    rows.tables["daily_assignment_state"] = assimilate_rows(rows, scenario.as_of_date)
    assimilated = time.perf_counter()
    return rows, {"engine": simulated - began, "assimilation": assimilated - simulated}


def run_batch(
    conn: psycopg.Connection,
    batch: BatchPlan,
    scenario: Scenario,
    farm: Farm,
    run_seed: int,
    *,
    replace: bool,
    chunk_rows: int = 200_000,
    before_commit: Callable[[psycopg.Connection, WriteResult], None] | None = None,
) -> BatchOutcome:
    rows, seconds = compute_batch(batch, scenario, farm, run_seed)
    began = time.perf_counter()
    written = write_batch(
        conn, rows, replace=replace, chunk_rows=chunk_rows, before_commit=before_commit
    )
    seconds["write"] = time.perf_counter() - began
    return BatchOutcome(rows, written, seconds)


@dataclass(frozen=True)
class JobInputs:
    run_id: int
    scenario: Scenario
    farm: Farm
    batch: BatchPlan
    run_seed: int


@lru_cache(maxsize=4)
def _scenario_and_farm(scenario_json: str) -> tuple[Scenario, Farm]:
    scenario = parse_scenario(json.loads(scenario_json))
    return scenario, build_farm(scenario)


def load_job_inputs(engine: Engine, batch_id: int) -> JobInputs:
    """What a job needs, from the database alone: the run's scenario and the batch's plan."""
    record = load_run(engine)
    if record is None:
        raise LookupError("the database holds no planned run: run `aquasim plan` first")
    scenario, farm = _scenario_and_farm(json.dumps(record.scenario, sort_keys=True))
    batch = load_batch_plan(engine, batch_id, scenario)
    return JobInputs(record.id, scenario, farm, batch, record.seed)
