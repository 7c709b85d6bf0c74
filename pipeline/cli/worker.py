"""`aquasim worker` and `aquasim beat`: Celery's own commands with the project's settings.

Each becomes `celery -A workers.celery_app worker|beat …` (this process is replaced,
so signals and the exit code are Celery's). The database and broker URLs reach it
through AQUASIM_DATABASE_URL / AQUASIM_BROKER_URL in its environment; when they are
unset, the embedded servers of the data directory are started and left running
(like `aquasim up`). Options these wrappers do not know are passed to Celery as
they are, e.g. `aquasim worker --autoscale 4,1`.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.text import Text

from pipeline.cli._app import Application, app
from pipeline.services import hide_password

CELERY_APP = "workers.celery_app"
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def celery_command(subcommand: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", CELERY_APP, subcommand, *args]


def _exec(application: Application, argv: list[str]) -> None:
    with application.urls(keep_running=True) as (database_url, broker_url):
        env = {
            **os.environ,
            "AQUASIM_DATABASE_URL": database_url,
            "AQUASIM_BROKER_URL": broker_url,
        }
    application.out.print(
        Text(f"{' '.join(argv[3:5])} on {hide_password(broker_url)}, queue "
             f"{application.settings.queue!r}"), soft_wrap=True,
    )  # fmt: skip
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)


@app.command(context_settings=PASS_THROUGH)
def worker(
    ctx: typer.Context,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", min=1, max=512, help="Pool processes.")
    ] = 1,
    name: Annotated[
        str, typer.Option("--name", "-n", help="Node name (%h = host name).")
    ] = "aquasim@%h",
    loglevel: Annotated[str, typer.Option("--loglevel", "-l")] = "INFO",
) -> None:
    """Start a Celery worker for batch jobs (prefork pool, one job per process at a time)."""
    application = Application.of(ctx)
    application.settings  # noqa: B018 - a bad setting fails here, with its name
    argv = celery_command(
        "worker", "--pool", "prefork", "--concurrency", str(concurrency), "-n", name,
        "--loglevel", loglevel, *ctx.args,
    )  # fmt: skip
    _exec(application, argv)


@app.command(context_settings=PASS_THROUGH)
def beat(
    ctx: typer.Context,
    loglevel: Annotated[str, typer.Option("--loglevel", "-l")] = "INFO",
) -> None:
    """Start celery beat: the scheduled verification and the stuck-job sweeper."""
    application = Application.of(ctx)
    data_dir = application.settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = celery_command(
        "beat", "--loglevel", loglevel, "--schedule", str(data_dir / "celerybeat-schedule"),
        *ctx.args,
    )  # fmt: skip
    _exec(application, argv)
