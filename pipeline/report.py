"""The run report: one self-contained HTML file of plotly figures over the stored rows.

`write_report(conn, out, sample=6)` queries the database set-based (one statement
per figure, no per-row Python over the big tables, `environmental_reading` never
scanned) and writes a single HTML file with plotly.js inlined, so it opens
offline. Each figure sits in a div with a fixed id (`FIGURE_IDS`):

- `fig-occupancy` — Gantt per site: one row per holding container, one bar per
  assignment, coloured by batch; a dropdown picks the station or sea area. Every
  assignment is drawn (~10 k bars at full scale, ~1 MB), but only one site's
  trace is visible at a time, so the browser lays out one site at once.
- `fig-occupancy-heatmap` — the aggregate view of the whole farm: share of
  container-days occupied per site and month.
- `fig-growth` — population and mean weight of a sample of batches (evenly spread
  over their start dates) per day of the batch's life, against the growth model's
  nominal curve: from the egg weight, each freshwater stage for its nominal length
  at its calibrated TGC and mid temperature, then at sea the sea stage's TGC with
  the geography's seasonal (noise-free) sea temperature until the batch's harvest
  target; population from the eggs at each stage's mean mortality and the
  handling loss at each transfer.
- `fig-realism` — histograms over harvested batches of freshwater survival,
  sea-phase mortality, economic FCR, harvest weight and days at sea, with the
  band of farm-model §6 shaded and the median marked.
- `fig-sea-temperature` — daily mean (and min–max over rings) of the sea rings'
  daily temperature per geography, from `daily_assignment_state.temperature_c`
  (the mean of the day's Temperature readings), with the seasonal curve of the
  scenario and the band.
- `fig-table-rows` — rows per table: exact written counts from the ledger
  (`batch_job.rows_per_table`) for the batch tables, `count(*)` for the small
  farm/plan/ledger tables; a table without either falls back to the statistics
  estimate (`pg_class.reltuples` / `n_live_tup`, summed over partitions).
- `fig-jobs` — job wall times (histogram), per-batch engine/assimilation/write
  seconds, and rows written cumulated over the jobs' finish times.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import psycopg
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from pipeline import realism
from pipeline.planner import stage_starts
from pipeline.scenario import Scenario, parse_scenario
from schema.models import BATCH_TABLES, FARM_TABLES, LEDGER_TABLES, PLAN_TABLES
from workers.engine import calibrated_tgc
from workers.environment import sea_calendar_c

FIGURE_IDS = (
    "fig-occupancy",
    "fig-occupancy-heatmap",
    "fig-growth",
    "fig-realism",
    "fig-sea-temperature",
    "fig-table-rows",
    "fig-jobs",
)
PALETTE = (  # qualitative colours, cycled by batch id
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939", "#8c6d31", "#843c39", "#7b4173",
    "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363", "#6baed6", "#fd8d3c", "#74c476",
)  # fmt: skip
GEO_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
TEMPLATE = "plotly_white"
MS_PER_DAY = 86_400_000
ROW_PX = 18  # one container row of the occupancy Gantt
SMALL_TABLE_ROWS = 1_000_000  # below this (estimated) a table is counted exactly


# ---- realism: the bands and their judgement come from pipeline.realism ----------------

# What the realism histograms show, one subplot each (pipeline.realism.MEASURES keys).
HISTOGRAM_KEYS = (
    "freshwater_survival_pct",
    "sea_mortality_pct",
    "sea_fcr",
    "harvest_weight_kg",
    "harvest_weight_vs_target_pct",
    "days_at_sea",
)


# ---- what the report reads -------------------------------------------------------------


@dataclass
class ReportData:
    run: dict[str, Any]
    scenario: Scenario
    batches: list[dict[str, Any]]
    containers: list[dict[str, Any]]
    assignments: dict[str, np.ndarray]
    curves: dict[int, dict[str, np.ndarray]]
    batch_figures: list[dict[str, Any]]  # one row per batch with rows: realism figures
    sea_temperature: dict[str, dict[str, np.ndarray]]
    table_rows: list[dict[str, Any]]
    jobs: list[dict[str, Any]]
    sample: list[int]
    query_seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportSummary:
    path: Path
    bytes: int
    figures: tuple[str, ...]
    query_seconds: dict[str, float]
    build_seconds: float
    sample: tuple[int, ...]
    realism_figures: tuple[realism.RealismFigure, ...]


Conn = psycopg.Connection[Any]


def _rows(conn: Conn, query: str, params: Any = None) -> list[dict[str, Any]]:
    with conn.cursor() as cur:
        cur.execute(query, params)
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _columns(rows: list[dict[str, Any]], names: Sequence[str]) -> dict[str, np.ndarray]:
    return {n: np.asarray([r[n] for r in rows]) for n in names}


def load_run(conn: Conn) -> dict[str, Any]:
    rows = _rows(
        conn,
        "SELECT id, seed, as_of_date, scenario, created_at, status, plan_summary "
        "FROM run ORDER BY id LIMIT 1",
    )
    if not rows:
        raise LookupError("the database holds no run: run `aquasim run` (or `plan`) first")
    return rows[0]


def pick_sample(batches: list[dict[str, Any]], n: int) -> list[int]:
    """n batches with rows, evenly spread over their start dates (oldest and youngest in)."""
    candidates = sorted(
        (b for b in batches if b["has_rows"]), key=lambda b: (b["start_date"], b["id"])
    )
    if n <= 0 or not candidates:
        return []
    if n >= len(candidates):
        return [b["id"] for b in candidates]
    picks = np.unique(np.round(np.linspace(0, len(candidates) - 1, n)).astype(int))
    return [candidates[i]["id"] for i in picks]


SQL_BATCHES = """
SELECT b.id, b.geography_id, g.name AS geography, b.start_date, b.eggs, b.harvest_target_g,
       b.status, b.end_date, EXISTS (SELECT 1 FROM assignment a WHERE a.batch_id = b.id) AS has_rows
