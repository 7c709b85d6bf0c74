"""Moving the plan in and out of PostgreSQL: thin, no decisions.

The plan is a pure function of (scenario, seed, batch count); this module only
writes it (farm, run row, batches, reservations, ledger rows and reading
partitions, in one transaction) and reads a run or one batch's plan back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from psycopg import sql
from sqlalchemy import Connection, Engine, create_engine, func, insert, select, text
from sqlalchemy.engine import make_url

from pipeline.farm import Farm
from pipeline.planner import BatchPlan, Plan, Reservation, stage_starts
from pipeline.scenario import Scenario
from schema import ensure_reading_partitions
from schema.models import Batch, BatchJob, ContainerReservation, Run

# Serialises plan writers: two coordinators planning one database at once.
_PLAN_LOCK_KEY = 0x61717561_706C616E
_BATCH_COLUMNS = (
    "id",
    "batch_number",
    "geography_id",
    "start_date",
    "eggs",
    "harvest_target_g",
    "seed",
    "status",
)


class RunExists(RuntimeError):
    """The database already holds a run (one database holds one dataset)."""

    def __init__(self, run: RunRecord) -> None:
        super().__init__(f"the database already holds run {run.id}")
        self.run = run


@dataclass(frozen=True)
class RunRecord:
    id: int
    seed: int
    as_of: date
    scenario_hash: str
    scenario: dict[str, Any]
    status: str
    batches: int  # batch_job rows of the run


def make_engine(url: str) -> Engine:
    """An engine on the psycopg 3 driver, whatever PostgreSQL scheme the URL names."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return create_engine(parsed, pool_pre_ping=True)


@contextlib.contextmanager
def _connection(bind: Engine | Connection) -> Iterator[Connection]:
    if isinstance(bind, Connection):
        yield bind
        return
    with bind.connect() as conn:
        yield conn


def _load_run(conn: Connection) -> RunRecord | None:
    if conn.scalar(text("SELECT to_regclass('run')")) is None:
        return None
    row = conn.execute(
        select(
            Run.id, Run.seed, Run.as_of_date, Run.scenario_hash, Run.scenario, Run.status
        ).order_by(Run.id)
    ).first()
    if row is None:
        return None
    jobs = conn.scalar(select(func.count()).select_from(BatchJob).where(BatchJob.run_id == row.id))
    return RunRecord(
        row.id, row.seed, row.as_of_date, row.scenario_hash, row.scenario, row.status, jobs or 0
    )


def load_run(bind: Engine | Connection) -> RunRecord | None:
    """The database's run, or None when it holds none (or has no schema yet)."""
    with _connection(bind) as conn:
        return _load_run(conn)


def plan_summary(scenario: Scenario, farm: Farm, plan: Plan) -> dict[str, Any]:
    """The plan's figures as JSON: counts, steady-state window and utilisation."""
    geography = {g["id"]: g["name"] for g in farm.geographies}
    stage = {s.id: s.name for s in scenario.stages}
    per_geography = {name: 0 for name in geography.values()}
    for b in plan.batches:
        per_geography[geography[b.geography_id]] += 1
    usage = [
        {
            "geography_id": u.geography_id,
            "geography": geography[u.geography_id],
            "stage_id": u.stage_id,
            "stage": stage[u.stage_id],
            "containers": u.containers,
            "reserved_days": u.reserved_days,
            "available_days": u.available_days,
            "utilisation": u.utilisation,
        }
        for u in plan.usage
    ]
    top = plan.bottleneck
    return {
        "batches": len(plan.batches),
        "reservations": sum(len(b.reservations) for b in plan.batches),
        "batches_per_geography": per_geography,
        "window": [plan.window[0].isoformat(), plan.window[1].isoformat()],
        "target_saturation": scenario.target_saturation,
        "bottleneck": {
            "geography": geography[top.geography_id],
            "stage": stage[top.stage_id],
            "utilisation": top.utilisation,
        },
        "usage": usage,
    }


def _copy(
    conn: Connection, table: str, columns: Sequence[str], rows: Iterable[tuple[Any, ...]]
) -> None:
    """COPY rows into `table` on the connection's own transaction."""
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    raw = conn.connection.driver_connection
    with raw.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)


def _copy_dicts(conn: Connection, table: str, rows: list[dict[str, Any]]) -> None:
    if rows:
        columns = list(rows[0])
        _copy(conn, table, columns, (tuple(r[c] for c in columns) for r in rows))


def persist_plan(engine: Engine, scenario: Scenario, farm: Farm, plan: Plan) -> int:
    """Write farm, run, batches, reservations, batch jobs and reading partitions in one
    transaction; return the run id. The schema must exist (`schema.create_schema`).
    Raises RunExists, writing nothing, if the database already holds a run."""
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PLAN_LOCK_KEY})
        existing = _load_run(conn)
        if existing is not None:
            raise RunExists(existing)
        for table, rows in farm.table_rows().items():
            _copy_dicts(conn, table, rows)
        run_id = conn.scalar(
            insert(Run)
            .values(
                seed=plan.seed,
                as_of_date=plan.as_of,
                scenario=scenario.model_dump(mode="json"),
                scenario_hash=plan.scenario_hash,
                status="planned",
                plan_summary=plan_summary(scenario, farm, plan),
            )
            .returning(Run.id)
        )
        assert run_id is not None
        _copy(
            conn,
            Batch.__tablename__,
            _BATCH_COLUMNS,
            (
                (
                    b.batch_id,
                    b.batch_id,
                    b.geography_id,
                    b.start_date,
                    b.eggs,
                    b.harvest_target_g,
                    b.seed,
                    "active",
                )
                for b in plan.batches
            ),
        )
        _copy(
            conn,
            ContainerReservation.__tablename__,
            ("id", "batch_id", "container_id", "stage_id", "start_date", "end_date"),
            (
                (r.id, r.batch_id, r.container_id, r.stage_id, r.start, r.end)
                for b in plan.batches
                for r in b.reservations
            ),
        )
        _copy(
            conn,
            BatchJob.__tablename__,
            ("run_id", "batch_id", "state", "attempts", "seed"),
            ((run_id, b.batch_id, "planned", 0, b.seed) for b in plan.batches),
        )
        first = min(b.start_date for b in plan.batches)
        ensure_reading_partitions(conn, first, plan.as_of)
    return run_id


def load_batch_plan(bind: Engine | Connection, batch_id: int, scenario: Scenario) -> BatchPlan:
    """One batch's plan entry as stored: its row and its reservations (in plan order);
    stage starts are recomputed from the scenario. KeyError if there is no such batch."""
    with _connection(bind) as conn:
        batch = conn.execute(
            select(
                Batch.id,
                Batch.geography_id,
                Batch.start_date,
                Batch.eggs,
                Batch.harvest_target_g,
                Batch.seed,
            ).where(Batch.id == batch_id)
        ).first()
        if batch is None:
            raise KeyError(f"batch {batch_id} is not in the plan")
        r = ContainerReservation
        rows = conn.execute(
            select(r.id, r.batch_id, r.container_id, r.stage_id, r.start_date, r.end_date)
            .where(r.batch_id == batch_id)
            .order_by(r.id)
        ).all()
    return BatchPlan(
        batch_id=batch.id,
        geography_id=batch.geography_id,
        start_date=batch.start_date,
        eggs=batch.eggs,
        harvest_target_g=batch.harvest_target_g,
        seed=batch.seed,
        stage_starts=stage_starts(scenario, batch.start_date),
        reservations=tuple(Reservation(*row) for row in rows),
    )
