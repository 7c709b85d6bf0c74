"""One batch job: engine → assimilation → writer. Callable in-process or from a task."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg

from pipeline.farm import Farm
from pipeline.planner import BatchPlan
from pipeline.scenario import Scenario
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
    before_commit: Callable[[psycopg.Connection], None] | None = None,
) -> BatchOutcome:
    rows, seconds = compute_batch(batch, scenario, farm, run_seed)
    began = time.perf_counter()
    written = write_batch(
        conn, rows, replace=replace, chunk_rows=chunk_rows, before_commit=before_commit
    )
    seconds["write"] = time.perf_counter() - began
    return BatchOutcome(rows, written, seconds)