FROM batch b JOIN geography g ON g.id = b.geography_id
ORDER BY b.id
"""

SQL_CONTAINERS = """
SELECT c.id, c.name, coalesce(st.name, sa.name) AS site, c.sea_area_id IS NOT NULL AS at_sea,
       coalesce(st.geography_id, sa.geography_id) AS geography_id
FROM container c
LEFT JOIN hall h ON h.id = c.hall_id
LEFT JOIN station st ON st.id = h.station_id
LEFT JOIN sea_area sa ON sa.id = c.sea_area_id
ORDER BY c.sea_area_id IS NOT NULL, site, c.name
"""

SQL_ASSIGNMENTS = """
SELECT a.container_id, a.batch_id, a.stage_id, a.start_date,
       coalesce(a.end_date, %(as_of)s::date + 1) AS end_date, a.end_date IS NULL AS open
FROM assignment a
ORDER BY a.container_id, a.start_date
"""

SQL_CURVES = """
SELECT batch_id, state_date, sum(population) AS population, sum(biomass_kg) AS biomass_kg
FROM daily_assignment_state
WHERE batch_id = ANY(%(batches)s)
GROUP BY batch_id, state_date
ORDER BY batch_id, state_date
"""

# Per batch with rows, the figures of pipeline.realism.MEASURES (its flow CTEs, the same
# definitions as realism.gather), but sea deaths, sea feed and densities come from one scan of the
# daily state (its deaths and feed are the day's mortality and feeding rows summed).
SQL_BATCH_FIGURES = f"""
WITH {realism.flow_ctes(lambda _column: "TRUE")},
state AS (
    SELECT d.batch_id,
           sum(d.deaths) FILTER (WHERE a.at_sea) AS sea_deaths,
           sum(d.feed_kg) FILTER (WHERE a.at_sea) AS sea_feed_kg,
           max(d.biomass_kg / a.volume_m3) FILTER (WHERE a.at_sea) AS ring_kg_m3,
           max(d.biomass_kg / a.max_biomass_kg) FILTER (WHERE NOT a.at_sea) AS tank_load
      FROM daily_assignment_state d JOIN asg a ON a.id = d.assignment_id
     GROUP BY d.batch_id
)
SELECT b.id AS batch_id, g.name AS geography, b.status,
       100.0 * f.put_to_sea / nullif(f.eggs_placed, 0) AS freshwater_survival_pct,
       100.0 * coalesce(x.sea_deaths, 0) / nullif(f.put_to_sea, 0) AS sea_mortality_pct,
       x.sea_feed_kg / nullif(h.kg - f.stocked_kg, 0) AS sea_fcr,
       h.kg / nullif(h.n, 0) AS harvest_weight_kg,
       100.0 * (1000.0 * h.kg / nullif(h.n, 0)) / nullif(b.harvest_target_g, 0)
           AS harvest_weight_vs_target_pct,
       h.last_day - f.first_sea_day AS days_at_sea,
       x.ring_kg_m3 AS ring_density_kg_m3,
       r.largest_stocking AS ring_stocking_fish,
       100.0 * x.tank_load AS tank_load_pct
  FROM batch b
  JOIN geography g ON g.id = b.geography_id
  JOIN flows f ON f.batch_id = b.id
  LEFT JOIN rings r ON r.batch_id = b.id
  LEFT JOIN state x ON x.batch_id = b.id
  LEFT JOIN harvest h ON h.batch_id = b.id
 ORDER BY b.id
"""

SQL_SEA_TEMPERATURE = """
SELECT g.name AS geography, d.state_date, avg(d.temperature_c) AS mean_c,
       min(d.temperature_c) AS min_c, max(d.temperature_c) AS max_c
