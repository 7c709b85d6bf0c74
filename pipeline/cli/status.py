"""`aquasim status`: the run ledger — jobs per state, rows, throughput, running jobs, failures.

Reads the database only (no broker). Exit code 0 whatever the jobs' states.
"""

from __future__ import annotations

from datetime import timedelta

import typer
from rich.table import Table
from rich.text import Text
from sqlalchemy import Engine

from pipeline import ledger
from pipeline.cli._app import Application, app
from pipeline.database import load_run
from schema.models import JOB_STATES


def throughput(engine: Engine, run_id: int) -> tuple[float, float, float] | None:
    """(wall seconds from first start to last finish, rows/s over it, mean job seconds)
    of the succeeded jobs; None before any succeeded."""
    with ledger.transaction(engine) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM max(finished_at) - min(started_at)), sum(rows_written), "
            "avg(extract(epoch FROM finished_at - started_at)) FROM batch_job "
            "WHERE run_id = %s AND state = 'succeeded'",
            (run_id,),
        ).fetchone()
    if row is None or row[0] is None:
        return None
    wall, rows, mean = float(row[0]), int(row[1] or 0), float(row[2] or 0.0)
    return wall, rows / wall if wall > 0 else 0.0, mean


@app.command()
def status(ctx: typer.Context) -> None:
    """Show the run ledger: jobs per state, rows written, throughput and failures."""
    application = Application.of(ctx)
    out = application.out
    with application.database() as engine:
        record = load_run(engine)
        if record is None:
            out.print("No run in this database: `aquasim run` (or `aquasim plan`) first.")
            return
        counts = ledger.counts(engine, record.id)
        speed = throughput(engine, record.id)
        running = ledger.jobs(engine, record.id, ["running"])
        failures = ledger.failures(engine, record.id)

    scenario = record.scenario.get("name", "?")
    out.print(Text(f"Run {record.id} of scenario {scenario!r}, seed {record.seed}: "
                   f"{record.status}"), soft_wrap=True)  # fmt: skip
    states = Table()
    states.add_column("State")
    states.add_column("Jobs", justify="right")
    for state in JOB_STATES:
        states.add_row(state, str(counts[state]))
    states.add_row("total", str(counts.total), style="bold")
    out.print(states)

    line = f"{counts.rows_written:,} rows written by {counts['succeeded']} succeeded jobs"
    if speed is not None:
        wall, rate, mean = speed
        line += f"; {rate:,.0f} rows/s over {wall:.1f} s, {mean:.2f} s per job on average"
    out.print(Text(line), soft_wrap=True)

    if running:
        table = Table(title="Running", title_justify="left")
        for column in ("Batch", "Attempt", "Worker", "Started", "Lease left"):
            table.add_column(column)
        for job in running:
            left: timedelta | None = job["lease_left"]
            lease = "-" if left is None else f"{left.total_seconds():.0f} s"
            if left is not None and left.total_seconds() < 0:
                lease += " (expired)"
            started = job["started_at"]
            table.add_row(
                str(job["batch_id"]), str(job["attempts"]), Text(job["worker"] or "-"),
                f"{started:%H:%M:%S}" if started else "-", lease,
            )  # fmt: skip
        out.print(table)

    if failures:
        table = Table(title="Failed", title_justify="left")
        for column in ("Batch", "Attempts", "Worker", "Error"):
            table.add_column(column, overflow="fold")
        for f in failures:
            table.add_row(str(f.batch_id), str(f.attempts), Text(f.worker or "-"),
                          Text(f.error or ""))  # fmt: skip
        out.print(table)
        out.print("Re-run them with `aquasim requeue`.")
