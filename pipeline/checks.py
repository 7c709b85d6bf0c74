"""Set-based SQL checks of the data invariants (invariants.md, I-1 … I-17).

Each check reads the stored rows only (never the engine's memory), in one SQL
statement built from CTEs, and returns a `CheckResult`: rows examined,
violations and up to ten example offenders as JSON-ready dicts. There is no
per-row Python: every check is a handful of GROUP BY aggregates, window
functions and hash joins against the small tables (assignment, transfer_action,
sensor, run). The big tables (environmental_reading above all) are read in one
pass per check, aggregated first and joined afterwards, never probed per row by a
correlated subquery.

`batch_ids` restricts a check to those batches (`batch_id = ANY(…)` on every
table it reads); None means every batch. Dates follow the half-open convention
of the data contract: an assignment covers `[start_date, end_date)`, an open
one (`end_date` NULL) ends at the run's as-of date + 1, and a timestamp's date
is its UTC date.

I-18 (determinism), I-19 (idempotent jobs) and I-20 (plausibility) are at the end:
they read the run ledger (`batch_job`) besides the rows, re-simulate batches in-process
or judge the realism bands (pipeline.realism). They are registered in `JOB_CHECKS`;
`CHECKS` keeps the set-based SQL checks I-1 … I-17 and `INVARIANTS` holds all twenty.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from typing import Any

import psycopg

EXAMPLES = 10
OPENING_WEIGHT_RTOL = 1e-9  # a receipt's weight mixes in exactly (I-11, I-13)
GROWTH_RTOL = 0.01  # day-to-day growth within 1 % of the model (I-13)

# Every table whose rows are scoped to an assignment, with the UTC date of a row.
DATED_TABLES: dict[str, str] = {
    "mortality_event": "event_date",
    "feeding_event": "(fed_at AT TIME ZONE 'UTC')::date",
    "environmental_reading": "(reading_time AT TIME ZONE 'UTC')::date",
    "growth_sample": "sample_date",
    "lice_count": "count_date",
    "treatment": "treatment_date",
    "harvest_event": "harvest_date",
    "daily_assignment_state": "state_date",
}
# The same tables for range filters: the raw column (timestamps compared with a
# timestamptz bound, so partitions can be pruned and no per-row cast is needed).
_DATE_COLUMNS: dict[str, tuple[str, bool]] = {
    "mortality_event": ("event_date", False),
    "feeding_event": ("fed_at", True),
    "environmental_reading": ("reading_time", True),
    "growth_sample": ("sample_date", False),
    "lice_count": ("count_date", False),
    "treatment": ("treatment_date", False),
    "harvest_event": ("harvest_date", False),
    "daily_assignment_state": ("state_date", False),
    "transfer_action": ("transfer_date", False),
}

Connection = psycopg.Connection[Any]


@dataclass(frozen=True)
class CheckResult:
    invariant: str
    rows_examined: int
    violations: int
    examples: list[dict[str, Any]]
    seconds: float
    note: str = ""  # what was examined when not everything was (I-18, I-19 samples)

    @property
    def passed(self) -> bool:
        return self.violations == 0


@dataclass(frozen=True)
class RunContext:
    """What the checks need to know of the run: read from the `run` row and the farm."""

    run_id: int
    as_of: date
    readings_per_day: int
    transfer_window_days: int
    stage_offsets: tuple[int, ...]  # day of each stage's start counted from the batch start
    egg_weight_g: float
    temperature_parameter_id: int

    @property
    def open_end(self) -> date:
        """Where an open assignment's half-open range ends."""
        return self.as_of + timedelta(days=1)

    @property
    def future_from(self) -> datetime:
        """The first instant (UTC) after the as-of date."""
        return datetime.combine(self.open_end, dtime(0), tzinfo=UTC)


def readings_per_day(readings: dict[str, Any]) -> int:
    """The scenario's readings per sensor per day, from `run.scenario -> 'readings'`."""
    interval = readings.get("interval_minutes")
    if interval:
        return 1440 // int(interval)
    return len(readings["hours"])


def run_context(conn: Connection) -> RunContext:
    row = conn.execute(
        "SELECT id, as_of_date, scenario FROM run ORDER BY id LIMIT 1", prepare=False
    ).fetchone()
    if row is None:
        raise LookupError("the database holds no run")
    run_id, as_of, scenario = row
    offsets, day = [], 0
    for stage in scenario["stages"]:
        offsets.append(day)
        day += int(stage["days"])
    temperature = conn.execute(
        "SELECT id FROM parameter WHERE name = 'Temperature'", prepare=False
    ).fetchone()
    return RunContext(
        run_id=run_id,
        as_of=as_of,
        readings_per_day=readings_per_day(scenario["readings"]),
        transfer_window_days=int(scenario["husbandry"]["transfer_window_days"]),
        stage_offsets=tuple(offsets),
        egg_weight_g=float(scenario["stages"][0]["weight_in_g"]),
        temperature_parameter_id=temperature[0] if temperature else -1,
    )


class _Scope:
    """The batch restriction: `column = ANY(batches)`, or TRUE for every batch."""

    def __init__(self, batch_ids: Iterable[int] | None) -> None:
        self.ids = None if batch_ids is None else sorted({int(b) for b in batch_ids})

    def __call__(self, column: str) -> str:
        return "TRUE" if self.ids is None else f"{column} = ANY(%(batches)s::bigint[])"


def _params(ctx: RunContext, scope: _Scope, **extra: Any) -> dict[str, Any]:
    return {
        "batches": scope.ids,
        "as_of": ctx.as_of,
        "open_end": ctx.open_end,
        "future_from": ctx.future_from,
        **extra,
    }


def _result_sql(examined: str, order: str, violations: str = "SELECT count(*) FROM bad") -> str:
    """The closing SELECT every check shares: counts and the first examples of `bad`."""
    return f"""
SELECT coalesce(({examined}), 0)::bigint AS examined,
       coalesce(({violations}), 0)::bigint AS violations,
       (SELECT coalesce(jsonb_agg(to_jsonb(e)), '[]'::jsonb)
          FROM (SELECT * FROM bad ORDER BY {order} LIMIT {EXAMPLES}) e) AS examples"""


def _run(
    conn: Connection,
    invariant: str,
    query: str,
    params: dict[str, Any],
    began: float,
) -> CheckResult:
    row = conn.execute(query, params, prepare=False).fetchone()  # type: ignore[arg-type]
    assert row is not None
    examined, violations, examples = row
    return CheckResult(
        invariant, int(examined), int(violations), list(examples), time.perf_counter() - began
    )


def _context(conn: Connection, batch_ids: Iterable[int] | None) -> tuple[RunContext, _Scope]:
    return run_context(conn), _Scope(batch_ids)


def _asg_cte(scope: _Scope) -> str:
    """The scoped assignments with their effective half-open end."""
    return f"""
asg AS (
    SELECT a.id, a.batch_id, a.container_id, a.stage_id, a.start_date, a.tgc,
           a.end_date IS NULL AS is_open,
           coalesce(a.end_date, %(open_end)s::date) AS end_date
      FROM assignment a
     WHERE {scope("a.batch_id")}
)"""


# ---- I-1 … I-5: where the batches are ---------------------------------------------------------


def check_I_1(conn: Connection, batch_ids: list[int] | None) -> CheckResult:
    """Container exclusivity: no two assignments (nor two reservations) of one container
    overlap; `daterange(start, NULL)` is open above, exactly as the exclusion constraint."""
    began = time.perf_counter()
    ctx, scope = _context(conn, batch_ids)
    pairs = []
    for kind, table in (("assignment", "assignment"), ("reservation", "container_reservation")):
        pairs.append(f"""
    SELECT '{kind}' AS kind, x.container_id,
           x.id AS first_id, x.batch_id AS first_batch, x.start_date AS first_start,
           x.end_date AS first_end,
           y.id AS second_id, y.batch_id AS second_batch, y.start_date AS second_start,
           y.end_date AS second_end
      FROM {table} x
      JOIN {table} y
        ON y.container_id = x.container_id AND x.id < y.id
       AND daterange(x.start_date, x.end_date) && daterange(y.start_date, y.end_date)
     WHERE {scope("x.batch_id")} OR {scope("y.batch_id")}""")
    closing = _result_sql(
        f"SELECT (SELECT count(*) FROM assignment WHERE {scope('batch_id')})"
        f" + (SELECT count(*) FROM container_reservation WHERE {scope('batch_id')})",
        "kind, container_id, first_start",
    )
    query = f"""
WITH bad AS ({" UNION ALL ".join(pairs)})
{closing}"""
    return _run(conn, "I-1", query, _params(ctx, scope), began)


