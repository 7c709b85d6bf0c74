"""The `aquasim` command line.

One Typer `app` (in `_app.py`) and one module per command, each registering on it
with `@app.command()`. To add a command, write `pipeline/cli/<name>.py` and import
it below; test it in `tests/cli/test_<name>.py`.
"""

from __future__ import annotations

import sys

from pipeline.cli._app import Application, UserError, app


def main() -> None:
    """Console-script entry point; the only place that calls sys.exit."""
    sys.exit(app(prog_name="aquasim"))


# Command modules register themselves on `app` when imported (keep this list sorted).
from pipeline.cli import (  # noqa: E402, F401
    flower,
    plan,
    report,
    requeue,
    run,
    simulate,
    status,
    updown,
    verify,
    worker,
)

__all__ = ["Application", "UserError", "app", "main"]
