"""Growth assimilation: the daily state of every assignment, rebuilt from the rows.

Pure: it takes the batch's recorded rows (assignments, transfers, mortality,
harvests, feedings, growth samples, temperature readings) as column arrays and
never the engine's memory. Run in the worker on the rows it is about to write,
or by `aquasim assimilate` on the rows read back from the database, it gives
the same result bit for bit: inputs are put in a canonical order first.

Per assignment-day d (fish move in the morning, at start-of-day weight):
    N(d) = N(d-1) + in(d) - out(d) - deaths(d) - harvested(d)
    W    = count-weighted mix of W(d-1) and each receipt of d, in transfer order
    W(d) = (W^(1/3) + tgc/1000 * T(d))^3 while fish remain, else W
with T(d) the mean of the day's written temperature readings. Weights are
anchored on growth samples: a sample further than ANCHOR_Z standard errors from
the carried weight replaces it (samples inside the sampling error only confirm).
"""

from __future__ import annotations

from datetime import date

import numpy as np

from workers.environment import daily_mean

ANCHOR_Z = 4.0
DAY = np.timedelta64(1, "D")

STATE_COLUMNS = (
    "assignment_id", "state_date", "batch_id", "container_id", "population", "mean_weight_g",
    "biomass_kg", "deaths", "fish_in", "fish_out", "harvested", "feed_kg", "temperature_c", "fcr",
)  # fmt: skip

Columns = dict[str, np.ndarray]


def _days(values: np.ndarray) -> np.ndarray:
    return np.asarray(values).astype("datetime64[D]")


def _sorted(cols: Columns, *keys: str) -> Columns:
    if not cols or len(next(iter(cols.values()))) == 0:
        return cols
    order = np.lexsort(tuple(np.asarray(cols[k]) for k in reversed(keys)))
    return {k: np.asarray(v)[order] for k, v in cols.items()}