def check_I_2(conn: Connection, batch_ids: list[int] | None) -> CheckResult:
    """Plan fidelity: each assignment lies inside a reservation of its batch, container and
    stage (an open assignment runs to the as-of date + 1)."""
    began = time.perf_counter()
    ctx, scope = _context(conn, batch_ids)
    query = f"""
WITH {_asg_cte(scope)},
bad AS (
    SELECT a.id AS assignment_id, a.batch_id, a.container_id, a.stage_id,
           a.start_date, a.end_date,
           (SELECT jsonb_agg(jsonb_build_object(
                       'stage_id', r.stage_id, 'start_date', r.start_date, 'end_date', r.end_date))
              FROM container_reservation r
             WHERE r.batch_id = a.batch_id AND r.container_id = a.container_id
           ) AS reservations_of_container
      FROM asg a
     WHERE NOT EXISTS (
               SELECT 1
                 FROM container_reservation r
                WHERE r.batch_id = a.batch_id
                  AND r.container_id = a.container_id
                  AND r.stage_id = a.stage_id
                  AND r.start_date <= a.start_date
                  AND a.end_date <= r.end_date)
)
{_result_sql("SELECT count(*) FROM asg", "batch_id, assignment_id")}"""
    return _run(conn, "I-2", query, _params(ctx, scope), began)


def check_I_3(conn: Connection, batch_ids: list[int] | None) -> CheckResult:
    """Geography: every container a batch reserves or occupies lies in the batch's
    geography (hall → station → geography, or sea area → geography); its rings lie in
    one sea area."""
    began = time.perf_counter()
    ctx, scope = _context(conn, batch_ids)
    query = f"""
WITH place AS (
    SELECT c.id AS container_id, c.sea_area_id,
           coalesce(st.geography_id, sa.geography_id) AS geography_id
      FROM container c
      LEFT JOIN hall h ON h.id = c.hall_id
      LEFT JOIN station st ON st.id = h.station_id
      LEFT JOIN sea_area sa ON sa.id = c.sea_area_id
),
used AS (
    SELECT 'assignment' AS kind, id AS row_id, batch_id, container_id
      FROM assignment WHERE {scope("batch_id")}
    UNION ALL
    SELECT 'reservation', id, batch_id, container_id
      FROM container_reservation WHERE {scope("batch_id")}
),
wrong_geography AS (
    SELECT u.kind, 'container outside the batch geography' AS problem, u.batch_id,
           u.row_id, u.container_id, b.geography_id AS batch_geography_id,
           p.geography_id AS container_geography_id, NULL::bigint[] AS sea_area_ids
      FROM used u
      LEFT JOIN batch b ON b.id = u.batch_id
      LEFT JOIN place p ON p.container_id = u.container_id
     WHERE p.geography_id IS DISTINCT FROM b.geography_id
),
several_areas AS (
    SELECT u.kind, 'rings in several sea areas', u.batch_id, NULL::bigint, NULL::bigint,
           NULL::bigint, NULL::bigint, array_agg(DISTINCT p.sea_area_id ORDER BY p.sea_area_id)
      FROM used u
      JOIN place p ON p.container_id = u.container_id
     WHERE p.sea_area_id IS NOT NULL
     GROUP BY u.kind, u.batch_id
    HAVING count(DISTINCT p.sea_area_id) > 1
),
bad AS (SELECT * FROM wrong_geography UNION ALL SELECT * FROM several_areas)
{_result_sql("SELECT count(*) FROM used", "batch_id, kind, row_id")}"""
    return _run(conn, "I-3", query, _params(ctx, scope), began)


def check_I_4(conn: Connection, batch_ids: list[int] | None) -> CheckResult:
    """Lifecycle order. Every placement goes into stage 1 and every other transfer from
    stage k to stage k+1 of the same batch; per batch the stages present are 1, 2, … with
    non-decreasing first start dates, and stage k+1 starts at most the transfer window
    before stage k's last assignment ends (and not after it)."""
    began = time.perf_counter()
    ctx, scope = _context(conn, batch_ids)
    closing = _result_sql(
        "SELECT (SELECT count(*) FROM links) + (SELECT count(*) FROM stages)",
        "batch_id, transfer_date, stage_id",
    )
    query = f"""
WITH {_asg_cte(scope)},
links AS (
    SELECT t.id AS transfer_id, t.batch_id, t.transfer_date,
           t.source_assignment_id, t.dest_assignment_id,
           s.batch_id AS source_batch_id, s.stage_id AS source_stage,
           d.batch_id AS dest_batch_id, d.stage_id AS dest_stage
      FROM transfer_action t
      LEFT JOIN assignment s ON s.id = t.source_assignment_id
      LEFT JOIN assignment d ON d.id = t.dest_assignment_id
     WHERE {scope("t.batch_id")}
),
bad_links AS (
    SELECT batch_id,
           CASE WHEN source_assignment_id IS NULL THEN 'placement not into stage 1'
                ELSE 'transfer not from stage k to k+1 of its batch' END AS problem,
           transfer_id, transfer_date, source_assignment_id, dest_assignment_id,
           source_stage, dest_stage, NULL::int AS stage_id,
           NULL::date AS first_start, NULL::date AS previous_stage_last_end
      FROM links
     WHERE (source_assignment_id IS NULL AND dest_stage IS DISTINCT FROM 1)
        OR (source_assignment_id IS NOT NULL
            AND (dest_stage IS DISTINCT FROM source_stage + 1
                 OR source_batch_id IS DISTINCT FROM batch_id
                 OR dest_batch_id IS DISTINCT FROM batch_id))
),
stages AS (
    SELECT batch_id, stage_id, min(start_date) AS first_start, max(end_date) AS last_end
      FROM asg
     GROUP BY batch_id, stage_id
),
seq AS (
    SELECT s.*,
           lag(stage_id) OVER w AS previous_stage,
           lag(first_start) OVER w AS previous_first_start,
           lag(last_end) OVER w AS previous_last_end
      FROM stages s
    WINDOW w AS (PARTITION BY batch_id ORDER BY stage_id)
),
bad_stages AS (
    SELECT batch_id,
           CASE WHEN stage_id <> coalesce(previous_stage, 0) + 1 THEN 'stage skipped'
                WHEN first_start < previous_first_start THEN 'stage starts before the previous'
                ELSE 'stage start outside the transfer window' END,
           NULL::bigint, NULL::date, NULL::bigint, NULL::bigint, previous_stage, stage_id,
           stage_id, first_start, previous_last_end
      FROM seq
     WHERE stage_id <> coalesce(previous_stage, 0) + 1
        OR first_start < previous_first_start
        OR previous_last_end - first_start NOT BETWEEN 0 AND %(window)s
),
bad AS (SELECT * FROM bad_links UNION ALL SELECT * FROM bad_stages)
{closing}"""
    params = _params(ctx, scope, window=ctx.transfer_window_days)
    return _run(conn, "I-4", query, params, began)


def check_I_5(conn: Connection, batch_ids: list[int] | None) -> CheckResult:
    """No orphan batch: from the first placement to the last harvest (harvested batch) or
    to the as-of date, the union of the batch's assignment ranges has no gap. Counts
    batch-days; each gap is one example."""
    began = time.perf_counter()
    ctx, scope = _context(conn, batch_ids)
    closing = _result_sql(
        "SELECT sum(until - first_placement) FROM span",
        "batch_id, gap_from",
        violations="SELECT sum(days) FROM bad",
    )
    query = f"""
WITH {_asg_cte(scope)},
placed AS (
    SELECT batch_id, min(transfer_date) AS first_placement
      FROM transfer_action
     WHERE source_assignment_id IS NULL AND {scope("batch_id")}
     GROUP BY batch_id
),
harvested AS (
    SELECT batch_id, max(harvest_date) AS last_harvest
      FROM harvest_event WHERE {scope("batch_id")}
     GROUP BY batch_id
),
span AS (
    SELECT b.id AS batch_id, b.status, p.first_placement,
           greatest(p.first_placement,
                    CASE WHEN b.status = 'harvested'
                         THEN coalesce(h.last_harvest + 1, %(open_end)s::date)
                         ELSE %(open_end)s::date END) AS until
      FROM batch b
      JOIN placed p ON p.batch_id = b.id
      LEFT JOIN harvested h ON h.batch_id = b.id
     WHERE {scope("b.id")}
),
cover AS (
    SELECT batch_id,
           range_agg(daterange(start_date, greatest(start_date, end_date))) AS days
      FROM asg
     GROUP BY batch_id
),
bad AS (
    SELECT s.batch_id, s.status, lower(g) AS gap_from, upper(g) AS gap_until,
           upper(g) - lower(g) AS days
      FROM span s
      LEFT JOIN cover c ON c.batch_id = s.batch_id
     CROSS JOIN LATERAL unnest(
               datemultirange(daterange(s.first_placement, s.until))
               - coalesce(c.days, '{{}}'::datemultirange)) AS g
)
{closing}"""
    return _run(conn, "I-5", query, _params(ctx, scope), began)


