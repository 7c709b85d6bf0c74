"""`aquasim run`: prepare the database, plan once, and generate every unfinished batch.

This first version runs the batches in-process, one after another; the Celery
pipeline (workers, ledger leases, Flower) replaces the loop, not the steps.
"""

from __future__ import annotations

import json
import time
import traceback
from typing import Annotated

import psycopg
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from sqlalchemy import Engine

from pipeline.cli._app import Application, BatchesOption, ScenarioOption, SeedOption, app
from pipeline.cli.plan import ensure_planned
from pipeline.services import libpq_url
from schema.ddl import drop_schema
from workers.batch import load_job_inputs, run_batch


def _pending(conn: psycopg.Connection, run_id: int) -> list[int]:
    rows = conn.execute(
        "SELECT batch_id FROM batch_job WHERE run_id = %s AND state <> 'succeeded' "
        "ORDER BY batch_id",
        (run_id,),
    ).fetchall()
    return [r[0] for r in rows]


def _mark(conn: psycopg.Connection, run_id: int, batch_id: int, **fields) -> None:
    assignments = ", ".join(f"{k} = %({k})s" for k in fields)
    conn.execute(
        f"UPDATE batch_job SET {assignments} WHERE run_id = %(run_id)s AND batch_id = %(batch_id)s",
        {**fields, "run_id": run_id, "batch_id": batch_id},
    )
    conn.commit()


def _run_one(
    engine: Engine, conn: psycopg.Connection, run_id: int, batch_id: int, chunk: int
) -> int:
    _mark(conn, run_id, batch_id, state="running", started_at="now", error=None)
    conn.execute(
        "UPDATE batch_job SET attempts = attempts + 1 WHERE run_id = %s AND batch_id = %s",
        (run_id, batch_id),
    )
    conn.commit()
    inputs = load_job_inputs(engine, batch_id)
    outcome = run_batch(
        conn, inputs.batch, inputs.scenario, inputs.farm, inputs.run_seed,
        replace=True, chunk_rows=chunk,
    )  # fmt: skip
    _mark(
        conn, run_id, batch_id, state="succeeded", finished_at="now",
        rows_written=outcome.rows_written, checksum=outcome.written.checksum,
        rows_per_table=json.dumps(outcome.written.rows),
        checksums=json.dumps(outcome.written.checksums),
        timings=json.dumps(outcome.seconds), worker="in-process",
    )  # fmt: skip
    return outcome.rows_written


@app.command()
def run(
    ctx: typer.Context,
    scenario: ScenarioOption = None,
    seed: SeedOption = None,
    batches: BatchesOption = None,
    workers: Annotated[int | None, typer.Option(help="worker processes", min=0)] = None,
    reset: Annotated[bool, typer.Option("--reset", help="wipe the dataset first")] = False,
) -> None:
    """The overnight job: plan once, generate every batch not yet succeeded, summarise."""
    application = Application.of(ctx, scenario=scenario, seed=seed)
    application.scenario  # noqa: B018 - a bad scenario fails before anything is written
    began = time.perf_counter()
    with application.database() as engine:
        if reset:
            drop_schema(engine)
        planned = ensure_planned(application, engine, batches)
        url = libpq_url(engine.url.render_as_string(False))
        with psycopg.connect(url) as conn:
            pending = _pending(conn, planned.run_id)
            written, failed = _generate(application, engine, conn, planned.run_id, pending)
    seconds = time.perf_counter() - began
    application.out.print(
        f"{planned.batches} batches planned, {len(pending) - len(failed)} generated now, "
        f"{len(failed)} failed; {written:,} rows in {seconds:.1f} s "
        f"({written / max(seconds, 1e-9):,.0f} rows/s)"
    )
    if failed:
        raise typer.Exit(1)


def _generate(
    application: Application, engine: Engine, conn: psycopg.Connection, run_id: int,
    pending: list[int],
) -> tuple[int, list[int]]:  # fmt: skip
    written, failed = 0, []
    chunk = application.settings.copy_chunk_rows
    columns = (
        TextColumn("batches"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rows]:,} rows"), TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns, console=application.out) as progress:
        task = progress.add_task("batches", total=len(pending), rows=0)
        for batch_id in pending:
            try:
                written += _run_one(engine, conn, run_id, batch_id, chunk)
            except Exception as exc:  # a failing batch must not stop the run
                conn.rollback()
                error = "".join(traceback.format_exception_only(exc)).strip()
                _mark(conn, run_id, batch_id, state="failed", error=error, finished_at="now")
                failed.append(batch_id)
            progress.update(task, advance=1, rows=written)
    return written, failed