class _Grid:
    """Assignments × calendar days of the batch."""

    def __init__(self, assignments: Columns, as_of: date) -> None:
        a = _sorted(assignments, "id")
        self.ids = a["id"].astype(np.int64)
        self.batch_ids = a["batch_id"].astype(np.int64)
        self.container_ids = a["container_id"].astype(np.int64)
        self.tgc = a["tgc"].astype(np.float64)
        self.start = _days(a["start_date"])
        last_open = np.datetime64(as_of, "D") + DAY
        self.end = np.array(
            [last_open if e is None or e != e else np.datetime64(e, "D") for e in a["end_date"]],
            dtype="datetime64[D]",
        )
        self.day0 = self.start.min() if len(self.start) else np.datetime64(as_of, "D")
        self.n_days = int(((self.end.max() if len(self.end) else self.day0) - self.day0) / DAY)
        self.row_of = {int(i): n for n, i in enumerate(self.ids)}

    def shape(self) -> tuple[int, int]:
        return len(self.ids), self.n_days

    def index(self, assignment_ids: np.ndarray, dates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.array([self.row_of[int(i)] for i in assignment_ids], dtype=np.int64)
        days = ((_days(dates) - self.day0) / DAY).astype(np.int64)
        return rows, days

    def add(self, into: np.ndarray, assignment_ids: np.ndarray, dates: np.ndarray, values) -> None:
        if len(assignment_ids):
            rows, days = self.index(assignment_ids, dates)
            np.add.at(into, (rows, days), values)


def _temperature(grid: _Grid, readings: Columns) -> np.ndarray:
    """Daily mean of each assignment's temperature readings (NaN where none)."""
    out = np.full(grid.shape(), np.nan)
    if not len(readings.get("assignment_id", ())):
        return out
    r = _sorted(readings, "assignment_id", "reading_time")
    ids = r["assignment_id"].astype(np.int64)
    times = np.asarray(r["reading_time"]).astype("datetime64[us]")
    values = r["value"].astype(np.float64)
    dates = times.astype("datetime64[D]")
    bounds = np.flatnonzero((ids[1:] != ids[:-1]) | (dates[1:] != dates[:-1])) + 1
    starts = np.concatenate(([0], bounds))
    counts = np.diff(np.append(starts, len(ids)))
    rows, days = grid.index(ids[starts], dates[starts])
    per_day = int(counts.max())
    if np.all(counts == per_day):  # complete days: the engine's own daily mean
        means = daily_mean(values.reshape(-1, per_day))
    else:
        means = np.add.reduceat(values, starts) / counts
    out[rows, days] = means
    return out


def assimilate(
    assignments: Columns,
    transfers: Columns,
    mortality: Columns,
    harvests: Columns,
    feedings: Columns,
    samples: Columns,
    temperature: Columns,
    as_of: date,
) -> Columns:
    """Columns of daily_assignment_state, one row per assignment-day."""
    grid = _Grid(assignments, as_of)
    shape = grid.shape()
    fish_in = np.zeros(shape, np.int64)
    fish_out = np.zeros(shape, np.int64)
    deaths = np.zeros(shape, np.int64)
    harvested = np.zeros(shape, np.int64)
    removed_kg = np.zeros(shape)  # biomass that left: sent, harvested, dead
    received_kg = np.zeros(shape)
    feed = np.zeros(shape)

    t = _sorted(transfers, "id")
    grid.add(fish_in, t["dest_assignment_id"], t["transfer_date"], t["fish_count"])
    grid.add(received_kg, t["dest_assignment_id"], t["transfer_date"], t["biomass_kg"])
    sent = np.array([s is not None and s == s for s in t["source_assignment_id"]], dtype=bool)
    if sent.any():
        sources = t["source_assignment_id"][sent].astype(np.int64)
        grid.add(fish_out, sources, t["transfer_date"][sent], t["fish_count"][sent])
        grid.add(removed_kg, sources, t["transfer_date"][sent], t["biomass_kg"][sent])
    grid.add(deaths, mortality["assignment_id"], mortality["event_date"], mortality["fish_count"])
    grid.add(
        removed_kg, mortality["assignment_id"], mortality["event_date"], mortality["biomass_kg"]
    )
    grid.add(harvested, harvests["assignment_id"], harvests["harvest_date"], harvests["fish_count"])
    grid.add(
        removed_kg, harvests["assignment_id"], harvests["harvest_date"], harvests["biomass_kg"]
    )
    feed_dates = np.asarray(feedings["fed_at"]).astype("datetime64[D]")
    grid.add(feed, feedings["assignment_id"], feed_dates, feedings["amount_kg"])
    temperature_c = _temperature(grid, temperature)

    population = np.cumsum(fish_in - fish_out - deaths - harvested, axis=1)
    weight = _weights(grid, t, population, temperature_c, samples)
    return _state_columns(
        grid,
        population,
        weight,
        deaths,
        fish_in,
        fish_out,
        harvested,
        feed,
        temperature_c,
        removed_kg,
        received_kg,
    )


def _weights(
    grid: _Grid,
    transfers: Columns,
    population: np.ndarray,
    temperature_c: np.ndarray,
    samples: Columns,
) -> np.ndarray:
    """End-of-day mean weight, day by day for all assignments at once."""
    n, days = grid.shape()
    weight = np.zeros((n, days))
    receipts: dict[int, list[tuple[int, int, float]]] = {}
    if len(transfers.get("id", ())):
        rows, day_idx = grid.index(transfers["dest_assignment_id"], transfers["transfer_date"])
        for row, day, count, w in zip(
            rows, day_idx, transfers["fish_count"], transfers["mean_weight_g"], strict=True
        ):
            receipts.setdefault(int(day), []).append((int(row), int(count), float(w)))
    anchors = _anchors(grid, samples)
    current = np.zeros(n)
    held = np.zeros(n, np.int64)  # fish at the start of the day
    for day in range(days):
        for row, count, w in receipts.get(day, ()):
            total = held[row] + count
            current[row] = (held[row] * current[row] + count * w) / total
            held[row] = total
        alive = population[:, day] > 0
        temps = np.nan_to_num(temperature_c[:, day])
        grown = (np.cbrt(current) + grid.tgc / 1000.0 * temps) ** 3
        current = np.where(alive, grown, current)
        for row, mean, tolerance in anchors.get(day, ()):
            if abs(mean - current[row]) > tolerance:
                current[row] = mean
        weight[:, day] = current
        held = population[:, day].copy()
    return weight


def _anchors(grid: _Grid, samples: Columns) -> dict[int, list[tuple[int, float, float]]]:
    out: dict[int, list[tuple[int, float, float]]] = {}
    if not len(samples.get("assignment_id", ())):
        return out
    rows, days = grid.index(samples["assignment_id"], samples["sample_date"])
    tolerance = ANCHOR_Z * samples["sd_weight_g"] / np.sqrt(samples["fish_count"])
    for row, day, mean, tol in zip(rows, days, samples["mean_weight_g"], tolerance, strict=True):
        out.setdefault(int(day), []).append((int(row), float(mean), float(tol)))
    return out


def _state_columns(
    grid: _Grid,
    population,
    weight,
    deaths,
    fish_in,
    fish_out,
    harvested,
    feed,
    temperature_c,
    removed_kg,
    received_kg,
) -> Columns:
    day_index = np.arange(grid.n_days)
    dates = grid.day0 + day_index.astype("timedelta64[D]")
    inside = (dates[None, :] >= grid.start[:, None]) & (dates[None, :] < grid.end[:, None])
    biomass = population * weight / 1000.0
    gain = biomass + np.cumsum(removed_kg - received_kg, axis=1)
    feed_to_date = np.cumsum(feed, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        fcr = np.where((gain > 0) & (feed_to_date > 0), feed_to_date / gain, np.nan)
    rows, days = np.nonzero(inside)  # row-major: by assignment id, then date
    return {
        "assignment_id": grid.ids[rows],
        "state_date": dates[days],
        "batch_id": grid.batch_ids[rows],
        "container_id": grid.container_ids[rows],
        "population": population[rows, days],
        "mean_weight_g": weight[rows, days],
        "biomass_kg": biomass[rows, days],
        "deaths": deaths[rows, days],
        "fish_in": fish_in[rows, days],
        "fish_out": fish_out[rows, days],
        "harvested": harvested[rows, days],
        "feed_kg": feed[rows, days],
        "temperature_c": temperature_c[rows, days],
        "fcr": fcr[rows, days],
    }


def assimilate_rows(rows, as_of: date) -> Columns:
    """Daily state of an engine result (workers.engine.BatchRows)."""
    t = rows.tables
    return assimilate(
        t["assignment"],
        t["transfer_action"],
        t["mortality_event"],
        t["harvest_event"],
        t["feeding_event"],
        t["growth_sample"],
        rows.temperature,
        as_of,
    )
