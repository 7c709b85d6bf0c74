"""The one Typer app, the per-invocation context (`Application`) and the shared options.

Every command module does

    from pipeline.cli._app import Application, ScenarioOption, SeedOption, app

    @app.command()
    def mycommand(ctx: typer.Context, scenario: ScenarioOption = None) -> None:
        application = Application.of(ctx, scenario=scenario)
        ...

and is imported at the bottom of `pipeline/cli/__init__.py`. Commands raise
(ScenarioError, InfeasiblePlan, ServiceUnavailable, UserError, a settings
ValidationError); `AquasimGroup` turns those into one `aquasim: error: …` line
on stderr and exit code 2. Nothing but `pipeline.cli.main` calls sys.exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import unquote

import typer
from pydantic import ValidationError
from rich.console import Console
from sqlalchemy import Engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError
from typer.core import TyperGroup

from pipeline.database import make_engine
from pipeline.farm import Farm, build_farm
from pipeline.planner import InfeasiblePlan
from pipeline.scenario import Scenario, ScenarioError, load_scenario
from pipeline.services import ServiceUnavailable, resolve_urls
from pipeline.settings import Settings

EXIT_USER_ERROR = 2
MAX_SEED = 2**63 - 1


class UserError(Exception):
    """Something the user can fix (wrong database, conflicting run …): one line, exit 2."""


USER_ERRORS: tuple[type[Exception], ...] = (
    UserError,
    ScenarioError,
    InfeasiblePlan,
    ServiceUnavailable,
    ValidationError,
)


def describe(exc: Exception) -> str:
    """One line for a user error; settings errors name their AQUASIM_ variable."""
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        field = "_".join(str(p) for p in error["loc"])
        ctx = error.get("ctx") or {}
        bounds = [f"{k} {v}" for k, v in ctx.items() if k in ("ge", "gt", "le", "lt")]
        allowed = f" (allowed: {', '.join(bounds)})" if bounds else ""
        what = (
            f"bad setting AQUASIM_{field.upper()}"
            if exc.title == Settings.__name__
            else f"invalid {exc.title}: {field}"
        )
        return " ".join(f"{what}: {error['msg']}{allowed}; got {error.get('input')!r}".split())
    return " ".join(str(exc).split())


class AquasimGroup(TyperGroup):
    """The root command: user errors become one stderr line and exit code 2."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            typer.echo(f"aquasim: error: {describe(exc)}", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None


app = typer.Typer(
    name="aquasim",
    cls=AquasimGroup,
    help="Generate years of salmon-farm operational data into PostgreSQL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals hold URLs with passwords
)

# ---- options shared by commands (the data contract's names) ---------------------------

ScenarioOption = Annotated[
    Path | None,
    typer.Option(
        "--scenario",
        metavar="FILE",
        dir_okay=False,
        help="Scenario TOML file (default: AQUASIM_SCENARIO, else scenarios/default.toml).",
    ),
]
SeedOption = Annotated[
    int | None,
    typer.Option(
        "--seed",
        min=0,
        max=MAX_SEED,
        metavar="S",
        help="Run seed (default: AQUASIM_SEED, else the scenario's).",
    ),
]
BatchesOption = Annotated[
    int | None,
    typer.Option(
        "--batches",
        min=1,
        max=5000,
        metavar="N",
        help="Exactly N batches (default: the scenario's, else as many as fit the target).",
    ),
]


# ---- the per-invocation context ------------------------------------------------------


@dataclass
class Application:
    """What one `aquasim …` invocation works with; loaded lazily, so `--help` never fails."""

    scenario_option: Path | None = None
    seed_option: int | None = None
    out: Console = field(default_factory=lambda: Console(highlight=False))

    @classmethod
    def of(
        cls, ctx: typer.Context, *, scenario: Path | None = None, seed: int | None = None
    ) -> Application:
        """The invocation's Application, with this command's --scenario/--seed applied."""
        application = ctx.ensure_object(Application)
        if scenario is not None:
            application.scenario_option = scenario
        if seed is not None:
            application.seed_option = seed
        return application

    @cached_property
    def settings(self) -> Settings:
        return Settings()

    @property
    def scenario_path(self) -> Path:
        return self.scenario_option or self.settings.scenario

    @cached_property
    def scenario(self) -> Scenario:
        return load_scenario(self.scenario_path)

    @cached_property
    def farm(self) -> Farm:
        return build_farm(self.scenario)

    @property
    def seed(self) -> int:
        """--seed, else AQUASIM_SEED, else the scenario's seed."""
        for seed in (self.seed_option, self.settings.seed):
            if seed is not None:
                return seed
        return self.scenario.seed

    @contextlib.contextmanager
    def urls(self, keep_running: bool = False) -> Iterator[tuple[str, str]]:
        """(database_url, broker_url): the configured ones, else embedded servers'."""
        with resolve_urls(self.settings, keep_running=keep_running) as urls:
            yield urls

    @contextlib.contextmanager
    def database(self) -> Iterator[Engine]:
        """An engine on the run's database (embedded if none is configured), checked live."""
        with self.urls() as (database_url, _broker_url):
            engine = make_engine(database_url)
            try:
                try:
                    engine.connect().close()
                except OperationalError as exc:
                    raise ServiceUnavailable(
                        f"PostgreSQL is unreachable at {mask(database_url)}: "
                        f"{' '.join(str(exc.orig).split())}"
                    ) from exc
                yield engine
            finally:
                engine.dispose()

    def abort(self, message: str) -> NoReturn:
        raise UserError(message)


def mask(url: str | URL) -> str:
    """A database URL fit to print: password hidden, socket paths readable."""
    try:
        return unquote(make_url(url).render_as_string(hide_password=True))
    except Exception:  # not a URL SQLAlchemy can parse: say nothing of it
        return "<database>"


@app.callback()
def _root(ctx: typer.Context) -> None:
    """Generate years of salmon-farm operational data into PostgreSQL."""
    ctx.ensure_object(Application)
