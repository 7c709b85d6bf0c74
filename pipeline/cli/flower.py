"""`aquasim flower`: the Flower dashboard on the project's broker, behind basic authentication.

Runs `celery -A workers.celery_app flower` in the foreground (this process becomes
Flower, so signals and the exit code are Flower's). The credentials and the broker
URL reach Flower through its environment (FLOWER_BASIC_AUTH, CELERY_BROKER_URL),
never its command line, so `ps` does not show them. With no AQUASIM_BROKER_URL the
embedded Redis under the data directory is started (and left running).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.text import Text

from pipeline.cli._app import Application, UserError, app
from pipeline.services import EmbeddedRedis, hide_password
from pipeline.settings import Settings

CELERY_APP = "workers.celery_app"


def credentials(settings: Settings) -> str:
    """Flower's `user:password`, or a UserError saying what is missing or unusable."""
    user, password = settings.flower_user, settings.flower_password
    if not user or not password:
        raise UserError(
            "Flower needs AQUASIM_FLOWER_USER and AQUASIM_FLOWER_PASSWORD "
            "(basic authentication; there is no default password)"
        )
    if ":" in user or "," in user or "," in password:
        raise UserError(
            "AQUASIM_FLOWER_USER may not contain ':' or ',' and AQUASIM_FLOWER_PASSWORD "
            "may not contain ',' (Flower splits its credential list on them)"
        )
    return f"{user}:{password}"


def flower_command(port: int, address: str) -> list[str]:
    """The argv that runs Flower on the project's Celery app (no secrets in it)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        CELERY_APP,
        "flower",
        f"--port={port}",
        f"--address={address}",
    ]


@app.command()
def flower(
    ctx: typer.Context,
    port: Annotated[
        int | None,
        typer.Option(
            "--port",
            min=1,
            max=65535,
            metavar="P",
            help="HTTP port (default: AQUASIM_FLOWER_PORT, else 5555).",
        ),
    ] = None,
    address: Annotated[
        str,
        typer.Option(
            "--address",
            metavar="ADDR",
            help="Interface to listen on (default: all, as a container needs).",
        ),
    ] = "",
) -> None:
    """Start the Flower dashboard on the project's broker (basic authentication required)."""
    application = Application.of(ctx)
    settings = application.settings
    basic_auth = credentials(settings)  # refuse before starting anything
    broker_url = settings.broker_url
    if not broker_url:
        redis = EmbeddedRedis(settings.data_dir)
        redis.start()  # left running, like `aquasim up`: Flower outlives this call
        broker_url = redis.url
    port = port if port is not None else settings.flower_port

    env = dict(os.environ)
    env.update(
        AQUASIM_BROKER_URL=broker_url,
        CELERY_BROKER_URL=broker_url,  # what `celery --broker` would set
        FLOWER_BASIC_AUTH=basic_auth,
    )
    shown = address or "0.0.0.0"
    application.out.print(
        Text(
            f"Flower on http://{shown}:{port}/ (user {settings.flower_user!r}), "
            f"broker {hide_password(broker_url)}"
        ),
        soft_wrap=True,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    argv = flower_command(port, address)
    os.execve(argv[0], argv, env)
