"""`aquasim verify`: check the invariants over the stored rows, print them, exit 1 on any
violation.

Checks the batches whose job has succeeded (a batch whose job never ran is not
checked; I-19 still reports rows of batches without a succeeded job), runs every
check including the run-wide ones, stores one `verification_result` row per
invariant, and prints the invariants table, the realism table (farm-model.md §6)
and up to three example offenders of each failing invariant.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.checks import DETERMINISM_SAMPLE
from pipeline.cli._app import Application, app
from pipeline.realism import RealismFigure
from pipeline.verify import DESCRIPTIONS, NoRun, VerificationReport, normalise, run_verification

EXAMPLES_SHOWN = 3


@app.command()
def verify(
    ctx: typer.Context,
    invariant: Annotated[
        list[str] | None,
        typer.Option(
            "--invariant",
            "-i",
            metavar="I-N",
            help="Check only this invariant (repeatable), e.g. --invariant I-8.",
        ),
    ] = None,
    sample: Annotated[
        int,
        typer.Option(
            "--sample", min=0, metavar="N", help="Batches re-simulated in-process for I-18."
        ),
    ] = DETERMINISM_SAMPLE,
) -> None:
    """Check every invariant (I-1 … I-20) over the stored rows; exit 1 on any violation."""
    application = Application.of(ctx)
    try:
        only = [normalise(name) for name in invariant] if invariant else None
    except KeyError as exc:
        application.abort(str(exc.args[0]))
    with application.database() as engine:
        try:
            report = run_verification(engine, scheduled=False, only=only, sample=sample)
        except NoRun as exc:
            application.abort(str(exc))
    print_report(application.out, report)
    if not report.passed:
        raise typer.Exit(1)


# ---- printing (shared with `aquasim run`) ------------------------------------------------------


def _status(passed: bool) -> Text:
    return Text("pass", style="bold green") if passed else Text("FAIL", style="bold red")


def _number(value: float | None) -> str:
    if value is None:
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def invariants_table(report: VerificationReport) -> Table:
    table = Table(title="Invariants", title_justify="left")
    for name, justify in (
        ("Invariant", "left"),
        ("Description", "left"),
        ("Rows examined", "right"),
        ("Violations", "right"),
        ("Seconds", "right"),
        ("Status", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in report.results:
        table.add_row(
            r.invariant,
            DESCRIPTIONS.get(r.invariant, ""),
            f"{r.rows_examined:,}",
            f"{r.violations:,}",
            f"{r.seconds:.2f}",
            _status(r.passed),
        )
    for name in report.skipped:
        table.add_row(name, DESCRIPTIONS.get(name, ""), "–", "–", "–", Text("skipped", "yellow"))
    return table


def realism_table(figures: list[RealismFigure]) -> Table:
    table = Table(title="Realism (farm-model.md §6)", title_justify="left")
    for name, justify in (
        ("Measure", "left"),
        ("Band", "left"),
        ("Median", "right"),
        ("% inside", "right"),
        ("Judged", "right"),
        ("Status", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for f in figures:
        if not f.judged:
            status = Text("info", style="dim")
        elif f.batches == 0:
            status = Text("no data", style="yellow")
        else:
            status = _status(f.passed)
        share = "–" if f.share_inside is None else f"{100 * f.share_inside:.0f} %"
        judged = f"{f.batches} {'days' if f.per == 'day' else 'batches'}"
        table.add_row(f.measure, str(f.band), _number(f.median), share, judged, status)
    return table


def print_report(out: Console, report: VerificationReport) -> None:
    jobs = ", ".join(f"{n} {state}" for state, n in sorted(report.jobs.items()))
    out.print(
        f"run {report.run_id}: {len(report.batches_checked)} batches checked "
        f"(those whose job succeeded; jobs: {jobs or 'none'})"
    )
    if report.batches_unchecked:
        out.print(
            f"[yellow]{report.batches_unchecked} batches without a succeeded job "
            "were not checked[/yellow]"
        )
    out.print(invariants_table(report))
    for r in report.results:
        if r.note:
            out.print(f"{r.invariant}: {r.note}")
    for name, why in report.skipped.items():
        out.print(f"{name} skipped: {why}")
    if report.realism:
        out.print(realism_table(report.realism))
    for r in report.results:
        if r.passed:
            continue
        shown = r.examples[:EXAMPLES_SHOWN]
        out.print(
            f"[bold red]{r.invariant}[/bold red] {DESCRIPTIONS.get(r.invariant, '')}: "
            f"{r.violations:,} violations; {len(shown)} example offenders:"
        )
        for example in shown:
            out.print(
                "  " + json.dumps(example, default=str, ensure_ascii=False),
                soft_wrap=True,
                markup=False,
            )
    checked = len(report.results)
    if report.passed:
        out.print(
            f"[bold green]all {checked} invariants checked hold[/bold green] "
            f"({report.seconds:.1f} s)"
        )
    else:
        out.print(
            f"[bold red]failing invariants: {', '.join(report.failures)}[/bold red] "
            f"({len(report.failures)} of {checked}; {report.seconds:.1f} s)"
        )
