"""Realism figures (farm-model.md §6) and their judgement against the bands (I-20).

Two halves:

- `gather(conn, batch_ids)` — set-based SQL over the stored rows: one row of
  figures per batch (`BatchFigures`) and the daily mean sea temperature per
  geography. Every figure is expressed relative to the batch's own inputs
  (fish put to sea ÷ eggs placed, harvest weight ÷ the batch's drawn target …)
  and is never clamped: a figure that cannot be computed (no fish put to sea,
  no weight gained) is None and counts as outside its band.
- `evaluate(data)` — pure: each measure against its band. A band holds when the
  median lies inside it and at least 90 % of the batches do individually; for
  sea temperatures the items are the daily means of a geography (one mean per
  day over every ring temperature reading of the batches in scope).

Which batches a measure judges (`Measure.batches`):

- "harvested" — survival, sea mortality, FCR, harvest weight and days at sea
  need a finished sea phase, so only harvested batches count (§6).
- "all" — ring and tank densities are limits that hold on every day of every
  batch, so every batch in scope that has the figure counts (the ring figures
  once the batch is at sea); the sea temperatures are taken over every batch in
  scope too.

The bands are data (`MEASURES`, `SEA_TEMPERATURE_BANDS`), copied from §6.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import psycopg

Connection = psycopg.Connection[Any]

MIN_SHARE_INSIDE = 0.90  # a band holds when ≥ 90 % of the items lie inside it


@dataclass(frozen=True)
class Band:
    """A closed interval [low, high]; None leaves that side open."""

    low: float | None
    high: float | None
    unit: str = ""

    def contains(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if self.low is not None and self.high is not None:
            return f"{_num(self.low)}–{_num(self.high)}{unit}"
        if self.high is not None:
            return f"≤ {_num(self.high)}{unit}"
        if self.low is not None:
            return f"≥ {_num(self.low)}{unit}"
        return "—"


def _num(x: float) -> str:
    return f"{x:,.2f}".rstrip("0").rstrip(".") if x != int(x) else f"{int(x):,}"


@dataclass(frozen=True)
class Measure:
    key: str  # column of BatchFigures.values
    label: str
    band: Band
    batches: str = "harvested"  # "harvested" | "all": which batches the band judges


# farm-model.md §6, as data. Values are in the band's unit (percentages as 0–100).
MEASURES: tuple[Measure, ...] = (
    Measure(
        "freshwater_survival_pct",
        "Freshwater survival, egg → sea transfer",
        Band(60.0, 90.0, "%"),
    ),
    Measure(
        "sea_mortality_pct",
        "Sea-phase mortality, % of fish put to sea",
        Band(5.0, 25.0, "%"),
    ),
    Measure("sea_fcr", "Economic FCR, sea phase", Band(1.05, 1.40)),
    Measure("harvest_weight_kg", "Mean harvest weight", Band(4.5, 7.0, "kg")),
    Measure(
        "harvest_weight_vs_target_pct",
        "Mean harvest weight ÷ drawn target",
        Band(90.0, 110.0, "%"),
    ),
    Measure("days_at_sea", "Days at sea to harvest", Band(280.0, 560.0, "days")),
    Measure("ring_density_kg_m3", "Ring density, highest day", Band(None, 25.0, "kg/m³"), "all"),
    Measure(
        "ring_stocking_fish", "Fish per ring at stocking, largest", Band(None, 200_000.0), "all"
    ),
    Measure(
        "tank_load_pct",
        "Tank biomass ÷ container max biomass, highest day",
        Band(None, 100.0, "%"),
        "all",
    ),
)

NO_BAND = Band(None, None, "%")

# Daily mean sea temperature per geography (by geography name), §6.
SEA_TEMPERATURE_BANDS: dict[str, Band] = {
    "Faroe Islands": Band(6.0, 12.0, "°C"),
    "Scotland": Band(6.0, 15.0, "°C"),
}
# A geography §6 does not name: the range farmed Atlantic salmon tolerate at sea.
DEFAULT_SEA_TEMPERATURE_BAND = Band(0.0, 20.0, "°C")


@dataclass(frozen=True)
class BatchFigures:
    batch_id: int
    geography: str
    status: str
    values: dict[str, float | None]  # Measure.key → figure (None: not computable)
    # freshwater stage name → fish sent on ÷ fish received, %, in stage order (no band)
    stage_survival: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class RealismData:
    batches: list[BatchFigures]
    # geography name → (day, mean of that day's ring temperature readings), by day
    sea_temperatures: dict[str, list[tuple[date, float]]] = field(default_factory=dict)


@dataclass(frozen=True)
class RealismFigure:
    measure: str
    band: Band
    median: float | None  # None: nothing to judge
    share_inside: float | None  # 0–1
    batches: int  # items judged: batches, or days for a sea temperature
    passed: bool
    key: str = ""
    per: str = "batch"  # what `batches` counts: "batch" or "day"
    outside: tuple[tuple[Any, float | None], ...] = ()  # first items outside: (batch or day, value)
    judged: bool = True  # False: informational, §6 sets no band (survival per stage)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (verification_result examples)."""
        return {
            "measure": self.measure,
            "band": str(self.band),
            "median": _json(self.median),
            "share_inside": self.share_inside,
            "items": self.batches,
            "per": self.per,
            "outside": [
                {"batch_id": k, "value": _json(v)}
                if self.per == "batch"
                else {"day": str(k), "value": _json(v)}
                for k, v in self.outside
            ],
        }