# ---- I-6, I-7: every row in its place -----------------------------------------------------------


def check_I_6(conn: Connection, batch_ids: list[int] | None) -> CheckResult:
    """Exactly one assignment per row: every event, reading and daily-state row names an
    assignment active on its (UTC) date. Rows are grouped by (assignment, date) first, so
    the readings are read in one aggregating pass."""
    began = time.perf_counter()
    ctx, scope = _context(conn, batch_ids)
    parts = " UNION ALL ".join(
        f"""
    SELECT '{table}' AS table_name, assignment_id, {day} AS day, count(*) AS n
      FROM {table} WHERE {scope("batch_id")}
     GROUP BY assignment_id, {day}"""
        for table, day in DATED_TABLES.items()
    )
    closing = _result_sql(
        "SELECT sum(n) FROM rows_by_day",
        "table_name, assignment_id, date",
        violations="SELECT sum(rows) FROM bad",
    )
    query = f"""
WITH rows_by_day AS ({parts}),
bad AS (
    SELECT r.table_name, r.assignment_id, r.day AS date, r.n AS rows,
           a.start_date, a.end_date,
           CASE WHEN r.assignment_id IS NULL THEN 'no assignment'
                WHEN a.id IS NULL THEN 'unknown assignment'
                ELSE 'outside the assignment range' END AS problem
      FROM rows_by_day r
      LEFT JOIN assignment a ON a.id = r.assignment_id
     WHERE a.id IS NULL
        OR r.day < a.start_date
        OR r.day >= coalesce(a.end_date, %(open_end)s::date)
)
{closing}"""
    return _run(conn, "I-6", query, _params(ctx, scope), began)


def check_I_7(conn: Connection, batch_ids: list[int] | None) -> CheckResult:
    """Denormalised keys agree: each row's batch_id and container_id are its assignment's
    (transfers: both assignments belong to the transfer's batch); a reading's sensor
    belongs to the reading's container and measures the reading's parameter."""
    began = time.perf_counter()
    ctx, scope = _context(conn, batch_ids)
    sensor_keys = {
        table: "sensor_id, parameter_id"
        if table == "environmental_reading"
        else "NULL::bigint AS sensor_id, NULL::bigint AS parameter_id"
        for table in DATED_TABLES
    }
    parts = [
        f"""
    SELECT '{table}' AS table_name, assignment_id, batch_id, container_id,
           {sensor_keys[table]}, count(*) AS n
      FROM {table} WHERE {scope("batch_id")}
     GROUP BY 2, 3, 4, 5, 6"""
        for table in DATED_TABLES
    ]
    for column in ("source_assignment_id", "dest_assignment_id"):
        parts.append(f"""
    SELECT 'transfer_action.{column}', {column}, batch_id, NULL::bigint,
           NULL::bigint, NULL::bigint, count(*)
      FROM transfer_action WHERE {column} IS NOT NULL AND {scope("batch_id")}
     GROUP BY 2, 3""")
    closing = _result_sql(
        "SELECT sum(n) FROM keyed",
        "table_name, assignment_id",
        violations="SELECT sum(rows) FROM bad",
    )
    query = f"""
WITH keyed AS ({" UNION ALL ".join(parts)}),
bad AS (
    SELECT k.table_name, k.assignment_id, k.batch_id, k.container_id, k.sensor_id,
           k.parameter_id, k.n AS rows,
           a.batch_id AS assignment_batch_id, a.container_id AS assignment_container_id,
           s.container_id AS sensor_container_id, s.parameter_id AS sensor_parameter_id
      FROM keyed k
      LEFT JOIN assignment a ON a.id = k.assignment_id
      LEFT JOIN sensor s ON s.id = k.sensor_id
     WHERE a.id IS NULL
        OR a.batch_id <> k.batch_id
        OR (k.container_id IS NOT NULL AND a.container_id <> k.container_id)
        OR (k.table_name = 'environmental_reading'
            AND (s.id IS NULL
                 OR s.container_id <> k.container_id
                 OR s.parameter_id <> k.parameter_id))
)
{closing}"""
    return _run(conn, "I-7", query, _params(ctx, scope), began)


# ---- I-8 … I-12: counting fish ------------------------------------------------------------------


def _movement_ctes(scope: _Scope) -> str:
    """Per (assignment, date): fish received, sent, dead (and of those HANDLING), harvested."""
    return f"""
received AS (
    SELECT dest_assignment_id AS assignment_id, transfer_date AS day,
           sum(fish_count) AS n,
           sum(fish_count) FILTER (WHERE source_assignment_id IS NULL) AS placed
      FROM transfer_action WHERE {scope("batch_id")}
     GROUP BY 1, 2
),
sent AS (
    SELECT source_assignment_id AS assignment_id, transfer_date AS day, sum(fish_count) AS n
      FROM transfer_action
     WHERE source_assignment_id IS NOT NULL AND {scope("batch_id")}
     GROUP BY 1, 2
),
dead AS (
    SELECT assignment_id, event_date AS day, sum(fish_count) AS n,
           sum(fish_count) FILTER (WHERE cause = 'HANDLING') AS handling
      FROM mortality_event WHERE {scope("batch_id")}
     GROUP BY 1, 2
),
harvest AS (
    SELECT assignment_id, harvest_date AS day, sum(fish_count) AS n
      FROM harvest_event WHERE {scope("batch_id")}
     GROUP BY 1, 2
)"""


def check_I_8(conn: Connection, batch_ids: list[int] | None) -> CheckResult:
    """Population conservation per assignment-day: population = previous population +
    fish_in − fish_out − deaths − harvested ≥ 0, where each flow column must equal the
    recorded rows (transfers, the assignment's own mortality rows, harvests); every
    assignment-day with recorded movements has a daily state to show it."""
    began = time.perf_counter()
    ctx, scope = _context(conn, batch_ids)
    query = f"""
WITH {_movement_ctes(scope)},
state AS (
    SELECT s.assignment_id, s.batch_id, s.state_date, s.population,
           s.fish_in, s.fish_out, s.deaths, s.harvested,
           lag(s.population) OVER w AS previous_population
      FROM daily_assignment_state s
     WHERE {scope("s.batch_id")}
    WINDOW w AS (PARTITION BY s.assignment_id ORDER BY s.state_date)
),
ledger AS (
    SELECT st.*,
           coalesce(r.n, 0) AS recorded_in, coalesce(o.n, 0) AS recorded_out,
           coalesce(d.n, 0) AS recorded_deaths, coalesce(h.n, 0) AS recorded_harvested,
           coalesce(st.previous_population, 0) + coalesce(r.n, 0) - coalesce(o.n, 0)
             - coalesce(d.n, 0) - coalesce(h.n, 0) AS expected_population
      FROM state st
      LEFT JOIN received r ON r.assignment_id = st.assignment_id AND r.day = st.state_date
      LEFT JOIN sent o ON o.assignment_id = st.assignment_id AND o.day = st.state_date
      LEFT JOIN dead d ON d.assignment_id = st.assignment_id AND d.day = st.state_date
      LEFT JOIN harvest h ON h.assignment_id = st.assignment_id AND h.day = st.state_date
),
movements AS (
    SELECT assignment_id, day FROM received UNION SELECT assignment_id, day FROM sent
    UNION SELECT assignment_id, day FROM dead UNION SELECT assignment_id, day FROM harvest
),
unstated AS (
    SELECT m.assignment_id, m.day
      FROM movements m
     WHERE NOT EXISTS (SELECT 1 FROM state st
                        WHERE st.assignment_id = m.assignment_id AND st.state_date = m.day)
),
bad AS (
    SELECT assignment_id, state_date, previous_population, population, expected_population,
           fish_in, recorded_in, fish_out, recorded_out, deaths, recorded_deaths,
           harvested, recorded_harvested, NULL AS problem
      FROM ledger
     WHERE population <> expected_population OR population < 0
        OR fish_in <> recorded_in OR fish_out <> recorded_out
        OR deaths <> recorded_deaths OR harvested <> recorded_harvested
    UNION ALL
    SELECT assignment_id, day, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           NULL, NULL, 'recorded movement without a daily state'
      FROM unstated
)
{_result_sql("SELECT count(*) FROM state", "assignment_id, state_date")}"""
    return _run(conn, "I-8", query, _params(ctx, scope), began)


