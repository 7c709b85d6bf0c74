"""`aquasim up` / `aquasim down`: serve the embedded data directory again, or stop it."""

from __future__ import annotations

import typer
from rich.text import Text

from pipeline.cli._app import Application, app
from pipeline.services import EmbeddedServices


@app.command()
def up(ctx: typer.Context) -> None:
    """Start (and keep running) the embedded PostgreSQL and Redis; print their URLs."""
    application = Application.of(ctx)
    data_dir = application.settings.data_dir
    services = EmbeddedServices(data_dir)
    services.start()
    out = application.out
    lines = (
        f"Embedded servers over {data_dir.resolve()} are running.",
        f"AQUASIM_DATABASE_URL={services.database_url}",
        f"AQUASIM_BROKER_URL={services.broker_url}",
        f"psql: psql '{services.postgres.url}'",
        "Stop them with: aquasim down",
    )
    for line in lines:
        out.print(Text(line), soft_wrap=True)
    if application.settings.database_url or application.settings.broker_url:
        out.print(
            Text("Note: AQUASIM_DATABASE_URL/AQUASIM_BROKER_URL are set; commands use those."),
            soft_wrap=True,
        )


@app.command()
def down(ctx: typer.Context) -> None:
    """Stop the embedded PostgreSQL and Redis (the data stays in the data directory)."""
    application = Application.of(ctx)
    data_dir = application.settings.data_dir
    services = EmbeddedServices(data_dir)
    was = [
        name
        for name, running in (
            ("PostgreSQL", services.postgres.running),
            ("Redis", services.redis.running),
        )
        if running
    ]
    services.stop()
    if was:
        message = f"Stopped embedded {' and '.join(was)} over {data_dir.resolve()}."
    else:
        message = f"No embedded server was running over {data_dir.resolve()}."
    application.out.print(Text(message), soft_wrap=True)