def _json(value: float | None) -> float | None:
    """NaN and infinities are not JSON: None."""
    return value if value is None or math.isfinite(value) else None


# ---- judgement (pure) ---------------------------------------------------------------------

OUTSIDE_EXAMPLES = 10


def judge(values: Sequence[float | None], band: Band) -> tuple[float | None, float | None, bool]:
    """(median, share inside, holds) of one measure's items. A None or NaN item cannot
    lie inside (it counts against the share) and is left out of the median. Nothing to
    judge holds, with median and share None."""
    if not values:
        return None, None, True
    finite = [v for v in values if v is not None and math.isfinite(v)]
    median = statistics.median(finite) if finite else None
    share = sum(band.contains(v) for v in values) / len(values)
    holds = band.contains(median) and share >= MIN_SHARE_INSIDE
    return median, share, holds


def _figure(
    key: str, label: str, band: Band, items: Sequence[tuple[Any, float | None]], per: str
) -> RealismFigure:
    median, share, holds = judge([v for _, v in items], band)
    outside = tuple((k, v) for k, v in items if not band.contains(v))[:OUTSIDE_EXAMPLES]
    return RealismFigure(label, band, median, share, len(items), holds, key, per, outside)


def temperature_band(geography: str, bands: Mapping[str, Band] = SEA_TEMPERATURE_BANDS) -> Band:
    return bands.get(geography, DEFAULT_SEA_TEMPERATURE_BAND)


def evaluate(
    data: RealismData,
    measures: Iterable[Measure] = MEASURES,
    temperature_bands: Mapping[str, Band] = SEA_TEMPERATURE_BANDS,
) -> list[RealismFigure]:
    """Every measure against its band, then one sea-temperature figure per geography."""
    figures = []
    stages: dict[str, list[tuple[Any, float | None]]] = {}
    for b in data.batches:
        if b.status == "harvested":
            for stage, value in b.stage_survival.items():
                stages.setdefault(stage, []).append((b.batch_id, value))
    for stage, items in stages.items():  # informational: no band in §6
        median, _, _ = judge([v for _, v in items], NO_BAND)
        figures.append(
            RealismFigure(
                measure=f"Survival in {stage}",
                band=NO_BAND,
                median=median,
                share_inside=None,
                batches=len(items),
                passed=True,
                key=f"stage_survival_pct:{stage}",
                judged=False,
            )
        )
    for m in measures:
        if m.batches == "harvested":  # a figure missing here counts as outside
            items = [
                (b.batch_id, b.values.get(m.key)) for b in data.batches if b.status == "harvested"
            ]
        else:  # only batches that have the figure (ring figures once at sea)
            items = [
                (b.batch_id, b.values[m.key])
                for b in data.batches
                if b.values.get(m.key) is not None
            ]
        figures.append(_figure(m.key, m.label, m.band, items, "batch"))
    for geography in sorted(data.sea_temperatures):
        band = temperature_band(geography, temperature_bands)
        figures.append(
            _figure(
                f"sea_temperature_c:{geography}",
                f"Sea temperature, {geography} (daily mean)",
                band,
                data.sea_temperatures[geography],
                "day",
            )
        )
    return figures


