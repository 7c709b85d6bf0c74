"""`aquasim plan`: plan the run, print its utilisation, and store it (unless --dry-run).

`ensure_planned` is the step `aquasim run` shares: plan and persist unless the
database already holds this plan, refusing a run of another scenario or seed.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy import Engine

from pipeline import planner
from pipeline.cli._app import (
    Application,
    BatchesOption,
    ScenarioOption,
    SeedOption,
    app,
    mask,
)
from pipeline.database import RunExists, RunRecord, load_run, persist_plan
from pipeline.farm import Farm
from pipeline.planner import Plan
from pipeline.scenario import Scenario
from schema import create_schema

RESET_HINT = (
    "use `aquasim run --reset` to replace it, or point AQUASIM_DATABASE_URL at another database"
)


@dataclass(frozen=True)
class Planned:
    run_id: int
    batches: int
    plan: Plan | None  # None: the database already held this plan
    seconds: float  # planning time


def make_plan(application: Application, batches: int | None) -> tuple[Plan, float]:
    """The plan and the seconds it took (InfeasiblePlan names the largest count that fits)."""
    scenario, farm = application.scenario, application.farm
    started = time.perf_counter()
    result = planner.plan(scenario, farm, seed=application.seed, batches=batches)
    return result, time.perf_counter() - started


def check_same_run(existing: RunRecord, application: Application, batches: int | None) -> None:
    """Refuse a stored run that is not the plan asked for."""
    digest = application.scenario.content_hash()
    if existing.scenario_hash != digest:
        application.abort(
            f"database holds a run of another scenario (hash {existing.scenario_hash[:12]}…, "
            f"not {digest[:12]}…); {RESET_HINT}"
        )
    if existing.seed != application.seed:
        application.abort(
            f"database holds a run of this scenario with seed {existing.seed}, "
            f"not {application.seed}; {RESET_HINT}"
        )
    wanted = batches if batches is not None else application.scenario.batches
    if wanted is not None and wanted != existing.batches:
        application.abort(
            f"database holds a plan of {existing.batches} batches, not {wanted}; {RESET_HINT}"
        )


def ensure_planned(application: Application, engine: Engine, batches: int | None) -> Planned:
    """Plan and persist in one transaction, unless the database already holds this plan."""
    existing = load_run(engine)
    if existing is None:
        result, seconds = make_plan(application, batches)  # before any write: errors leave none
        create_schema(engine)
        try:
            run_id = persist_plan(engine, application.scenario, application.farm, result)
            return Planned(run_id, len(result.batches), result, seconds)
        except RunExists as exc:  # another coordinator planned meanwhile
            existing = exc.run
    check_same_run(existing, application, batches)
    return Planned(existing.id, existing.batches, None, 0.0)


# ---- output -------------------------------------------------------------------------------


def show_plan(
    console: Console, scenario: Scenario, farm: Farm, result: Plan, seconds: float
) -> None:
    geography = {g["id"]: g["name"] for g in farm.geographies}
    stage = {s.id: s.name for s in scenario.stages}

    per_geography = Counter(b.geography_id for b in result.batches)
    batches = Table(title="Batches per geography", title_justify="left")
    for column in ("Geography", "Batches", "First start", "Last start"):
        batches.add_column(column, justify="right" if column == "Batches" else "left")
    for geo_id, name in geography.items():
        starts = [b.start_date for b in result.batches if b.geography_id == geo_id]
        first, last = (min(starts), max(starts)) if starts else ("-", "-")
        batches.add_row(Text(name), str(per_geography[geo_id]), str(first), str(last))

    lo, hi = result.window
    top = result.bottleneck
    usage = Table(title=f"Utilisation in container-days, {lo} → {hi}", title_justify="left")
    usage.add_column("Geography", no_wrap=True)
    usage.add_column("Stage", no_wrap=True)
    for column in ("Containers", "Reserved", "Available", "Used"):
        usage.add_column(column, justify="right")
    for u in result.usage:
        usage.add_row(
            Text(geography[u.geography_id]),
            Text(stage[u.stage_id]),
            str(u.containers),
            f"{u.reserved_days:,}",
            f"{u.available_days:,}",
            f"{u.utilisation:.1%}",
            style="bold" if u == top else None,
        )

    console.print(batches)
    console.print(usage)
    lines = (
        f"Steady-state window: {lo} → {hi} ({(hi - lo).days} days)",
        f"Bottleneck: {stage[top.stage_id]} in {geography[top.geography_id]}, "
        f"{top.utilisation:.1%} used (target {scenario.target_saturation:.0%})",
        f"Plan: {len(result.batches)} batches, "
        f"{sum(len(b.reservations) for b in result.batches)} reservations, "
        f"seed {result.seed}, as of {result.as_of}; planned in {seconds:.2f} s",
    )
    for line in lines:
        console.print(Text(line), soft_wrap=True)


# ---- the command --------------------------------------------------------------------------


@app.command()
def plan(
    ctx: typer.Context,
    scenario: ScenarioOption = None,
    seed: SeedOption = None,
    batches: BatchesOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print utilisation and feasibility; write nothing.")
    ] = False,
) -> None:
    """Plan the run: start dates, batch constants and container reservations."""
    application = Application.of(ctx, scenario=scenario, seed=seed)
    model, farm = application.scenario, application.farm  # fail here, before any server
    out = application.out
    if dry_run:
        result, seconds = make_plan(application, batches)
        show_plan(out, model, farm, result, seconds)
        return
    with application.database() as engine:
        started = time.perf_counter()
        planned = ensure_planned(application, engine, batches)
        elapsed = time.perf_counter() - started
        where = mask(engine.url)
    if planned.plan is None:
        out.print(
            Text(
                f"Plan exists: run {planned.run_id} of scenario {model.name!r}, "
                f"seed {application.seed}, {planned.batches} batches, in {where}; nothing written."
            ),
            soft_wrap=True,
        )
        return
    show_plan(out, model, farm, planned.plan, planned.seconds)
    out.print(
        Text(
            f"Saved run {planned.run_id} to {where} "
            f"({len(farm.containers)} containers, {len(farm.sensors)} sensors) in {elapsed:.2f} s."
        ),
        soft_wrap=True,
    )
