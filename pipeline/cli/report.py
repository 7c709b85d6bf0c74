"""`aquasim report`: one self-contained HTML file of plots over the stored run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import psycopg
import typer

from pipeline.cli._app import Application, UserError, app
from pipeline.report import write_report
from pipeline.services import libpq_url

PLURAL = {"batch": "batches", "day": "days"}


@app.command()
def report(
    ctx: typer.Context,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", dir_okay=False, metavar="FILE", help="HTML file to write"),
    ] = Path("report.html"),
    sample: Annotated[
        int,
        typer.Option(
            "--sample",
            min=1,
            max=100,
            metavar="N",
            help="batches drawn in the population and weight curves",
        ),
    ] = 6,  # fmt: skip
) -> None:
    """Write an HTML report with plots: occupancy, growth, realism bands, volumes, jobs."""
    application = Application.of(ctx)
    with application.database() as engine:
        url = libpq_url(engine.url.render_as_string(hide_password=False))
        with psycopg.connect(url) as conn:
            if conn.execute("SELECT to_regclass('run')").fetchone() == (None,):
                raise UserError("the database holds no aquasim schema: run `aquasim run` first")
            try:
                summary = write_report(conn, out, sample=sample)
            except LookupError as exc:
                raise UserError(str(exc)) from None
    queries = sum(summary.query_seconds.values())
    application.out.print(
        f"report written to {summary.path} ({summary.bytes / 1e6:.1f} MB, "
        f"{len(summary.figures)} figures, batches sampled {list(summary.sample)}) in "
        f"{summary.build_seconds:.1f} s (queries {queries:.2f} s)"
    )
    for f in summary.realism_figures:
        if not f.judged:
            continue
        if f.median is None:
            verdict = "nothing to judge yet"
        else:
            items = f"{f.batches} {PLURAL.get(f.per, f.per)}"
            verdict = (
                f"median {f.median:,.4g}, {f.share_inside or 0:.0%} of {items} "
                f"inside {f.band}: {'pass' if f.passed else 'FAIL'}"
            )
        application.out.print(f"  {f.measure}: {verdict}")