# ---- gathering (SQL) ----------------------------------------------------------------------


def _scope(column: str, batch_ids: list[int] | None) -> str:
    return "TRUE" if batch_ids is None else f"{column} = ANY(%(batches)s::bigint[])"


def flow_ctes(s: Callable[[str], str]) -> str:
    """CTEs shared with the report: the scoped assignments (`asg`), fish moves (`moves`),
    per-batch placements and sea stocking (`flows`), the largest ring stocking (`rings`)
    and harvests (`harvest`); `s(column)` gives each table's batch filter."""
    return f"""
asg AS (
    SELECT a.id, a.batch_id, c.sea_area_id IS NOT NULL AS at_sea,
           c.volume_m3, c.max_biomass_kg
      FROM assignment a JOIN container c ON c.id = a.container_id
     WHERE {s("a.batch_id")}
),
moves AS (
    SELECT t.batch_id, t.transfer_date, t.fish_count, t.biomass_kg, t.dest_assignment_id,
           t.source_assignment_id IS NULL AS placement,
           d.at_sea AS into_ring,
           d.at_sea AND NOT coalesce(src.at_sea, false) AS to_sea
      FROM transfer_action t
      JOIN asg d ON d.id = t.dest_assignment_id
      LEFT JOIN asg src ON src.id = t.source_assignment_id
     WHERE {s("t.batch_id")}
),
flows AS (
    SELECT batch_id,
           sum(fish_count) FILTER (WHERE placement) AS eggs_placed,
           sum(fish_count) FILTER (WHERE to_sea) AS put_to_sea,
           sum(biomass_kg) FILTER (WHERE to_sea) AS stocked_kg,
           min(transfer_date) FILTER (WHERE to_sea) AS first_sea_day
      FROM moves GROUP BY batch_id
),
rings AS (
    SELECT batch_id, max(n) AS largest_stocking
      FROM (SELECT batch_id, dest_assignment_id, sum(fish_count) AS n
              FROM moves WHERE into_ring GROUP BY 1, 2) per_ring
     GROUP BY batch_id
),
harvest AS (
    SELECT batch_id, sum(fish_count) AS n, sum(biomass_kg) AS kg, max(harvest_date) AS last_day
      FROM harvest_event WHERE {s("batch_id")}
     GROUP BY batch_id
)"""


def _batch_sql(batch_ids: list[int] | None) -> str:
    s = lambda column: _scope(column, batch_ids)  # noqa: E731
    return f"""
WITH b AS (
    SELECT b.id, g.name AS geography, b.status, b.harvest_target_g
      FROM batch b JOIN geography g ON g.id = b.geography_id
     WHERE {s("b.id")}
),
{flow_ctes(s)},
sea_dead AS (
    SELECT m.batch_id, sum(m.fish_count) AS n
      FROM mortality_event m JOIN asg a ON a.id = m.assignment_id AND a.at_sea
     WHERE {s("m.batch_id")}
     GROUP BY m.batch_id
),
sea_feed AS (
    SELECT f.batch_id, sum(f.amount_kg) AS kg
      FROM feeding_event f JOIN asg a ON a.id = f.assignment_id AND a.at_sea
     WHERE {s("f.batch_id")}
     GROUP BY f.batch_id
),
density AS (
    SELECT s.batch_id,
           max(s.biomass_kg / a.volume_m3) FILTER (WHERE a.at_sea) AS ring_kg_m3,
           max(s.biomass_kg / a.max_biomass_kg) FILTER (WHERE NOT a.at_sea) AS tank_load
      FROM daily_assignment_state s JOIN asg a ON a.id = s.assignment_id
     WHERE {s("s.batch_id")}
     GROUP BY s.batch_id
)
SELECT b.id, b.geography, b.status,
       100.0 * f.put_to_sea / nullif(f.eggs_placed, 0) AS freshwater_survival_pct,
       100.0 * coalesce(d.n, 0) / nullif(f.put_to_sea, 0) AS sea_mortality_pct,
       fd.kg / nullif(h.kg - f.stocked_kg, 0) AS sea_fcr,
       h.kg / nullif(h.n, 0) AS harvest_weight_kg,
       100.0 * (1000.0 * h.kg / nullif(h.n, 0)) / nullif(b.harvest_target_g, 0)
           AS harvest_weight_vs_target_pct,
       h.last_day - f.first_sea_day AS days_at_sea,
       dn.ring_kg_m3 AS ring_density_kg_m3,
       r.largest_stocking AS ring_stocking_fish,
       100.0 * dn.tank_load AS tank_load_pct
  FROM b
  LEFT JOIN flows f ON f.batch_id = b.id
  LEFT JOIN rings r ON r.batch_id = b.id
  LEFT JOIN sea_dead d ON d.batch_id = b.id
  LEFT JOIN sea_feed fd ON fd.batch_id = b.id
  LEFT JOIN harvest h ON h.batch_id = b.id
  LEFT JOIN density dn ON dn.batch_id = b.id
 ORDER BY b.id"""