def check_I_9(conn: Connection, batch_ids: list[int] | None) -> CheckResult:
    """Conservation at transfers. A source's population at the start of a sending day
    (previous day's population + that morning's receipts) = fish sent + its deaths that
    day (handling losses and any other) + harvested + what it still holds; a source whose
    range ends that day closes at 0. A destination's opening population (its first day's
    population + that day's deaths, fish sent and harvested) = what it received that day."""
    began = time.perf_counter()
    ctx, scope = _context(conn, batch_ids)
    closing = _result_sql(
        "SELECT (SELECT count(*) FROM sources) + (SELECT count(*) FROM destinations)",
        "role, assignment_id, day",
    )
    query = f"""
WITH {_asg_cte(scope)},
{_movement_ctes(scope)},
sources AS (
    SELECT o.assignment_id, o.day, o.n AS sent,
           coalesce(d.n, 0) AS deaths, coalesce(d.handling, 0) AS handling_losses,
           coalesce(h.n, 0) AS harvested, coalesce(r.n, 0) AS received_same_day,
           coalesce(prev.population, 0) + coalesce(r.n, 0) AS population_before,
           cur.population AS population_after,
           a.end_date = o.day + 1 AS closes
      FROM sent o
      JOIN asg a ON a.id = o.assignment_id
      LEFT JOIN daily_assignment_state prev
        ON prev.assignment_id = o.assignment_id AND prev.state_date = o.day - 1
      LEFT JOIN daily_assignment_state cur
        ON cur.assignment_id = o.assignment_id AND cur.state_date = o.day
      LEFT JOIN dead d ON d.assignment_id = o.assignment_id AND d.day = o.day
      LEFT JOIN harvest h ON h.assignment_id = o.assignment_id AND h.day = o.day
      LEFT JOIN received r ON r.assignment_id = o.assignment_id AND r.day = o.day
),
destinations AS (
    SELECT a.id AS assignment_id, a.start_date AS day, coalesce(r.n, 0) AS received,
           s.population + coalesce(d.n, 0) + coalesce(o.n, 0) + coalesce(h.n, 0)
             AS opening_population,
           s.population AS population_after
      FROM asg a
      LEFT JOIN received r ON r.assignment_id = a.id AND r.day = a.start_date
      LEFT JOIN daily_assignment_state s
        ON s.assignment_id = a.id AND s.state_date = a.start_date
      LEFT JOIN dead d ON d.assignment_id = a.id AND d.day = a.start_date
      LEFT JOIN sent o ON o.assignment_id = a.id AND o.day = a.start_date
      LEFT JOIN harvest h ON h.assignment_id = a.id AND h.day = a.start_date
),
bad AS (
    SELECT 'source' AS role, assignment_id, day, population_before, sent, handling_losses,
           deaths, harvested, population_after, NULL::bigint AS received,
           NULL::bigint AS opening_population
      FROM sources
     WHERE population_after IS NULL
        OR population_before <> sent + deaths + harvested + population_after
        OR (closes AND population_after <> 0)
    UNION ALL
    SELECT 'destination', assignment_id, day, NULL, NULL, NULL, NULL, NULL,
           population_after, received, opening_population
      FROM destinations
     WHERE opening_population IS DISTINCT FROM received OR received <= 0
)
{closing}"""
    return _run(conn, "I-9", query, _params(ctx, scope), began)


def check_I_10(conn: Connection, batch_ids: list[int] | None) -> CheckResult:
    """No doubling: per batch and date, Σ population of its daily states = eggs placed −
    cumulative deaths − cumulative harvest, and it never rises from one day to the next
    except by the eggs placed that day."""
    began = time.perf_counter()
    ctx, scope = _context(conn, batch_ids)
    query = f"""
WITH population AS (
    SELECT batch_id, state_date AS day, sum(population) AS n
      FROM daily_assignment_state WHERE {scope("batch_id")}
     GROUP BY 1, 2
),
placed AS (
    SELECT batch_id, transfer_date AS day, sum(fish_count) AS n
      FROM transfer_action
     WHERE source_assignment_id IS NULL AND {scope("batch_id")}
     GROUP BY 1, 2
),
dead AS (
    SELECT batch_id, event_date AS day, sum(fish_count) AS n
      FROM mortality_event WHERE {scope("batch_id")}
     GROUP BY 1, 2
),
harvest AS (
    SELECT batch_id, harvest_date AS day, sum(fish_count) AS n
      FROM harvest_event WHERE {scope("batch_id")}
     GROUP BY 1, 2
),
days AS (
    SELECT batch_id, day FROM population UNION SELECT batch_id, day FROM placed
    UNION SELECT batch_id, day FROM dead UNION SELECT batch_id, day FROM harvest
),
ledger AS (
    SELECT k.batch_id, k.day, coalesce(p.n, 0) AS population,
           coalesce(pl.n, 0) AS placed_today,
           sum(coalesce(pl.n, 0)) OVER cumulative AS placed,
           sum(coalesce(d.n, 0)) OVER cumulative AS deaths,
           sum(coalesce(h.n, 0)) OVER cumulative AS harvested,
           lag(coalesce(p.n, 0)) OVER by_day AS previous_population
      FROM days k
      LEFT JOIN population p ON p.batch_id = k.batch_id AND p.day = k.day
      LEFT JOIN placed pl ON pl.batch_id = k.batch_id AND pl.day = k.day
      LEFT JOIN dead d ON d.batch_id = k.batch_id AND d.day = k.day
      LEFT JOIN harvest h ON h.batch_id = k.batch_id AND h.day = k.day
    WINDOW by_day AS (PARTITION BY k.batch_id ORDER BY k.day),
           cumulative AS (by_day ROWS UNBOUNDED PRECEDING)
),
bad AS (
    SELECT batch_id, day, population, placed - deaths - harvested AS expected,
           previous_population, placed_today, placed, deaths, harvested
      FROM ledger
     WHERE population <> placed - deaths - harvested
        OR population > coalesce(previous_population, 0) + placed_today
)
{_result_sql("SELECT count(*) FROM ledger", "batch_id, day")}"""
    return _run(conn, "I-10", query, _params(ctx, scope), began)