FROM daily_assignment_state d
JOIN container c ON c.id = d.container_id AND c.sea_area_id IS NOT NULL
JOIN sea_area sa ON sa.id = c.sea_area_id
JOIN geography g ON g.id = sa.geography_id
WHERE d.temperature_c IS NOT NULL
GROUP BY g.name, d.state_date
ORDER BY g.name, d.state_date
"""

# Statistics estimate per table, partitions summed into their parent.
SQL_TABLE_ESTIMATES = """
SELECT coalesce(parent.relname, c.relname) AS name,
       sum(greatest(c.reltuples, 0))::bigint AS reltuples,
       sum(coalesce(s.n_live_tup, 0))::bigint AS live
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = current_schema()
LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
LEFT JOIN pg_class parent ON parent.oid = i.inhparent
LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE c.relkind IN ('r', 'p')
GROUP BY 1
"""

SQL_LEDGER_ROWS = """
SELECT t.key AS name, sum(t.value::bigint) AS rows
FROM batch_job j, jsonb_each_text(j.rows_per_table) AS t
WHERE j.run_id = %(run)s AND j.state = 'succeeded'
GROUP BY t.key
"""

SQL_JOBS = """
SELECT batch_id, state, attempts, started_at, finished_at, rows_written, timings
FROM batch_job
WHERE run_id = %(run)s
ORDER BY finished_at NULLS LAST, batch_id
"""


def _table_rows(conn: Conn, run_id: int) -> list[dict[str, Any]]:
    estimates = {r["name"]: r for r in _rows(conn, SQL_TABLE_ESTIMATES)}
    ledger = {r["name"]: int(r["rows"]) for r in _rows(conn, SQL_LEDGER_ROWS, {"run": run_id})}
    out = []
    groups = (
        ("farm", FARM_TABLES),
        ("plan", PLAN_TABLES),
        ("batch", BATCH_TABLES),
        ("ledger", LEDGER_TABLES),
    )
    for group, names in groups:
        for name in names:
            if name not in estimates:
                continue
            estimate = max(int(estimates[name]["reltuples"]), int(estimates[name]["live"]))
            if name in ledger:
                rows, source = ledger[name], "ledger"
            elif estimate < SMALL_TABLE_ROWS:
                count = conn.execute(f'SELECT count(*) FROM "{name}"').fetchone()
                rows, source = int(count[0] if count else 0), "count"
            else:
                rows, source = estimate, "estimate"
            out.append({"table": name, "group": group, "rows": rows, "source": source})
    return out


def collect(conn: Conn, sample: int = 6) -> ReportData:
    """Everything the figures need, one set-based statement each."""
    seconds: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        began = time.perf_counter()
        result = fn()
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - began
        return result

    run = timed("run", lambda: load_run(conn))
    scenario = parse_scenario(run["scenario"])
    as_of = run["as_of_date"]
    batches = timed("batches", lambda: _rows(conn, SQL_BATCHES))
    containers = timed("occupancy", lambda: _rows(conn, SQL_CONTAINERS))
    assignments = timed(
        "occupancy",
        lambda: _columns(
            _rows(conn, SQL_ASSIGNMENTS, {"as_of": as_of}),
            ("container_id", "batch_id", "stage_id", "start_date", "end_date", "open"),
        ),
    )
    chosen = pick_sample(batches, sample)
    curve_rows = timed("growth", lambda: _rows(conn, SQL_CURVES, {"batches": chosen}))
    curves: dict[int, dict[str, np.ndarray]] = {}
    for batch_id in chosen:
        mine = [r for r in curve_rows if r["batch_id"] == batch_id]
        curves[batch_id] = _columns(mine, ("state_date", "population", "biomass_kg"))
    batch_figures = timed("realism", lambda: _rows(conn, SQL_BATCH_FIGURES))
    temperature_rows = timed("sea_temperature", lambda: _rows(conn, SQL_SEA_TEMPERATURE))
    sea_temperature = {
        geo: _columns(
            [r for r in temperature_rows if r["geography"] == geo],
            ("state_date", "mean_c", "min_c", "max_c"),
        )
        for geo in sorted({r["geography"] for r in temperature_rows})
    }
    table_rows = timed("table_rows", lambda: _table_rows(conn, run["id"]))
    jobs = timed("jobs", lambda: _rows(conn, SQL_JOBS, {"run": run["id"]}))
    conn.rollback()  # read-only: end the snapshot
    return ReportData(
        run=run,
        scenario=scenario,
        batches=batches,
        containers=containers,
        assignments=assignments,
        curves=curves,
        batch_figures=batch_figures,
        sea_temperature=sea_temperature,
        table_rows=table_rows,
        jobs=jobs,
        sample=chosen,
        query_seconds=seconds,
    )


# ---- derived figures --------------------------------------------------------------------


def realism_data(data: ReportData) -> realism.RealismData:
    """The per-batch figures and daily sea temperatures, as pipeline.realism judges them."""
    keys = {m.key for m in realism.MEASURES}
    batches = [
        realism.BatchFigures(
            int(r["batch_id"]),
            r["geography"],
            r["status"],
            {k: (None if r[k] is None else float(r[k])) for k in keys if k in r},
        )
        for r in data.batch_figures
    ]
    temperatures = {
        geo: [(d, float(m)) for d, m in zip(t["state_date"], t["mean_c"], strict=True)]
        for geo, t in data.sea_temperature.items()
    }
    return realism.RealismData(batches, temperatures)


def realism_figures(data: ReportData) -> list[realism.RealismFigure]:
    """Every measure the report computes, judged against its band (farm-model §6)."""
    have = data.batch_figures[0].keys() if data.batch_figures else ()
    computed = [m for m in realism.MEASURES if m.key in have]
    return realism.evaluate(realism_data(data), computed)


def expected_curve(
    scenario: Scenario, geography: str, start: date, eggs: int, target_g: float
) -> dict[str, np.ndarray]:
    """The growth model's nominal life of a batch, day by day from its start.

    Freshwater: each stage for its nominal length at its calibrated TGC and mid
    temperature (so it ends on the stage's weight out). Sea: the sea stage's TGC with
    the geography's seasonal sea temperature, until the harvest target or the stage's
    longest stay. Population: eggs × (1 − stage mean mortality) per day, less the
    handling loss at each transfer.
    """
    geo = next(g for g in scenario.geographies if g.name == geography)
    starts = stage_starts(scenario, start)
    weight = scenario.stages[0].weight_in_g
    population = float(eggs)
    weights, populations = [], []
    handling = scenario.husbandry.handling_loss_pct / 100.0
    for i, stage in enumerate(scenario.stages):
        if i:
            population *= 1.0 - handling
            weight = max(weight, stage.weight_in_g) if stage.at_sea else stage.weight_in_g
        survive = 1.0 - stage.mortality_pct_day / 100.0
        if stage.at_sea:
            tgc = stage.tgc or 0.0
            temps = sea_calendar_c(geo, starts[i], stage.days)
        else:
            tgc = calibrated_tgc(stage)
            lo, hi = stage.temperature_c or (0.0, 0.0)
            temps = np.full(stage.days, (lo + hi) / 2)
        for t in temps:
            weight = (weight ** (1 / 3) + tgc / 1000.0 * t) ** 3
            population *= survive
            weights.append(weight)
            populations.append(population)
            if stage.at_sea and weight >= target_g:
                break
    days = np.arange(len(weights))
    return {"day": days, "weight_g": np.asarray(weights), "population": np.asarray(populations)}


def occupancy_by_month(data: ReportData) -> tuple[list[str], list[str], np.ndarray]:
    """Share of container-days held, per site (rows) and calendar month (columns)."""
    a = data.assignments
    as_of = data.run["as_of_date"]
    if len(a["container_id"]) == 0:
        return [], [], np.zeros((0, 0))
    first = min(a["start_date"])
    first = date(first.year, first.month, 1)
    n_days = (as_of - first).days + 1
    site_of = {c["id"]: c["site"] for c in data.containers}
    sites = list(dict.fromkeys(c["site"] for c in data.containers))
    size = {s: 0 for s in sites}
    for c in data.containers:
        size[c["site"]] += 1
    index = {s: i for i, s in enumerate(sites)}
    held = np.zeros((len(sites), n_days + 1))
    for cid, start, end in zip(a["container_id"], a["start_date"], a["end_date"], strict=True):
        lo = max((start - first).days, 0)
        hi = min((end - first).days, n_days)
        if hi > lo:
            row = index[site_of[int(cid)]]
            held[row, lo] += 1
            held[row, hi] -= 1
    daily = np.cumsum(held, axis=1)[:, :n_days]
    months, edges, d = [], [], first
    while d <= as_of:
        months.append(d.strftime("%Y-%m"))
        edges.append((d - first).days)
        d = date(d.year + (d.month // 12), d.month % 12 + 1, 1)
    edges.append(n_days)
    z = np.zeros((len(sites), len(months)))
    for j in range(len(months)):
        span = daily[:, edges[j] : edges[j + 1]]
        z[:, j] = span.mean(axis=1) / np.array([size[s] for s in sites])
    return sites, months, z


# ---- figures ----------------------------------------------------------------------------


def _colour(batch_id: int) -> str:
    return PALETTE[batch_id % len(PALETTE)]


def _empty(fig: go.Figure, message: str) -> go.Figure:
    fig.add_annotation(text=message, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return fig


def fig_occupancy(data: ReportData) -> go.Figure:
    stage_name = {s.id: s.name for s in data.scenario.stages}
    a = data.assignments
    by_container: dict[int, list[int]] = {}
    for i, cid in enumerate(a["container_id"]):
        by_container.setdefault(int(cid), []).append(i)
    sites: dict[str, list[dict[str, Any]]] = {}
    for c in data.containers:
        sites.setdefault(c["site"], []).append(c)
    fig = go.Figure()
    buttons, heights = [], []
    as_of = data.run["as_of_date"]
    first = min(a["start_date"]) if len(a["start_date"]) else as_of
    for k, (site, containers) in enumerate(sites.items()):
        names, base, width, colours, hover, labels = [], [], [], [], [], []
        held_days = 0
        for c in containers:
            for i in by_container.get(c["id"], ()):
                start, end, batch = a["start_date"][i], a["end_date"][i], int(a["batch_id"][i])
                days = (end - start).days
                held_days += days
                names.append(c["name"])
                base.append(start.isoformat())
                width.append(days * MS_PER_DAY)
                colours.append(_colour(batch))
                labels.append(str(batch))
                until = "open" if a["open"][i] else (end - timedelta(days=1)).isoformat()
                hover.append(
                    f"{c['name']}<br>batch {batch} · {stage_name[int(a['stage_id'][i])]}"
                    f"<br>{start.isoformat()} → {until} ({days} d)"
                )
        span = max((as_of - first).days + 1, 1)
        share = held_days / (span * len(containers))
        label = f"{site} ({'sea area' if containers[0]['at_sea'] else 'station'}, {share:.0%})"
        fig.add_trace(
            go.Bar(
                y=names,
                x=np.asarray(width, dtype=np.int64),
                base=base,
                orientation="h",
                marker={"color": colours, "line": {"width": 0}},
                text=labels,
                textposition="inside",
                insidetextanchor="middle",
                textangle=0,
                textfont={"size": 9, "color": "white"},
                hovertext=hover,
                hoverinfo="text",
                name=site,
                visible=k == 0,
                showlegend=False,
            )
        )
        order = [c["name"] for c in containers]
        height = max(320, ROW_PX * len(order) + 150)
        heights.append(height)
        buttons.append(
            {
                "label": label,
                "method": "update",
                "args": [
                    {"visible": [j == k for j in range(len(sites))]},
                    {
                        "yaxis.categoryarray": order,
                        "yaxis.autorange": "reversed",
                        "height": height,
                        "title.text": f"Container occupancy — {label}",
                    },
                ],
            }
        )
    if not sites:
        return _empty(go.Figure(layout={"template": TEMPLATE}), "no containers")
    first_site = next(iter(sites))
    fig.update_layout(
        template=TEMPLATE,
        title={"text": buttons[0]["args"][1]["title.text"]},
        height=heights[0],
        bargap=0.15,
        uniformtext={"minsize": 7, "mode": "hide"},
        margin={"l": 140, "r": 30, "t": 90, "b": 50},
        xaxis={"type": "date", "title": "date", "range": [first.isoformat(), as_of.isoformat()]},
        yaxis={
            "type": "category",
            "categoryorder": "array",
            "categoryarray": [c["name"] for c in sites[first_site]],
            "autorange": "reversed",
            "title": None,
        },
        updatemenus=[
            {
                "buttons": buttons,
                "direction": "down",
                "x": 1.0,
                "xanchor": "right",
                "y": 1.0,
                "yanchor": "bottom",
                "pad": {"b": 10},
                "showactive": True,
            }
        ],
    )
    fig.add_vline(x=as_of.isoformat(), line={"dash": "dot", "color": "#444", "width": 1})
    return fig


def fig_occupancy_heatmap(data: ReportData) -> go.Figure:
    sites, months, z = occupancy_by_month(data)
    fig = go.Figure(layout={"template": TEMPLATE})
    if not sites:
        return _empty(fig, "no assignments")
    fig.add_trace(
        go.Heatmap(
            z=np.round(100 * z, 1),
            x=months,
            y=sites,
            colorscale="Blues",
            zmin=0,
            zmax=100,
            colorbar={"title": {"text": "% held"}},
            hovertemplate="%{y} %{x}: %{z:.0f} % of container-days held<extra></extra>",
        )
    )
    fig.update_layout(
        title="Occupancy per site and month (share of container-days held by a batch)",
        height=max(300, 18 * len(sites) + 160),
        margin={"l": 100, "r": 30, "t": 60, "b": 60},
        yaxis={"autorange": "reversed", "type": "category"},
    )
    return fig


def fig_growth(data: ReportData) -> go.Figure:
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,
        subplot_titles=(
            "Population (millions) — solid: stored daily state, dashed: growth model",
            "Mean weight (g, log scale)",
        ),
    )
    batches = {b["id"]: b for b in data.batches}
    for batch_id in data.sample:
        b = batches[batch_id]
        colour = _colour(batch_id)
        curve = data.curves.get(batch_id)
        name = f"batch {batch_id} ({b['geography']}, {b['start_date']:%b %Y})"
        model = expected_curve(
            data.scenario, b["geography"], b["start_date"], b["eggs"], b["harvest_target_g"]
        )
        if curve is not None and len(curve["state_date"]):
            day = np.asarray([(d - b["start_date"]).days for d in curve["state_date"]])
            population = curve["population"].astype(float)
            with np.errstate(divide="ignore", invalid="ignore"):
                weight = np.where(
                    population > 0, 1000.0 * curve["biomass_kg"].astype(float) / population, np.nan
                )
            dates = [d.isoformat() for d in curve["state_date"]]
            fig.add_trace(
                go.Scatter(
                    x=day, y=np.round(population / 1e6, 5), mode="lines", name=name,
                    legendgroup=str(batch_id), line={"color": colour, "width": 2},
                    customdata=dates,
                    hovertemplate="%{customdata} (day %{x}): %{y:.3f} M fish<extra>"
                    + name + "</extra>",
                ),
                row=1, col=1,
            )  # fmt: skip
            fig.add_trace(
                go.Scatter(
                    x=day, y=np.round(weight, 3), mode="lines", name=name,
                    legendgroup=str(batch_id), showlegend=False,
                    line={"color": colour, "width": 2}, customdata=dates,
                    hovertemplate="%{customdata} (day %{x}): %{y:.1f} g<extra>"
                    + name + "</extra>",
                ),
                row=2, col=1,
            )  # fmt: skip
        for row, y, fmt in (
            (1, np.round(model["population"] / 1e6, 5), "%{y:.3f} M fish"),
            (2, np.round(model["weight_g"], 3), "%{y:.1f} g"),
        ):
            fig.add_trace(
                go.Scatter(
                    x=model["day"], y=y, mode="lines", name=f"model, batch {batch_id}",
                    legendgroup=str(batch_id), showlegend=False,
                    line={"color": colour, "width": 1.2, "dash": "dash"},
                    hovertemplate=f"model, day %{{x}}: {fmt}<extra>batch {batch_id}</extra>",
                ),
                row=row, col=1,
            )  # fmt: skip
    stage_day = 0
    for stage in data.scenario.freshwater_stages:
        stage_day += stage.days
        fig.add_vline(x=stage_day, line={"color": "#bbb", "width": 1, "dash": "dot"})
    if not data.sample:
        _empty(fig, "no batch has rows yet")
    fig.update_yaxes(title_text="fish (M)", row=1, col=1)
    fig.update_yaxes(type="log", title_text="g", row=2, col=1)
    fig.update_xaxes(title_text="day of the batch's life (dotted: nominal stage ends)", row=2)
    fig.update_layout(
        template=TEMPLATE,
        title="Population and mean weight of sampled batches against the growth model",
        height=820,
        margin={"l": 70, "r": 30, "t": 90, "b": 60},
        legend={"orientation": "h", "y": -0.08},
        hovermode="closest",
    )
    return fig


def fig_realism(data: ReportData, figures: Sequence[realism.RealismFigure]) -> go.Figure:
    by_key = {f.key: f for f in figures}
    measures = {m.key: m for m in realism.MEASURES}
    keys = [k for k in HISTOGRAM_KEYS if k in measures]
    harvested = [r for r in data.batch_figures if r["status"] == "harvested"]
    titles = []
    for key in keys:
        f = by_key.get(key)
        if f is None or f.median is None:
            titles.append(f"{measures[key].label}<br>no harvested batch yet")
        else:
            verdict = "PASS" if f.passed else "FAIL"
            titles.append(
                f"{measures[key].label}<br>median {f.median:.3g} · "
                f"{f.share_inside or 0:.0%} inside · {verdict}"
            )
    cols = 3
    rows = max(1, math.ceil(len(keys) / cols))
    fig = make_subplots(
        rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.06,
        vertical_spacing=0.28,
    )  # fmt: skip
    for i, key in enumerate(keys):
        row, col = i // cols + 1, i % cols + 1
        band = measures[key].band
        values = np.asarray([float(r[key]) for r in harvested if r[key] is not None], dtype=float)
        values = values[np.isfinite(values)]
        lo = band.low if band.low is not None else (values.min() if values.size else 0.0)
        hi = band.high if band.high is not None else (values.max() if values.size else 1.0)
        fig.add_vrect(
            x0=lo, x1=hi, fillcolor="#2ca02c", opacity=0.15, line_width=0, row=row, col=col
        )
        if values.size:
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
            size = (hi - lo) / 30 or 1.0  # bins fixed on the axis range: shapes comparable
            fig.add_trace(
                go.Histogram(
                    x=np.round(values, 4), marker={"color": "#1f77b4"}, name=measures[key].label,
                    showlegend=False, xbins={"start": lo - size, "end": hi + size, "size": size},
                    hovertemplate="%{x}: %{y} batches<extra></extra>",
                ),
                row=row, col=col,
            )  # fmt: skip
            median = float(np.median(values))
            fig.add_vline(x=median, line={"color": "#d62728", "width": 2}, row=row, col=col)
        else:
            fig.add_trace(
                go.Scatter(x=[lo, hi], y=[0, 0], mode="markers", marker={"opacity": 0},
                           showlegend=False, hoverinfo="skip"),
                row=row, col=col,
            )  # fmt: skip
        pad = 0.1 * (hi - lo) or 1.0
        fig.update_xaxes(range=[lo - pad, hi + pad], title_text=f"band {band}", row=row, col=col)
        if col == 1:
            fig.update_yaxes(title_text="batches", row=row, col=col)
    fig.update_layout(
        template=TEMPLATE,
        title=(
            f"Realism over {len(harvested)} harvested batches — green: band (farm-model §6), "
            "red: median"
        ),
        height=330 * rows + 120,
        margin={"l": 60, "r": 30, "t": 120, "b": 60},
        bargap=0.05,
    )
    fig.update_annotations(font_size=11)
    return fig


def fig_sea_temperature(data: ReportData) -> go.Figure:
    fig = go.Figure(layout={"template": TEMPLATE})
    if not data.sea_temperature:
        return _empty(fig, "no sea-stage daily state yet")
    for k, (geo, t) in enumerate(data.sea_temperature.items()):
        colour = GEO_COLOURS[k % len(GEO_COLOURS)]
        dates = [d.isoformat() for d in t["state_date"]]
        fig.add_trace(
            go.Scatter(
                x=dates, y=np.round(t["max_c"].astype(float), 3), mode="lines",
                line={"width": 0}, legendgroup=geo, showlegend=False, hoverinfo="skip",
            )
        )  # fmt: skip
        fig.add_trace(
            go.Scatter(
                x=dates, y=np.round(t["min_c"].astype(float), 3), mode="lines",
                line={"width": 0}, fill="tonexty", fillcolor=_rgba(colour, 0.2),
                legendgroup=geo, name=f"{geo}: min–max over rings", hoverinfo="skip",
            )
        )  # fmt: skip
        fig.add_trace(
            go.Scatter(
                x=dates, y=np.round(t["mean_c"].astype(float), 3), mode="lines",
                line={"color": colour, "width": 1.5}, legendgroup=geo,
                name=f"{geo}: daily mean of rings",
                hovertemplate="%{x}: %{y:.2f} °C<extra>" + geo + "</extra>",
            )
        )  # fmt: skip
        spec = next((g for g in data.scenario.geographies if g.name == geo), None)
        if spec is not None and dates:
            first = t["state_date"][0]
            span = (t["state_date"][-1] - first).days + 1
            seasonal = sea_calendar_c(spec, first, span)
            fig.add_trace(
                go.Scatter(
                    x=[(first + timedelta(days=i)).isoformat() for i in range(span)],
                    y=np.round(seasonal, 3), mode="lines", legendgroup=geo,
                    line={"color": colour, "width": 1, "dash": "dash"},
                    name=f"{geo}: scenario's seasonal curve", hoverinfo="skip",
                )
            )  # fmt: skip
        band = realism.temperature_band(geo)
        for level in (band.low, band.high):
            if level is None:
                continue
            label = (
                {"annotation_text": f"{geo} band {band}", "annotation_position": "top left",
                 "annotation_font_color": colour}
                if level == band.high else {}
            )  # fmt: skip
            fig.add_hline(y=level, line={"color": colour, "width": 1, "dash": "dot"}, **label)
    fig.update_layout(
        title="Sea temperature per geography (daily state of sea rings)",
        height=460,
        yaxis_title="°C",
        margin={"l": 60, "r": 30, "t": 60, "b": 50},
        legend={"orientation": "h", "y": -0.15},
    )
    return fig


def _rgba(hex_colour: str, alpha: float) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def fig_table_rows(data: ReportData) -> go.Figure:
    rows = sorted(data.table_rows, key=lambda r: r["rows"])
    colours = {"farm": "#7f7f7f", "plan": "#9467bd", "batch": "#1f77b4", "ledger": "#ff7f0e"}
    fig = go.Figure(layout={"template": TEMPLATE})
    for group, colour in colours.items():
        mine = [r for r in rows if r["group"] == group]
        if not mine:
            continue
        fig.add_trace(
            go.Bar(
                y=[r["table"] for r in mine],
                x=[max(r["rows"], 0.9) for r in mine],
                orientation="h",
                name=group,
                marker={"color": colour},
                text=[f"{'≈' if r['source'] == 'estimate' else ''}{r['rows']:,}" for r in mine],
                textposition="outside",
                customdata=[r["source"] for r in mine],
                hovertemplate="%{y}: %{text} rows (%{customdata})<extra></extra>",
            )
        )
    total = sum(r["rows"] for r in rows)
    fig.update_layout(
        title=f"Rows per table ({total:,} in all; ≈ = statistics estimate)",
        height=max(320, 24 * len(rows) + 120),
        xaxis={"type": "log", "title": "rows (log scale)", "dtick": 1},
        yaxis={"categoryorder": "array", "categoryarray": [r["table"] for r in rows]},
        margin={"l": 170, "r": 80, "t": 60, "b": 50},
        legend={"orientation": "h", "y": 1.02, "x": 1, "xanchor": "right", "yanchor": "bottom"},
    )
    return fig


def fig_jobs(data: ReportData) -> go.Figure:
    done = [
        j for j in data.jobs if j["started_at"] and j["finished_at"] and j["state"] == "succeeded"
    ]
    failed = sum(1 for j in data.jobs if j["state"] == "failed")
    fig = make_subplots(
        rows=1,
        cols=3,
        column_widths=[0.25, 0.4, 0.35],
        horizontal_spacing=0.07,
        subplot_titles=(
            "Job wall time (s)",
            "Seconds per phase, by batch",
            "Rows written over the run",
        ),
    )
    if not done:
        return _empty(fig.update_layout(template=TEMPLATE, height=420), "no finished job yet")
    wall = np.asarray([(j["finished_at"] - j["started_at"]).total_seconds() for j in done])
    fig.add_trace(
        go.Histogram(x=np.round(wall, 3), marker={"color": "#1f77b4"}, showlegend=False,
                     nbinsx=min(40, max(5, len(wall))),
                     hovertemplate="%{x} s: %{y} jobs<extra></extra>"),
        row=1, col=1,
    )  # fmt: skip
    by_batch = sorted(done, key=lambda j: j["batch_id"])
    labels = [str(j["batch_id"]) for j in by_batch]
    phases = ("engine", "assimilation", "write")
    colours = ("#2ca02c", "#9467bd", "#ff7f0e", "#7f7f7f")
    for phase, colour in zip(phases, colours, strict=False):
        fig.add_trace(
            go.Bar(
                x=labels,
                y=[round(float((j["timings"] or {}).get(phase, 0.0)), 4) for j in by_batch],
                name=phase, marker={"color": colour},
                hovertemplate="batch %{x}: %{y:.2f} s " + phase + "<extra></extra>",
            ),
            row=1, col=2,
        )  # fmt: skip
    other = [
        max((j["finished_at"] - j["started_at"]).total_seconds()
            - sum(float(v) for v in (j["timings"] or {}).values()), 0.0)
        for j in by_batch
    ]  # fmt: skip
    fig.add_trace(
        go.Bar(x=labels, y=np.round(other, 4), name="other (ledger, connect)",
               marker={"color": colours[3]},
               hovertemplate="batch %{x}: %{y:.2f} s other<extra></extra>"),
        row=1, col=2,
    )  # fmt: skip
    ordered = sorted(done, key=lambda j: j["finished_at"])
    begin = min(j["started_at"] for j in done)
    times = [begin.isoformat()] + [j["finished_at"].isoformat() for j in ordered]
    cumulative = np.concatenate([[0], np.cumsum([j["rows_written"] or 0 for j in ordered])])
    elapsed = (ordered[-1]["finished_at"] - begin).total_seconds()
    rate = cumulative[-1] / elapsed if elapsed > 0 else float("nan")
    fig.add_trace(
        go.Scatter(
            x=times, y=cumulative, mode="lines+markers", line={"shape": "hv", "color": "#1f77b4"},
            marker={"size": 4}, name="rows written", showlegend=False,
            hovertemplate="%{x}: %{y:,} rows<extra></extra>",
        ),
        row=1, col=3,
    )  # fmt: skip
    fig.update_xaxes(title_text="seconds", row=1, col=1)
    fig.update_yaxes(title_text="jobs", row=1, col=1)
    fig.update_xaxes(title_text="batch", type="category", row=1, col=2)
    fig.update_yaxes(title_text="seconds", row=1, col=2)
    fig.update_xaxes(title_text="finished at", row=1, col=3)
    fig.update_yaxes(title_text="rows (cumulative)", row=1, col=3)
    fig.update_layout(
        template=TEMPLATE,
        barmode="stack",
        title=(
            f"Jobs: {len(done)} succeeded, {failed} failed; median wall "
            f"{np.median(wall):.1f} s; {cumulative[-1]:,} rows in {elapsed:.0f} s "
            f"({rate:,.0f} rows/s over the run)"
        ),
        height=440,
        margin={"l": 60, "r": 30, "t": 100, "b": 60},
        legend={"orientation": "h", "y": -0.2, "x": 0.3},
    )
    return fig


# ---- the page ---------------------------------------------------------------------------

SECTIONS = (
    ("fig-occupancy", "Container occupancy",
     "One row per holding container of the chosen site (dropdown: every station and sea "
     "area, with its share of container-days held since the first assignment), one bar per "
     "assignment coloured by batch; hover for batch, stage and dates. Dotted: the as-of date."),
    ("fig-occupancy-heatmap", "Occupancy of the whole farm",
     "The aggregate view: for each site and month, the share of its container-days held by a "
     "batch."),
    ("fig-growth", "Population and weight against the growth model",
     "A sample of batches evenly spread over their start dates (--sample). Solid: the stored "
     "daily state summed per batch and day (weight = biomass ÷ population). Dashed: the growth "
     "model's nominal curve — calibrated TGC at each freshwater stage's mid temperature for its "
     "nominal length, then the sea TGC with the geography's seasonal sea temperature up to the "
     "batch's harvest target; population from the eggs at each stage's mean mortality less the "
     "handling loss per transfer."),
    ("fig-realism", "Survival and FCR against the realism bands",
     "One value per harvested batch. Freshwater survival = fish put to sea ÷ eggs; sea-phase "
     "mortality = sea deaths ÷ fish put to sea; economic FCR = sea feed ÷ (harvested biomass − "
     "biomass put to sea); harvest weight = harvested biomass ÷ fish; days at sea = first sea "
     "transfer to last harvest. A band holds when the median and ≥ 90 % of batches lie inside."),
    ("fig-sea-temperature", "Sea temperature",
     "Daily mean over the occupied rings of each geography of their daily mean written "
     "temperature, the spread between rings, the scenario's seasonal curve and the band."),
    ("fig-table-rows", "Volumes",
     "Rows per table: batch tables from the ledger's exact per-batch counts, small tables by "
     "count(*), otherwise the statistics estimate."),
    ("fig-jobs", "Job timings",
     "From the batch_job ledger: wall time per job, engine / assimilation / write seconds per "
     "batch, and rows written cumulated over the jobs' finish times."),
)  # fmt: skip

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1400px; padding: 16px 24px; color: #222; }
h1 { margin-bottom: 4px; } h2 { margin: 28px 0 4px; border-bottom: 1px solid #ddd; }
p.caption { color: #555; margin: 4px 0 8px; max-width: 1100px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 14px; }
td, th { border: 1px solid #ddd; padding: 3px 10px; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
.pass { color: #1a7f37; font-weight: 600; } .fail { color: #c62828; font-weight: 600; }
.muted { color: #777; }
"""


def _summary_html(data: ReportData, figures: Sequence[realism.RealismFigure]) -> str:
    run = data.run
    batches = data.batches
    status = {s: sum(1 for b in batches if b["status"] == s) for s in ("harvested", "active")}
    with_rows = sum(1 for b in batches if b["has_rows"])
    total_rows = sum(r["rows"] for r in data.table_rows)
    facts = [
        ("scenario", data.scenario.name),
        ("run", f"{run['id']} (seed {run['seed']}, status {run['status']})"),
        ("as-of date", run["as_of_date"].isoformat()),
        ("batches", f"{len(batches)} planned, {with_rows} with rows: "
                    f"{status['harvested']} harvested, {status['active']} active"),
        ("rows", f"{total_rows:,}"),
        ("generated", datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")),
    ]  # fmt: skip
    head = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts
    )
    rows = []
    for f in figures:
        if not f.judged:
            continue
        if f.median is None:
            cells = ("–", "–", str(f.batches), '<span class="muted">nothing to judge</span>')
        else:
            verdict = (
                '<span class="pass">pass</span>' if f.passed else '<span class="fail">FAIL</span>'
            )
            share = "–" if f.share_inside is None else f"{f.share_inside:.0%}"
            per = {"batch": "batches", "day": "days"}.get(f.per, f.per)
            cells = (f"{f.median:,.4g}", share, f"{f.batches} {per}", verdict)
        rows.append(
            f"<tr><td>{html.escape(f.measure)}</td><td>{html.escape(str(f.band))}</td>"
            + "".join(f"<td>{c}</td>" for c in cells)
            + "</tr>"
        )
    table = (
        "<table><tr><th>measure</th><th>band</th><th>median</th><th>inside</th>"
        "<th>judged</th><th>verdict</th></tr>" + "".join(rows) + "</table>"
    )
    note = (
        '<p class="caption">Bands of farm-model §6 as judged by <code>pipeline.realism</code> '
        "(the median and ≥ 90 % of the items inside). Survival, mortality, FCR, harvest weight "
        "and days at sea over harvested batches; densities over every batch with rows; sea "
        "temperature over the daily means of each geography's rings.</p>"
    )
    return f"<table>{head}</table>\n<h2>Realism bands</h2>\n{note}\n{table}"


def build_figures(
    data: ReportData, figures: Sequence[realism.RealismFigure] | None = None
) -> dict[str, go.Figure]:
    judged = realism_figures(data) if figures is None else figures
    return {
        "fig-occupancy": fig_occupancy(data),
        "fig-occupancy-heatmap": fig_occupancy_heatmap(data),
        "fig-growth": fig_growth(data),
        "fig-realism": fig_realism(data, judged),
        "fig-sea-temperature": fig_sea_temperature(data),
        "fig-table-rows": fig_table_rows(data),
        "fig-jobs": fig_jobs(data),
    }


def render_html(
    data: ReportData,
    figures: dict[str, go.Figure],
    judged: Sequence[realism.RealismFigure] | None = None,
) -> str:
    """One page: plotly.js inlined once in the head, then a section per figure."""
    judged = realism_figures(data) if judged is None else judged
    config = {"displaylogo": False, "responsive": True}
    parts = []
    for div_id, title, caption in SECTIONS:
        fig = figures[div_id]
        height = fig.layout.height or 450
        div = pio.to_html(
            fig,
            config=config,
            include_plotlyjs=False,
            full_html=False,
            div_id=div_id,
            default_height=f"{height}px",
        )
        parts.append(
            f"<section><h2>{html.escape(title)}</h2>"
            f'<p class="caption">{html.escape(caption)}</p>\n{div}</section>'
        )
    title = f"aquasim report — {data.scenario.name}, as of {data.run['as_of_date']:%Y-%m-%d}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style>\n"
        f'<script type="text/javascript">{get_plotlyjs()}</script>\n'
        "</head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n{_summary_html(data, judged)}\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )


def write_report(conn: Conn, out: Path, sample: int = 6) -> ReportSummary:
    """Query, plot and write the report to `out`; returns what was written and how fast."""
    began = time.perf_counter()
    data = collect(conn, sample)
    judged = realism_figures(data)
    page = render_html(data, build_figures(data, judged), judged)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return ReportSummary(
        path=out,
        bytes=out.stat().st_size,
        figures=FIGURE_IDS,
        query_seconds=dict(data.query_seconds),
        build_seconds=time.perf_counter() - began,
        sample=tuple(data.sample),
        realism_figures=tuple(judged),
    )