def _stage_sql(batch_ids: list[int] | None) -> str:
    """Per batch and stage left by transfer: fish received and fish sent on."""
    s = lambda column: _scope(column, batch_ids)  # noqa: E731
    return f"""
WITH asg AS (SELECT id, stage_id FROM assignment WHERE {s("batch_id")}),
moves AS (
    SELECT t.batch_id, d.stage_id AS dest_stage, src.stage_id AS source_stage, t.fish_count
      FROM transfer_action t
      JOIN asg d ON d.id = t.dest_assignment_id
      LEFT JOIN asg src ON src.id = t.source_assignment_id
     WHERE {s("t.batch_id")}
),
per_stage AS (
    SELECT m.batch_id, st.id AS stage_id, st.name,
           sum(m.fish_count) FILTER (
               WHERE m.dest_stage = st.id AND m.source_stage IS DISTINCT FROM st.id) AS fish_in,
           sum(m.fish_count) FILTER (
               WHERE m.source_stage = st.id AND m.dest_stage <> st.id) AS fish_out
      FROM moves m CROSS JOIN lifecycle_stage st
     GROUP BY 1, 2, 3
)
SELECT batch_id, name, 100.0 * fish_out / nullif(fish_in, 0)
  FROM per_stage
 WHERE fish_out IS NOT NULL
 ORDER BY batch_id, stage_id"""


def _temperature_sql(batch_ids: list[int] | None) -> str:
    return f"""
SELECT g.name, (r.reading_time AT TIME ZONE 'UTC')::date AS day, avg(r.value) AS mean
  FROM environmental_reading r
  JOIN container c ON c.id = r.container_id
  JOIN sea_area sa ON sa.id = c.sea_area_id
  JOIN geography g ON g.id = sa.geography_id
 WHERE r.parameter_id = (SELECT id FROM parameter WHERE name = 'Temperature')
   AND {_scope("r.batch_id", batch_ids)}
 GROUP BY 1, 2
 ORDER BY 1, 2"""


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def gather(conn: Connection, batch_ids: Iterable[int] | None = None) -> RealismData:
    """The per-batch figures and sea temperatures of the batches in scope (None: all)."""
    ids = None if batch_ids is None else sorted({int(b) for b in batch_ids})
    params = {"batches": ids}
    cur = conn.execute(_batch_sql(ids), params, prepare=False)  # type: ignore[arg-type]
    names = [d.name for d in cur.description or ()][3:]
    batches = [
        BatchFigures(
            int(r[0]), r[1], r[2], {k: _float(v) for k, v in zip(names, r[3:], strict=True)}
        )
        for r in cur.fetchall()
    ]
    by_id = {b.batch_id: b for b in batches}
    for batch_id, stage, survival in conn.execute(
        _stage_sql(ids),  # type: ignore[arg-type]
        params,
        prepare=False,
    ):
        if batch_id in by_id:
            by_id[batch_id].stage_survival[stage] = _float(survival)
    temperatures: dict[str, list[tuple[date, float]]] = {}
    for geography, day, mean in conn.execute(
        _temperature_sql(ids),  # type: ignore[arg-type]
        params,
        prepare=False,
    ):
        temperatures.setdefault(geography, []).append((day, float(mean)))
    return RealismData(batches, temperatures)


def realism_figures(
    conn: Connection, batch_ids: Iterable[int] | None = None
) -> list[RealismFigure]:
    """Gather and evaluate: the realism section of verify and of the report."""
    return evaluate(gather(conn, batch_ids))