def _weight_ctes(scope: _Scope, first_day_only: bool) -> str:
    """Per daily state: the expected end-of-day mean weight from the rows.

    Start of day: the count-weighted mix of the previous day's population at its
    weight and the fish received that morning (transfer rows); end of day: grown by
    (W^(1/3) + tgc/1000 · T)^3 while fish remain, T the mean of the day's written
    Temperature readings (recomputed here). `first_day_only` limits it to each
    assignment's first day, reading only that day's temperatures."""
    if first_day_only:
        temperature = f"""
temperature AS (
    SELECT r.assignment_id, a.start_date AS day, avg(r.value) AS t, count(*) AS readings
      FROM environmental_reading r
      JOIN asg a ON a.id = r.assignment_id
     WHERE r.parameter_id = %(temperature_id)s AND {scope("r.batch_id")}
       AND r.reading_time >= (a.start_date::timestamp AT TIME ZONE 'UTC')
       AND r.reading_time < ((a.start_date + 1)::timestamp AT TIME ZONE 'UTC')
     GROUP BY 1, 2
)"""
        state = f"""
state AS (
    SELECT s.assignment_id, s.state_date, s.population, s.mean_weight_g,
           NULL::bigint AS previous_population, NULL::float8 AS previous_weight
      FROM daily_assignment_state s
      JOIN asg a ON a.id = s.assignment_id AND s.state_date = a.start_date
     WHERE {scope("s.batch_id")}
)"""
    else:
        temperature = f"""
temperature AS (
    SELECT assignment_id, (reading_time AT TIME ZONE 'UTC')::date AS day,
           avg(value) AS t, count(*) AS readings
      FROM environmental_reading
     WHERE parameter_id = %(temperature_id)s AND {scope("batch_id")}
     GROUP BY 1, 2
)"""
        state = f"""
state AS (
    SELECT s.assignment_id, s.state_date, s.population, s.mean_weight_g,
           lag(s.population) OVER w AS previous_population,
           lag(s.mean_weight_g) OVER w AS previous_weight
      FROM daily_assignment_state s
     WHERE {scope("s.batch_id")}
    WINDOW w AS (PARTITION BY s.assignment_id ORDER BY s.state_date)
)"""
    return f"""
{temperature},
{state},
receipts AS (
    SELECT dest_assignment_id AS assignment_id, transfer_date AS day,
           sum(fish_count) AS n, sum(fish_count * mean_weight_g) AS grams
      FROM transfer_action WHERE {scope("batch_id")}
     GROUP BY 1, 2
),
samples AS (
    SELECT assignment_id, sample_date AS day, array_agg(mean_weight_g) AS means
      FROM growth_sample WHERE {scope("batch_id")}
     GROUP BY 1, 2
),
mixed AS (
    SELECT st.*, a.tgc, t.t AS temperature_c, coalesce(rc.n, 0) AS received,
           CASE WHEN coalesce(st.previous_population, 0) + coalesce(rc.n, 0) > 0
                THEN (coalesce(st.previous_population, 0) * coalesce(st.previous_weight, 0)
                      + coalesce(rc.grams, 0))
                     / (coalesce(st.previous_population, 0) + coalesce(rc.n, 0))
                ELSE st.previous_weight END AS start_weight,
           sm.means AS sample_means
      FROM state st
      JOIN assignment a ON a.id = st.assignment_id
      LEFT JOIN temperature t ON t.assignment_id = st.assignment_id AND t.day = st.state_date
      LEFT JOIN receipts rc ON rc.assignment_id = st.assignment_id AND rc.day = st.state_date
      LEFT JOIN samples sm ON sm.assignment_id = st.assignment_id AND sm.day = st.state_date
),
expected AS (
    SELECT m.*,
           CASE WHEN m.population > 0 AND m.start_weight > 0
                THEN power(cbrt(m.start_weight) + m.tgc / 1000.0 * coalesce(m.temperature_c, 0), 3)
                ELSE m.start_weight END AS expected_weight,
           CASE WHEN m.received > 0 THEN %(opening_rtol)s ELSE %(growth_rtol)s END AS rtol
      FROM mixed m
),
weight_bad AS (
    SELECT assignment_id, state_date, population, previous_population, received,
           start_weight, temperature_c, tgc, mean_weight_g, expected_weight,
           (mean_weight_g - expected_weight) / nullif(expected_weight, 0) AS relative_error,
           rtol
      FROM expected
     WHERE expected_weight IS NOT NULL
       AND NOT (mean_weight_g = ANY(coalesce(sample_means, '{{}}')))  -- anchored on a sample
       AND (mean_weight_g IS NULL
            OR abs(mean_weight_g - expected_weight) > rtol * abs(expected_weight))
)"""


def check_I_11(conn: Connection, batch_ids: list[int] | None) -> CheckResult:
    """Opening state from records. Each assignment receives fish on its start date
    (placement or transfer rows, Σ > 0) and its first daily state's fish_in is that sum;
    its opening weight is their count-weighted mean (compared after the first day's
    growth, within 1e-9). The rows themselves carry recorded weights: a placement the
    scenario's egg weight, a transfer the source's weight at the start of the day (its
    previous daily state), and biomass_kg = fish_count · mean_weight_g / 1000."""
    began = time.perf_counter()
    ctx, scope = _context(conn, batch_ids)
    closing = _result_sql(
        "SELECT (SELECT count(*) FROM opening) + (SELECT count(*) FROM records)",
        "assignment_id, day, problem",
    )
    query = f"""
WITH {_asg_cte(scope)},
{_weight_ctes(scope, first_day_only=True)},
opening AS (
    SELECT a.id AS assignment_id, a.start_date, coalesce(rc.n, 0) AS received,
           s.fish_in, s.population
      FROM asg a
      LEFT JOIN receipts rc ON rc.assignment_id = a.id AND rc.day = a.start_date
      LEFT JOIN daily_assignment_state s
        ON s.assignment_id = a.id AND s.state_date = a.start_date
),
records AS (
    SELECT t.id AS transfer_id, t.dest_assignment_id, t.source_assignment_id,
           t.transfer_date, t.fish_count, t.mean_weight_g, t.biomass_kg,
           CASE WHEN t.source_assignment_id IS NULL THEN %(egg_weight)s::float8
                ELSE src.mean_weight_g END AS source_weight
      FROM transfer_action t
      LEFT JOIN daily_assignment_state src
        ON src.assignment_id = t.source_assignment_id
       AND src.state_date = t.transfer_date - 1
     WHERE {scope("t.batch_id")}
),
bad AS (
    SELECT 'opening count' AS problem, assignment_id, start_date AS day,
           NULL::bigint AS transfer_id, received, fish_in,
           NULL::float8 AS recorded, NULL::float8 AS expected
      FROM opening
     WHERE received <= 0 OR fish_in IS DISTINCT FROM received
    UNION ALL
    SELECT 'opening weight', assignment_id, state_date, NULL, received, NULL,
           mean_weight_g, expected_weight
      FROM weight_bad
    UNION ALL
    SELECT 'transfer weight is not the source''s', dest_assignment_id, transfer_date,
           transfer_id, fish_count, NULL, mean_weight_g, source_weight
      FROM records
     WHERE source_weight IS NOT NULL
       AND abs(mean_weight_g - source_weight) > %(opening_rtol)s * abs(source_weight)
    UNION ALL
    SELECT 'transfer biomass', dest_assignment_id, transfer_date, transfer_id, fish_count,
           NULL, biomass_kg, fish_count * mean_weight_g / 1000.0
      FROM records
     WHERE abs(biomass_kg - fish_count * mean_weight_g / 1000.0)
           > %(opening_rtol)s * abs(fish_count * mean_weight_g / 1000.0)
)
{closing}"""
    params = _params(
        ctx,
        scope,
        temperature_id=ctx.temperature_parameter_id,
        egg_weight=ctx.egg_weight_g,
        opening_rtol=OPENING_WEIGHT_RTOL,
        growth_rtol=GROWTH_RTOL,
    )
    return _run(conn, "I-11", query, params, began)


def check_I_12(conn: Connection, batch_ids: list[int] | None) -> CheckResult:
    """Each fish counted once a day. On every hand-over day, each source and destination
    has a daily state with population = previous + received − sent − deaths − harvested
    (a destination holds what it received minus its own deaths), a source whose range
    ends that day closes at 0, and over all assignments of the hand-over the end-of-day
    total = their previous total − deaths − harvest + eggs placed (moves cancel out)."""
    began = time.perf_counter()
    ctx, scope = _context(conn, batch_ids)
    query = f"""
WITH {_movement_ctes(scope)},
handovers AS (
    SELECT DISTINCT batch_id, transfer_date AS day,
           unnest(ARRAY[source_assignment_id, dest_assignment_id]) AS assignment_id
      FROM transfer_action
     WHERE source_assignment_id IS NOT NULL AND {scope("batch_id")}
),
involved AS (
    SELECT hv.batch_id, hv.day, hv.assignment_id,
           coalesce(prev.population, 0) AS previous_population,
           cur.population,
           coalesce(r.n, 0) AS received, coalesce(r.placed, 0) AS placed,
           coalesce(o.n, 0) AS sent, coalesce(d.n, 0) AS deaths, coalesce(h.n, 0) AS harvested,
           a.end_date = hv.day + 1 AS closes
      FROM handovers hv
      JOIN assignment a ON a.id = hv.assignment_id
      LEFT JOIN daily_assignment_state prev
        ON prev.assignment_id = hv.assignment_id AND prev.state_date = hv.day - 1
      LEFT JOIN daily_assignment_state cur
        ON cur.assignment_id = hv.assignment_id AND cur.state_date = hv.day
      LEFT JOIN received r ON r.assignment_id = hv.assignment_id AND r.day = hv.day
      LEFT JOIN sent o ON o.assignment_id = hv.assignment_id AND o.day = hv.day
      LEFT JOIN dead d ON d.assignment_id = hv.assignment_id AND d.day = hv.day
      LEFT JOIN harvest h ON h.assignment_id = hv.assignment_id AND h.day = hv.day
),
groups AS (
    SELECT batch_id, day, count(*) AS assignments,
           sum(population) AS population, count(population) AS stated,
           sum(previous_population - deaths - harvested + placed) AS expected
      FROM involved
     GROUP BY batch_id, day
),
bad AS (
    SELECT CASE WHEN population IS NULL THEN 'no daily state'
                WHEN closes AND population <> 0 THEN 'source does not close at 0'
                ELSE 'end-of-day count' END AS problem,
           batch_id, day, assignment_id, previous_population, received, sent, deaths,
           harvested, population,
           previous_population + received - sent - deaths - harvested AS expected
      FROM involved
     WHERE population IS NULL
        OR (closes AND population <> 0)
        OR population <> previous_population + received - sent - deaths - harvested
    UNION ALL
    SELECT 'hand-over total', batch_id, day, NULL, NULL, NULL, NULL, NULL, NULL,
           population, expected
      FROM groups
     WHERE stated = assignments AND population <> expected
)
{_result_sql("SELECT count(*) FROM involved", "batch_id, day, assignment_id")}"""
    return _run(conn, "I-12", query, _params(ctx, scope), began)


