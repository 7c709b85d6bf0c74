"""`aquasim simulate --batch B` and `aquasim assimilate --batch B`: one batch, in-process."""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np
import psycopg
import typer
from rich.table import Table

from pipeline.cli._app import Application, UserError, app
from pipeline.services import libpq_url
from workers.assimilation import STATE_COLUMNS, assimilate
from workers.batch import load_job_inputs, run_batch
from workers.reader import read_batch

BatchOption = Annotated[int, typer.Option("--batch", "-b", help="batch number", min=1)]


def _inputs(engine, batch_id: int):
    try:
        return load_job_inputs(engine, batch_id)
    except (LookupError, KeyError) as exc:
        raise UserError(f"batch {batch_id}: {exc}") from None


@app.command()
def simulate(ctx: typer.Context, batch: BatchOption) -> None:
    """Run one planned batch in-process (no broker): engine, assimilation, writer."""
    application = Application.of(ctx)
    with application.database() as engine:
        inputs = _inputs(engine, batch)
        with psycopg.connect(libpq_url(engine.url.render_as_string(False))) as conn:
            outcome = run_batch(
                conn, inputs.batch, inputs.scenario, inputs.farm, inputs.run_seed,
                replace=True, chunk_rows=application.settings.copy_chunk_rows,
            )  # fmt: skip
    table = Table("table", "rows", "seconds", title=f"batch {batch}: {outcome.rows.status}")
    for name, count in outcome.written.rows.items():
        table.add_row(name, f"{count:,}", f"{outcome.written.seconds.get(name, 0.0):.3f}")
    table.add_row("total", f"{outcome.rows_written:,}", f"{outcome.seconds['write']:.3f}")
    application.out.print(table)
    phases = ", ".join(f"{k} {v:.3f} s" for k, v in outcome.seconds.items())
    application.out.print(f"phases: {phases}; checksum {outcome.written.checksum[:16]}")


def _differences(stored: dict[str, np.ndarray], recomputed: dict[str, np.ndarray]) -> int:
    """Rows whose stored daily state differs from the recomputed one (NaN = NULL)."""
    n = len(stored["assignment_id"])
    if n != len(recomputed["assignment_id"]):
        return abs(n - len(recomputed["assignment_id"])) or 1
    order_a = np.lexsort((stored["state_date"], stored["assignment_id"]))
    order_b = np.lexsort((recomputed["state_date"], recomputed["assignment_id"]))
    differs = np.zeros(n, dtype=bool)
    for column in STATE_COLUMNS:
        a = np.asarray(stored[column])[order_a]
        b = np.asarray(recomputed[column])[order_b]
        if a.dtype.kind == "f" or b.dtype.kind == "f":
            a, b = a.astype(np.float64), b.astype(np.float64)
            differs |= ~((a == b) | (np.isnan(a) & np.isnan(b)))
        else:
            differs |= a != b
    return int(differs.sum())


@app.command("assimilate")
def assimilate_command(ctx: typer.Context, batch: BatchOption) -> None:
    """Rebuild a batch's daily state from its stored rows; compare with what was written."""
    application = Application.of(ctx)
    with application.database() as engine:
        inputs = _inputs(engine, batch)
        with psycopg.connect(libpq_url(engine.url.render_as_string(False))) as conn:
            stored = read_batch(conn, batch)
    began = time.perf_counter()
    recomputed = assimilate(
        stored["assignment"], stored["transfer_action"], stored["mortality_event"],
        stored["harvest_event"], stored["feeding_event"], stored["growth_sample"],
        stored["temperature"], inputs.scenario.as_of_date,
    )  # fmt: skip
    seconds = time.perf_counter() - began
    differing = _differences(stored["daily_assignment_state"], recomputed)
    rows = len(recomputed["assignment_id"])
    application.out.print(
        f"batch {batch}: {rows:,} assignment-days recomputed in {seconds:.3f} s; "
        f"{differing} differ from the stored daily state"
    )
    if differing:
        raise typer.Exit(1)
