"""`aquasim requeue [--stuck] [BATCH...]`: put failed (default) or stuck jobs back in the queue.

Like rq's `FailedJobRegistry.requeue`: each job moves back to queued in the ledger
(times and error cleared, attempts kept) and is sent to the broker. `--stuck`
takes running jobs whose lease expired instead of failed ones. Named batches are
taken only if they are in that state; every one that is not is reported, and
makes the exit code 1. In embedded mode nothing keeps the broker's queue after
this command, so the next `aquasim run` sends the re-queued jobs again itself.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from pipeline import ledger
from pipeline.cli._app import Application, app
from pipeline.database import load_run
from workers.celery_app import Broker


@app.command()
def requeue(
    ctx: typer.Context,
    batches: Annotated[
        list[int] | None,
        typer.Argument(
            metavar="[BATCH]...",
            help="Batch numbers (default: every one in that state).",
            show_default=False,
        ),
    ] = None,  # fmt: skip
    stuck: Annotated[
        bool, typer.Option("--stuck", help="Running jobs whose lease expired, not failed ones.")
    ] = False,
) -> None:
    """Re-enqueue failed jobs (default), stuck ones (--stuck), or only the named batches."""
    application = Application.of(ctx)
    settings = application.settings
    out = application.out
    named = sorted(set(batches)) if batches else None
    with application.urls() as (_database_url, broker_url), application.database() as engine:
        record = load_run(engine)
        if record is None:
            application.abort("no run in this database: `aquasim run` first")
        move = ledger.requeue_stuck if stuck else ledger.requeue
        moved = move(engine, record.id, named)
        problems = []
        if named is not None:
            states = {job["batch_id"]: job["state"] for job in ledger.jobs(engine, record.id)}
            wanted = "running with an expired lease" if stuck else "failed"
            for batch_id in named:
                if batch_id not in moved:
                    state = states.get(batch_id)
                    what = "no such batch" if state is None else f"it is {state}, not {wanted}"
                    problems.append(f"batch {batch_id}: not re-queued ({what})")
        broker = Broker(broker_url, settings.queue)
        sent = []
        for batch_id in moved:  # one by one: a broker error is reported per job
            try:
                broker.publish(record.id, [batch_id])
                sent.append(batch_id)
            except Exception as exc:
                problems.append(
                    f"batch {batch_id}: queued in the ledger but not sent ({exc}); "
                    "the sweeper or the next `aquasim run` sends it"
                )

    kind = "stuck" if stuck else "failed"
    if moved:
        listed = ", ".join(map(str, moved))
        out.print(
            Text(f"Re-queued {len(moved)} {kind} job(s): {listed}; sent {len(sent)} to queue "
                 f"{settings.queue!r}."), soft_wrap=True,
        )  # fmt: skip
    else:
        out.print(f"No {kind} jobs to re-queue.")
    for problem in problems:
        out.print(Text(problem), soft_wrap=True)
    if named is not None and len(moved) < len(named):
        raise typer.Exit(1)