def check_I_13(conn: Connection, batch_ids: list[int] | None) -> CheckResult:
    """Weight continuity. Each daily state's mean weight is the expected one: the
    count-weighted mix of yesterday's fish and today's receipts, grown one day by the
    assignment's stored tgc and the mean of the day's written Temperature readings
    (recomputed from environmental_reading). Within 1e-9 on days fish arrive (the
    opening weight is exact), 1 % otherwise; a weight equal to a growth sample's mean of
    that day is accepted (assimilation anchors on samples)."""
    began = time.perf_counter()
    ctx, scope = _context(conn, batch_ids)
    query = f"""
WITH {_weight_ctes(scope, first_day_only=False)},
bad AS (SELECT * FROM weight_bad)
{_result_sql("SELECT count(*) FROM state", "assignment_id, state_date")}"""
    params = _params(
        ctx,
        scope,
        temperature_id=ctx.temperature_parameter_id,
        opening_rtol=OPENING_WEIGHT_RTOL,
        growth_rtol=GROWTH_RTOL,
    )
    return _run(conn, "I-13", query, params, began)


# ---- I-14 … I-17: completeness and the end of the story -------------------------------------


def check_I_14(conn: Connection, batch_ids: list[int] | None) -> CheckResult:
    """Complete daily state: exactly one row per assignment-day inside the assignment's
    range, none outside. Examines assignment-days; violations = missing + outside +
    duplicate rows."""
    began = time.perf_counter()
    ctx, scope = _context(conn, batch_ids)
    closing = _result_sql(
        "SELECT sum(expected) FROM counted",
        "assignment_id",
        violations="SELECT sum(missing + outside + duplicates) FROM bad",
    )
    query = f"""
WITH {_asg_cte(scope)},
per_assignment AS (
    SELECT s.assignment_id, count(*) AS states,
           count(DISTINCT s.state_date) AS days,
           count(DISTINCT s.state_date) FILTER (
               WHERE s.state_date >= a.start_date AND s.state_date < a.end_date) AS inside
      FROM daily_assignment_state s
      LEFT JOIN asg a ON a.id = s.assignment_id
     WHERE {scope("s.batch_id")}
     GROUP BY s.assignment_id
),
counted AS (
    SELECT coalesce(a.id, p.assignment_id) AS assignment_id, a.start_date, a.end_date,
           greatest(coalesce(a.end_date - a.start_date, 0), 0) AS expected,
           coalesce(p.inside, 0) AS inside,
           coalesce(p.days, 0) - coalesce(p.inside, 0) AS outside,
           coalesce(p.states, 0) - coalesce(p.days, 0) AS duplicates
      FROM asg a
      FULL JOIN per_assignment p ON p.assignment_id = a.id
),
bad AS (
    SELECT assignment_id, start_date, end_date, expected, inside,
           expected - inside AS missing, outside, duplicates
      FROM counted
     WHERE inside <> expected OR outside > 0 OR duplicates > 0
)
{closing}"""
    return _run(conn, "I-14", query, _params(ctx, scope), began)


def check_I_15(conn: Connection, batch_ids: list[int] | None) -> CheckResult:
    """Sensor coverage: every assignment-day has exactly `per_day` readings (from
    run.scenario → readings) from each sensor of its container. Examines
    assignment-sensor-days; violations = days missing + days with another count."""
    began = time.perf_counter()
    ctx, scope = _context(conn, batch_ids)
    closing = _result_sql(
        "SELECT sum(days) FROM expected",
        "assignment_id, sensor_id",
        violations="SELECT sum(missing_days + days_wrong) FROM bad",
    )
    query = f"""
WITH {_asg_cte(scope)},
per_day AS (
    SELECT assignment_id, sensor_id, (reading_time AT TIME ZONE 'UTC')::date AS day,
           count(*) AS n
      FROM environmental_reading WHERE {scope("batch_id")}
     GROUP BY 1, 2, 3
),
per_sensor AS (
    SELECT p.assignment_id, p.sensor_id, count(*) AS days_present,
           count(*) FILTER (WHERE p.n <> %(per_day)s) AS days_wrong,
           min(p.day) FILTER (WHERE p.n <> %(per_day)s) AS first_wrong_day,
           min(p.n) AS fewest, max(p.n) AS most
      FROM per_day p
      JOIN asg a ON a.id = p.assignment_id
     WHERE p.day >= a.start_date AND p.day < a.end_date
     GROUP BY 1, 2
),
expected AS (
    SELECT a.id AS assignment_id, s.id AS sensor_id, s.parameter_id,
           greatest(a.end_date - a.start_date, 0) AS days
      FROM asg a
      JOIN sensor s ON s.container_id = a.container_id
),
bad AS (
    SELECT e.assignment_id, e.sensor_id, e.parameter_id, e.days AS expected_days,
           coalesce(ps.days_present, 0) AS days_present,
           e.days - coalesce(ps.days_present, 0) AS missing_days,
           coalesce(ps.days_wrong, 0) AS days_wrong, ps.first_wrong_day,
           ps.fewest, ps.most, %(per_day)s AS per_day
      FROM expected e
      LEFT JOIN per_sensor ps
        ON ps.assignment_id = e.assignment_id AND ps.sensor_id = e.sensor_id
     WHERE coalesce(ps.days_present, 0) <> e.days OR coalesce(ps.days_wrong, 0) > 0
)
{closing}"""
    params = _params(ctx, scope, per_day=ctx.readings_per_day)
    return _run(conn, "I-15", query, params, began)


def check_I_16(conn: Connection, batch_ids: list[int] | None) -> CheckResult:
    """Terminal consistency. A harvested batch has every assignment closed, its last
    assignment's end as its end_date, nothing left in its final daily states, and
    harvest rows summing to its final population (eggs placed − deaths). An active batch
    has an open assignment, and its open stages match its age on the as-of date: the
    newest is the stage whose window has opened last, older ones only within the
    transfer window."""
    began = time.perf_counter()
    ctx, scope = _context(conn, batch_ids)
    query = f"""
WITH batches AS (
    SELECT b.id AS batch_id, b.status, b.start_date, b.end_date,
           (SELECT max(o.k)::int FROM unnest(%(offsets)s::int[]) WITH ORDINALITY AS o(days, k)
             WHERE b.start_date + o.days <= %(as_of)s::date) AS stage_by_age
      FROM batch b
     WHERE {scope("b.id")}
),
stays AS (
    SELECT batch_id, count(*) AS assignments,
           count(*) FILTER (WHERE end_date IS NULL) AS open,
           max(end_date) AS last_end,
           min(stage_id) FILTER (WHERE end_date IS NULL) AS oldest_open_stage,
           max(stage_id) FILTER (WHERE end_date IS NULL) AS newest_open_stage
      FROM assignment WHERE {scope("batch_id")}
     GROUP BY batch_id
),
placed AS (
    SELECT batch_id, sum(fish_count) AS n
      FROM transfer_action
     WHERE source_assignment_id IS NULL AND {scope("batch_id")}
     GROUP BY batch_id
),
dead AS (
    SELECT batch_id, sum(fish_count) AS n FROM mortality_event WHERE {scope("batch_id")}
     GROUP BY batch_id
),
harvest AS (
    SELECT batch_id, sum(fish_count) AS n FROM harvest_event WHERE {scope("batch_id")}
     GROUP BY batch_id
),
final_state AS (
    SELECT batch_id, sum(population) AS population
      FROM (SELECT DISTINCT ON (assignment_id) batch_id, population
              FROM daily_assignment_state WHERE {scope("batch_id")}
             ORDER BY assignment_id, state_date DESC) last_rows
     GROUP BY batch_id
),
summary AS (
    SELECT b.*, coalesce(s.assignments, 0) AS assignments, coalesce(s.open, 0) AS open,
           s.last_end, s.oldest_open_stage, s.newest_open_stage,
           coalesce(p.n, 0) AS placed, coalesce(d.n, 0) AS deaths,
           coalesce(h.n, 0) AS harvested, f.population AS final_population,
           b.start_date + (%(offsets)s::int[])[b.stage_by_age] AS stage_opened
      FROM batches b
      LEFT JOIN stays s ON s.batch_id = b.batch_id
      LEFT JOIN placed p ON p.batch_id = b.batch_id
      LEFT JOIN dead d ON d.batch_id = b.batch_id
      LEFT JOIN harvest h ON h.batch_id = b.batch_id
      LEFT JOIN final_state f ON f.batch_id = b.batch_id
),
judged AS (
    SELECT s.*,
           CASE
             WHEN status = 'harvested' AND open > 0 THEN 'harvested with open assignments'
             WHEN status = 'harvested' AND (harvested <= 0 OR harvested <> placed - deaths)
               THEN 'harvest is not the final population'
             WHEN status = 'harvested' AND coalesce(final_population, 0) <> 0
               THEN 'fish left after harvest'
             WHEN status = 'harvested' AND end_date IS DISTINCT FROM last_end
               THEN 'end_date is not the last assignment end'
             WHEN status = 'active' AND open = 0 THEN 'active without an open assignment'
             WHEN status = 'active' AND newest_open_stage IS DISTINCT FROM stage_by_age
               THEN 'open stage does not match the age'
             WHEN status = 'active' AND oldest_open_stage < stage_by_age
                  AND (oldest_open_stage < stage_by_age - 1
                       OR %(as_of)s::date - stage_opened >= %(window)s)
               THEN 'previous stage still open after the transfer window'
             WHEN status NOT IN ('active', 'harvested') THEN 'unknown status'
           END AS problem
      FROM summary s
),
bad AS (SELECT * FROM judged WHERE problem IS NOT NULL)
{_result_sql("SELECT count(*) FROM batches", "batch_id")}"""
    params = _params(ctx, scope, offsets=list(ctx.stage_offsets), window=ctx.transfer_window_days)
    return _run(conn, "I-16", query, params, began)


def check_I_17(conn: Connection, batch_ids: list[int] | None) -> CheckResult:
    """No future rows: nothing in an event, reading, daily-state or transfer table is dated
    after the as-of date (timestamps: at or after as-of + 1 day, 00:00 UTC)."""
    began = time.perf_counter()
    ctx, scope = _context(conn, batch_ids)
    parts = []
    for table, (column, is_time) in _DATE_COLUMNS.items():
        future = f"{column} >= %(future_from)s" if is_time else f"{column} > %(as_of)s::date"
        day = f"({column} AT TIME ZONE 'UTC')::date" if is_time else column
        parts.append(f"""
    SELECT '{table}' AS table_name, count(*) AS n,
           count(*) FILTER (WHERE {future}) AS future,
           max({day}) AS latest_date,
           min(batch_id) FILTER (WHERE {future}) AS first_batch_id
      FROM {table} WHERE {scope("batch_id")}""")
    closing = _result_sql(
        "SELECT sum(n) FROM per_table",
        "table_name",
        violations="SELECT sum(future_rows) FROM bad",
    )
    query = f"""
WITH per_table AS ({" UNION ALL ".join(parts)}),
bad AS (
    SELECT table_name, future AS future_rows, latest_date, first_batch_id,
           %(as_of)s::date AS as_of_date
      FROM per_table WHERE future > 0
)
{closing}"""
    return _run(conn, "I-17", query, _params(ctx, scope), began)


# ---- I-18 … I-20: the ledger, re-simulation and the realism bands ----------------------------

DETERMINISM_SAMPLE = 3  # batches re-simulated in-process (I-18)
IDEMPOTENCE_SAMPLE = 20  # batches whose stored rows are re-checksummed (I-19)
IN_FLIGHT = ("queued", "running")


def sample_evenly(ids: Iterable[int], k: int) -> list[int]:
    """k of the ids, spread evenly over them in id order (first and last included when
    k ≥ 2, the middle one when k = 1); all of them when k ≥ their number. Deterministic."""
    ordered = sorted(set(ids))
    n = len(ordered)
    if k >= n:
        return ordered
    if k <= 0:
        return []
    if k == 1:
        return [ordered[(n - 1) // 2]]
    return [ordered[round(i * (n - 1) / (k - 1))] for i in range(k)]


def _rows_of(checksum: str | None) -> int:
    """The row count of a table checksum `rows:hex`."""
    try:
        return int(str(checksum).split(":", 1)[0])
    except ValueError:
        return 0


@dataclass(frozen=True)
class _Job:
    batch_id: int
    checksum: str | None
    checksums: dict[str, str] | None


def _succeeded_jobs(conn: Connection, run_id: int, scope: _Scope) -> list[_Job]:
    """The succeeded jobs in scope (their checksums commit with their rows)."""
    rows = conn.execute(
        f"""SELECT batch_id, checksum, checksums FROM batch_job
             WHERE run_id = %(run_id)s AND state = 'succeeded' AND {scope("batch_id")}
             ORDER BY batch_id""",  # type: ignore[arg-type]
        {"run_id": run_id, "batches": scope.ids},
        prepare=False,
    ).fetchall()
    return [_Job(int(b), c, cs) for b, c, cs in rows]


def _ids(batches: Sequence[int]) -> str:
    return ", ".join(map(str, batches)) or "none"


def _job_inputs(conn: Connection, batch_id: int) -> tuple[Any, Any, Any, int]:
    """(batch plan, scenario, farm, run seed) of a batch, read from the database alone,
    as a worker reads them (workers.batch.load_job_inputs, on this connection)."""
    from pipeline.planner import BatchPlan, Reservation, stage_starts

    row = conn.execute(
        "SELECT seed, scenario::text FROM run ORDER BY id LIMIT 1", prepare=False
    ).fetchone()
    assert row is not None
    run_seed, scenario_json = row
    scenario, farm = _scenario_and_farm(scenario_json)
    batch = conn.execute(
        "SELECT id, geography_id, start_date, eggs, harvest_target_g, seed"
        " FROM batch WHERE id = %s",
        (batch_id,),
        prepare=False,
    ).fetchone()
    if batch is None:
        raise KeyError(f"batch {batch_id} is not in the plan")
    reservations = conn.execute(
        "SELECT id, batch_id, container_id, stage_id, start_date, end_date"
        " FROM container_reservation WHERE batch_id = %s ORDER BY id",
        (batch_id,),
        prepare=False,
    ).fetchall()
    plan = BatchPlan(
        batch_id=batch[0],
        geography_id=batch[1],
        start_date=batch[2],
        eggs=batch[3],
        harvest_target_g=batch[4],
        seed=batch[5],
        stage_starts=stage_starts(scenario, batch[2]),
        reservations=tuple(Reservation(*r) for r in reservations),
    )
    return plan, scenario, farm, int(run_seed)


def _scenario_and_farm(scenario_json: str) -> tuple[Any, Any]:
    from workers.batch import _scenario_and_farm as cached  # lru-cached, shared with workers

    return cached(json.dumps(json.loads(scenario_json), sort_keys=True))


def check_I_18(
    conn: Connection,
    batch_ids: list[int] | None,
    *,
    sample: int = DETERMINISM_SAMPLE,
) -> CheckResult:
    """Determinism: re-simulate `sample` succeeded batches in-process (engine and
    assimilation, no database write), chosen evenly over their ids, and compare every
    table's order-independent checksum with the one the job stored in
    `batch_job.checksums`. Examines the re-simulated rows; violations = tables differing
    (a job without stored checksums differs in every table)."""
    from schema.models import BATCH_TABLES
    from workers.batch import compute_batch
    from workers.checksum import rows_checksums

    began = time.perf_counter()
    ctx, scope = _context(conn, batch_ids)
    succeeded = _succeeded_jobs(conn, ctx.run_id, scope)
    jobs = {j.batch_id: j for j in succeeded}
    chosen = sample_evenly(jobs, sample)
    examined, bad = 0, []
    for batch_id in chosen:
        plan, scenario, farm, run_seed = _job_inputs(conn, batch_id)
        rows, _ = compute_batch(plan, scenario, farm, run_seed)
        again = rows_checksums(rows)
        stored = jobs[batch_id].checksums or {}
        for table in BATCH_TABLES:
            examined += _rows_of(again[table])
            if stored.get(table) != again[table]:
                bad.append(
                    {
                        "batch_id": batch_id,
                        "table": table,
                        "stored": stored.get(table),
                        "resimulated": again[table],
                    }
                )
    note = f"re-simulated {len(chosen)} of {len(jobs)} succeeded batches: {_ids(chosen)}"
    return CheckResult(
        "I-18", examined, len(bad), bad[:EXAMPLES], time.perf_counter() - began, note
    )


def _distinct_batches(conn: Connection, table: str) -> list[int]:
    """The batch ids present in a table, by a skip scan of its batch_id index."""
    query = f"""
WITH RECURSIVE ids AS (
    SELECT (SELECT min(batch_id) FROM {table}) AS b
    UNION ALL
    SELECT (SELECT min(batch_id) FROM {table} WHERE batch_id > ids.b) FROM ids
     WHERE ids.b IS NOT NULL
)
SELECT b FROM ids WHERE b IS NOT NULL"""
    return [int(r[0]) for r in conn.execute(query, prepare=False)]  # type: ignore[arg-type]


def check_I_19(
    conn: Connection,
    batch_ids: list[int] | None,
    *,
    sample: int = IDEMPOTENCE_SAMPLE,
    in_flight_ok: bool = False,
) -> CheckResult:
    """Idempotent jobs. For the succeeded batches (all when at most `sample`, else
    `sample` of them evenly over their ids) every table's checksum is recomputed from the
    stored rows (workers.checksum.stored_checksums, streamed by COPY) and compared with
    the job's `batch_job.checksums`, and their combination with `batch_job.checksum`.
    Then, over the whole database whatever the scope: no orphans, i.e. no rows of a
    batch without a succeeded job. With `in_flight_ok` (scheduled, mid-run) a queued or
    running job's batch may hold an earlier attempt's rows. Violations = tables differing + combined
    checksums differing + orphan rows."""
    from schema.models import BATCH_TABLES
    from workers.checksum import batch_checksum, stored_checksums

    began = time.perf_counter()
    ctx, scope = _context(conn, batch_ids)
    succeeded = _succeeded_jobs(conn, ctx.run_id, scope)
    jobs = {j.batch_id: j for j in succeeded}
    chosen = sample_evenly(jobs, sample)
    examined, violations, bad = 0, 0, []
    for batch_id in chosen:
        job = jobs[batch_id]
        again = stored_checksums(conn, batch_id)
        recorded = job.checksums or {}
        differing = [t for t in BATCH_TABLES if recorded.get(t) != again[t]]
        examined += sum(_rows_of(again[t]) for t in BATCH_TABLES)
        for table in differing:
            bad.append(
                {
                    "batch_id": batch_id,
                    "problem": "stored rows differ from what the job wrote",
                    "table": table,
                    "recorded": recorded.get(table),
                    "stored": again[table],
                }
            )
        combined = batch_checksum(again)
        if not differing and job.checksum != combined:
            bad.append(
                {
                    "batch_id": batch_id,
                    "problem": "batch checksum differs",
                    "table": None,
                    "recorded": job.checksum,
                    "stored": combined,
                }
            )
        violations += len(differing) or int(job.checksum != combined)
    # orphans: every batch table, whatever the scope
    allowed = {
        int(r[0])
        for r in conn.execute(
            "SELECT batch_id FROM batch_job WHERE run_id = %s AND state = ANY(%s)",
            (ctx.run_id, ["succeeded", *IN_FLIGHT] if in_flight_ok else ["succeeded"]),
            prepare=False,
        )
    }
    for table in BATCH_TABLES:
        orphans = sorted(set(_distinct_batches(conn, table)) - allowed)
        if not orphans:
            continue
        counts = conn.execute(
            f"SELECT batch_id, count(*) FROM {table} WHERE batch_id = ANY(%s)"  # type: ignore[arg-type]
            " GROUP BY batch_id ORDER BY batch_id",
            (orphans,),
            prepare=False,
        ).fetchall()
        states = dict(
            conn.execute(
                "SELECT batch_id, state FROM batch_job WHERE run_id = %s AND batch_id = ANY(%s)",
                (ctx.run_id, orphans),
                prepare=False,
            ).fetchall()
        )
        for batch_id, n in counts:
            violations += n
            examined += n
            bad.append(
                {
                    "batch_id": batch_id,
                    "problem": "rows of a batch without a succeeded job",
                    "table": table,
                    "rows": n,
                    "job_state": states.get(batch_id),
                }
            )
    how = "all" if len(chosen) == len(jobs) else f"a sample of {len(chosen)} of"
    note = f"checksums recomputed for {how} {len(jobs)} succeeded batches: {_ids(chosen)}"
    return CheckResult(
        "I-19", examined, violations, bad[:EXAMPLES], time.perf_counter() - began, note
    )


def plausibility_result(figures: Sequence[Any], seconds: float) -> CheckResult:
    """I-20 from evaluated realism figures: violations = bands that do not hold."""
    judged = [f for f in figures if f.judged]
    failing = [f for f in judged if not f.passed]
    note = f"{len(judged) - len(failing)} of {len(judged)} realism bands hold"
    return CheckResult(
        "I-20",
        sum(f.batches for f in judged),
        len(failing),
        [f.as_dict() for f in failing][:EXAMPLES],
        seconds,
        note,
    )


def check_I_20(conn: Connection, batch_ids: list[int] | None) -> CheckResult:
    """Plausibility: the realism figures of the batches in scope (pipeline.realism) each
    inside its band of farm-model.md §6 — median inside, ≥ 90 % of the batches (of the
    days, for sea temperatures) inside. Examines the batches and days judged."""
    from pipeline.realism import realism_figures

    began = time.perf_counter()
    figures = realism_figures(conn, batch_ids)
    return plausibility_result(figures, time.perf_counter() - began)


CheckFunction = Callable[[Connection, list[int] | None], CheckResult]

CHECKS: dict[str, CheckFunction] = {
    "I-1": check_I_1,
    "I-2": check_I_2,
    "I-3": check_I_3,
    "I-4": check_I_4,
    "I-5": check_I_5,
    "I-6": check_I_6,
    "I-7": check_I_7,
    "I-8": check_I_8,
    "I-9": check_I_9,
    "I-10": check_I_10,
    "I-11": check_I_11,
    "I-12": check_I_12,
    "I-13": check_I_13,
    "I-14": check_I_14,
    "I-15": check_I_15,
    "I-16": check_I_16,
    "I-17": check_I_17,
}

JOB_CHECKS: dict[str, CheckFunction] = {
    "I-18": check_I_18,
    "I-19": check_I_19,
    "I-20": check_I_20,
}

INVARIANTS: dict[str, CheckFunction] = {**CHECKS, **JOB_CHECKS}


def run_checks(
    conn: Connection,
    only: list[str] | None = None,
    batch_ids: list[int] | None = None,
    registry: dict[str, CheckFunction] = CHECKS,
) -> list[CheckResult]:
    """Run the named checks of `registry` (all of it when `only` is None) in invariant
    order. The default registry is the SQL checks I-1 … I-17; pass `INVARIANTS` for
    all twenty (pipeline.verify does, with the ledger in mind)."""
    if only is not None:
        unknown = sorted(set(only) - set(registry))
        if unknown:
            raise KeyError(f"unknown invariant(s): {', '.join(unknown)}")
    names = [name for name in registry if only is None or name in only]
    return [registry[name](conn, batch_ids) for name in names]
