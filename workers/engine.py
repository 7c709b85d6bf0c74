"""The event engine: one batch, day by day, as a pure function of its plan entry.

`simulate(batch, scenario, farm, run_seed)` returns every row the batch leaves
behind as numpy column arrays (environmental readings as a regenerable stream).
It uses only the batch's reservations and its own generator, seeded from the
plan, so the rows never depend on which worker ran it or when.

One function, `_Engine.step`, advances one day for all of the batch's
containers at once. On day d, in this order:

1. morning moves at start-of-day weight: placements, transfers (a source emptied
   on d loses its handling deaths, sends the rest and closes at 0), harvests;
2. deaths of every other open stay (negative binomial around the stage rate,
   with post-handling spikes and outbreaks), valued at start-of-day weight;
3. growth with the day's mean written temperature:
   W_end^(1/3) = W_start^(1/3) + tgc/1000 * T;
4. feeding = biomass gain * FCR (with noise), not on handling days;
5. weekly growth samples and lice counts, vaccination, delousing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta

import numpy as np

from pipeline.farm import Container, Farm
from pipeline.planner import BatchPlan
from pipeline.scenario import MORTALITY_CAUSES, ParameterSpec, Scenario, StageSpec
from workers import environment as env

ASSIGNMENT_ID_BLOCK = 10_000  # assignment id = batch id * block + n
TRANSFER_ID_BLOCK = 1_000_000  # transfer action id = batch id * block + n
NB_DISPERSION = 3.0  # negative binomial k: variance = mu + mu^2 / k
BASE_CAUSES = {  # how ordinary deaths split over causes, freshwater / sea
    False: {"UNKNOWN": 0.55, "DISEASE": 0.25, "ENVIRONMENTAL": 0.20},
    True: {"UNKNOWN": 0.45, "DISEASE": 0.25, "ENVIRONMENTAL": 0.15, "PREDATION": 0.15},
}
CAUSE_CODE = {c: i for i, c in enumerate(MORTALITY_CAUSES)}
CAUSE_WEIGHTS = np.array(  # row 0 freshwater, row 1 sea; columns in MORTALITY_CAUSES order
    [[BASE_CAUSES[sea].get(c, 0.0) for c in MORTALITY_CAUSES] for sea in (False, True)]
)
FEED_TYPES = (  # pellet size by fish weight (upper bound, g)
    (1.0, "Starter 0.5 mm"),
    (5.0, "Fry 1.0 mm"),
    (30.0, "Grower 2 mm"),
    (100.0, "Grower 3 mm"),
    (300.0, "Smolt 4 mm"),
    (1000.0, "Marine 6 mm"),
    (3000.0, "Marine 9 mm"),
    (math.inf, "Marine 12 mm"),
)
LICE_GROWTH_PER_DEGREE_DAY = 0.0035
LICE_INFLOW_PER_DAY = 0.002
CONDITION_FACTOR = (1.15, 0.05)
SAMPLE_CV = 0.18
SAMPLE_Z_MAX = 3.0  # sample means stay within 3 standard errors of the true mean


def calibrated_tgc(stage: StageSpec) -> float:
    """TGC that takes the stage's fish from weight in to weight out at its mid temperature."""
    if stage.tgc is not None:
        return stage.tgc
    assert stage.weight_out_g is not None and stage.temperature_c is not None
    mid_t = sum(stage.temperature_c) / 2
    gain = stage.weight_out_g ** (1 / 3) - stage.weight_in_g ** (1 / 3)
    return 1000 * gain / (mid_t * stage.days)


def feed_type(weight_g: float) -> str:
    return next(name for upper, name in FEED_TYPES if weight_g < upper)


def grow(weight_g: np.ndarray, tgc: np.ndarray, temperature_c: np.ndarray) -> np.ndarray:
    """One day of the cube-root thermal growth model."""
    return (np.cbrt(weight_g) + tgc / 1000.0 * temperature_c) ** 3


# ---- result -----------------------------------------------------------------------------------


@dataclass
class _Stay:
    """One assignment while the engine runs."""

    id: int
    container: Container
    stage: StageSpec
    start: int  # day index from the batch start
    tgc: float
    multiplier: float
    end: int | None = None  # exclusive day index
    pop: int = 0
    weight: float = 0.0
    spike_from: int = -(10**6)  # day of the last handling
    outbreak_until: int = -1
    lice: float = 0.0
    vaccinated: bool = False
    biomass: list[float] = field(default_factory=list)  # end-of-day, per day of stay
    fed: list[bool] = field(default_factory=list)


@dataclass
class BatchRows:
    """Everything one batch writes. `tables` holds column arrays per table (the
    readings excepted); `readings()` streams environmental readings in pieces."""

    batch_id: int
    status: str
    end_date: date | None
    tables: dict[str, dict[str, np.ndarray]]
    temperature: dict[
        str, np.ndarray
    ]  # the Temperature readings: assignment_id, reading_time, value
    _reading_sources: list = field(repr=False, default_factory=list)
    _minutes: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    _feeding_hours: tuple[int, ...] = ()

    def readings(self, parameter: str | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Readings of one stay's sensor at a time (optionally of one parameter only)."""
        for source in self._reading_sources:
            cols, window, lo, days, first_day = source
            if parameter is not None and window.parameter.name != parameter:
                continue
            values = env.sensor_values(window, self._minutes, self._feeding_hours)[lo : lo + days]
            yield _reading_columns(cols, values, first_day, self._minutes)

    def reading_count(self) -> int:
        return sum(days for _, _, _, days, _ in self._reading_sources) * len(self._minutes)


def _reading_columns(
    stay_cols: tuple[int, int, int, int, int],
    values: np.ndarray,
    first_day: date,
    minutes: np.ndarray,
) -> dict[str, np.ndarray]:
    batch_id, assignment_id, container_id, sensor_id, parameter_id = stay_cols
    days, per_day = values.shape
    day0 = np.datetime64(first_day, "D").astype("datetime64[m]")
    times = (
        (
            day0
            + (np.arange(days, dtype=np.int64) * 1440)[:, None].astype("timedelta64[m]")
            + minutes.astype(np.int64)[None, :].astype("timedelta64[m]")
        )
        .ravel()
        .astype("datetime64[us]")
    )
    n = days * per_day
    return {
        "batch_id": np.full(n, batch_id, dtype=np.int64),
        "assignment_id": np.full(n, assignment_id, dtype=np.int64),
        "container_id": np.full(n, container_id, dtype=np.int64),
        "sensor_id": np.full(n, sensor_id, dtype=np.int64),
        "parameter_id": np.full(n, parameter_id, dtype=np.int64),
        "reading_time": times,
        "value": values.ravel(),
    }


# ---- the engine -------------------------------------------------------------------------------


class _Rows:
    """Row buffers: plain lists per column, turned into arrays once at the end."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, list]] = {}

    def add(self, table: str, **row) -> None:
        cols = self.data.setdefault(table, {k: [] for k in row})
        for k, v in row.items():
            cols[k].append(v)

    def extend(self, table: str, **columns: list) -> None:
        cols = self.data.setdefault(table, {k: [] for k in columns})
        for k, values in columns.items():
            cols[k].extend(values)

    def arrays(self, table: str, columns: dict[str, str]) -> dict[str, np.ndarray]:
        cols = self.data.get(table, {})
        return {
            name: np.asarray(cols.get(name, []), dtype=dtype) for name, dtype in columns.items()
        }


class _Engine:
    def __init__(self, batch: BatchPlan, scenario: Scenario, farm: Farm, run_seed: int) -> None:
        self.batch = batch
        self.scenario = scenario
        self.farm = farm
        self.run_seed = run_seed
        self.h = scenario.husbandry
        self.rng = np.random.default_rng(np.random.SeedSequence([batch.seed, 1]))
        self.start = batch.start_date
        self.last_day = (scenario.as_of_date - batch.start_date).days  # inclusive
        self.stays: list[_Stay] = []
        self.open: list[_Stay] = []
        self.rows = _Rows()
        self.transfer_n = 0
        self.tgc = [calibrated_tgc(s) for s in scenario.stages]
        self.vaccination_weight = float(self.rng.uniform(*self.h.vaccination_weight_g))
        self.harvest_queue: list[_Stay] = []
        self.harvest_started = False
        self.sea_day0: int | None = None
        self.temperature_c: dict[int, np.ndarray] = {}  # container id -> daily mean, by day index
        self.temperature_window: dict[int, env.SensorWindow] = {}  # whole reservation
        self.reading_windows: dict[int, tuple[int, int]] = {}  # container -> [first, last] day
        self.pending: dict[int, list] = {}  # day -> moves
        self.delousing: dict[int, list[_Stay]] = {}  # day -> rings
        self.handled: set[int] = set()  # stays handled today: no feeding
        self.vaccination_stage = len(scenario.freshwater_stages) - 2  # late Parr
        self.stage_day0 = [self._day(d) for d in batch.stage_starts]
        self.mortality_shape = [self._stage_shape(stage) for stage in scenario.stages]
        self._prepare_temperatures()

    # ---- environment before the day loop ------------------------------------------------------
    def _day(self, d: date) -> int:
        return (d - self.start).days

    def _date(self, day: int) -> date:
        return self.start + timedelta(days=day)

    def _prepare_temperatures(self) -> None:
        minutes = np.asarray(self.scenario.readings.minutes_of_day, dtype=np.float64)
        temperature = self._parameter("Temperature")
        for r in self.batch.reservations:
            first = self._day(r.start)
            last = min(self._day(r.end) - 1, self.last_day)
            if last < first:
                continue
            container = self.farm.container_by_id[r.container_id]
            days = last - first + 1
            base = self._temperature_base(container, r.stage_id, r.start, days)
            window = env.SensorWindow(
                temperature, base, np.zeros(days), self._sensor_seed(container.id, "Temperature")
            )
            values = env.sensor_values(window, minutes, self.h.feeding_hours)
            self.reading_windows[container.id] = (first, last)
            self.temperature_window[container.id] = window
            self.temperature_c[container.id] = env.daily_mean(values)

    def _parameter(self, name: str) -> ParameterSpec:
        return next(p for p in self.scenario.parameters if p.name == name)

    def _sensor_seed(self, container_id: int, parameter: str) -> tuple[int, ...]:
        return (self.batch.seed, 2, container_id, self.farm.parameter_id[parameter])

    def _temperature_base(
        self, container: Container, stage_id: int, first: date, days: int
    ) -> np.ndarray:
        stage = self.scenario.stages[stage_id - 1]
        rng = np.random.default_rng(np.random.SeedSequence([self.batch.seed, 3, container.id]))
        drift = self._parameter("Temperature").drift_sd
        if stage.at_sea:
            geo = self.scenario.geographies[container.geography_id - 1]
            sea = env.sea_area_temperature_c(
                self.scenario, self.run_seed, container.sea_area_id or 0, geo, first, days
            )
            return sea + env.ar1(rng, days, drift / 3)
        lo, hi = stage.temperature_c or (0.0, 0.0)
        setpoint = rng.uniform(lo + 0.25 * (hi - lo), hi - 0.25 * (hi - lo))
        return np.clip(setpoint + env.ar1(rng, days, drift), lo, hi)

    # ---- stays ---------------------------------------------------------------------------------
    def _open_stay(self, container_id: int, stage: StageSpec, day: int, multiplier: float) -> _Stay:
        stay = _Stay(
            id=self.batch.batch_id * ASSIGNMENT_ID_BLOCK + len(self.stays) + 1,
            container=self.farm.container_by_id[container_id],
            stage=stage,
            start=day,
            tgc=self.tgc[stage.id - 1] * multiplier,
            multiplier=multiplier,
        )
        self.stays.append(stay)
        self.open.append(stay)
        return stay

    def _close(self, stay: _Stay, day: int) -> None:
        stay.end = day + 1
        self.open.remove(stay)

    def _receive(
        self, stay: _Stay, count: int, weight: float, day: int, source: _Stay | None
    ) -> None:
        total = stay.pop + count
        stay.weight = (stay.pop * stay.weight + count * weight) / total
        stay.pop = total
        stay.spike_from = day
        self.handled.add(stay.id)
        self.transfer_n += 1
        self.rows.add(
            "transfer_action",
            id=self.batch.batch_id * TRANSFER_ID_BLOCK + self.transfer_n,
            batch_id=self.batch.batch_id,
            source_assignment_id=source.id if source else None,
            dest_assignment_id=stay.id,
            transfer_date=self._date(day),
            fish_count=count,
            mean_weight_g=weight,
            biomass_kg=count * weight / 1000.0,
        )

    # ---- planning of moves ---------------------------------------------------------------------
    def _shares(self, stage: StageSpec, n: int) -> tuple[np.ndarray, list[float]]:
        """Destination multipliers and the share of fish each gets: fewer fish where they
        will grow faster, so every container ends the stage at the same biomass."""
        spread = stage.growth_spread
        multipliers = [float(self.rng.uniform(1 - spread, 1 + spread)) for _ in range(n)]
        if stage.at_sea:
            return np.full(n, 1.0 / n), multipliers
        tgc = self.tgc[stage.id - 1]
        lo, hi = stage.temperature_c or (0.0, 0.0)
        degree_days = (lo + hi) / 2 * stage.days
        end_weight = [
            (stage.weight_in_g ** (1 / 3) + tgc * m / 1000 * degree_days) ** 3 for m in multipliers
        ]
        inverse = 1.0 / np.asarray(end_weight)
        return inverse / inverse.sum(), multipliers

    def _schedule_transfer(self, from_stage: StageSpec, day: int) -> None:
        """Empty the stage's containers over the transfer window, 1..max a day."""
        sources = [s for s in self.open if s.stage.id == from_stage.id]
        # fullest first: the tanks left longest in the window are the ones with most room
        order = sorted(
            sources, key=lambda s: (-s.pop * s.weight / s.container.max_biomass_kg, s.id)
        )
        n = len(order)
        most = self.h.max_sources_per_day
        min_days = math.ceil(n / most)
        days = int(
            self.rng.integers(min_days, max(min_days, min(self.h.transfer_window_days, n)) + 1)
        )
        per_day = np.ones(days, dtype=int)
        for _ in range(n - days):  # spread the rest, at most `most` a day
            room = np.flatnonzero(per_day < most)
            per_day[self.rng.choice(room)] += 1
        offsets = np.sort(self.rng.choice(self.h.transfer_window_days, size=days, replace=False))
        offsets -= offsets[0]  # the window opens with the first move
        to_stage = self.scenario.stages[from_stage.id]
        dests = list(self.batch.containers_of(to_stage.id))
        shares, multipliers = self._shares(to_stage, len(dests))
        total = sum(s.pop for s in sources)
        move = _Pour(dests, shares * total, multipliers, to_stage)
        i = 0
        for offset, count in zip(offsets, per_day, strict=True):
            self.pending.setdefault(day + int(offset), []).append((move, order[i : i + count]))
            i += count

    def _place_eggs(self) -> None:
        stage = self.scenario.stages[0]
        trays = list(self.batch.containers_of(stage.id))
        shares, multipliers = self._shares(stage, len(trays))
        counts = np.floor(shares * self.batch.eggs).astype(np.int64)
        counts[-1] += self.batch.eggs - counts.sum()
        for cid, count, m in zip(trays, counts, multipliers, strict=True):
            stay = self._open_stay(cid, stage, 0, m)
            self._receive(stay, int(count), stage.weight_in_g, 0, None)

    def _pour(self, move: _Pour, sources: list[_Stay], day: int) -> None:
        for source in sources:
            lost = int(self.rng.binomial(source.pop, self.h.handling_loss_pct / 100))
            self._death_row(source, day, "HANDLING", lost)
            left = source.pop  # after its handling deaths
            weight = source.weight
            while left > 0:
                stay, room = move.next_destination(self, day)
                sent = left if room is None else min(left, room)
                if sent <= 0:
                    continue
                move.filled[move.current] += sent
                self._receive(stay, sent, weight, day, source)
                left -= sent
            source.pop = 0
            source.biomass.append(0.0)
            source.fed.append(False)
            self._close(source, day)

    # ---- mortality ------------------------------------------------------------------------------
    def _stage_shape(self, stage: StageSpec) -> np.ndarray:
        """Relative mortality over the stage's days (mean 1): hatching or first-feeding peaks."""
        if stage.mortality_peak_day is None or stage.mortality_peak_factor <= 1:
            return np.ones(stage.days)
        days = np.arange(stage.days)
        z = (days - stage.mortality_peak_day) / stage.mortality_peak_width_days
        shape = 1 + (stage.mortality_peak_factor - 1) * np.exp(-0.5 * z**2)
        return shape / shape.mean()

    def _base_rate(self, stay: _Stay, day: int) -> float:
        stage = stay.stage
        stage_day = day - self.stage_day0[stage.id - 1]
        shape = self.mortality_shape[stage.id - 1]
        return stage.mortality_pct_day / 100 * float(shape[min(max(stage_day, 0), len(shape) - 1)])

    def _death_row(self, stay: _Stay, day: int, cause: str, count: int) -> None:
        if count <= 0:
            return
        stay.pop -= count
        self.rows.add(
            "mortality_event",
            batch_id=self.batch.batch_id,
            assignment_id=stay.id,
            container_id=stay.container.id,
            event_date=self._date(day),
            fish_count=count,
            cause=CAUSE_CODE[cause],
            biomass_kg=count * stay.weight / 1000.0,
        )

    def _mortality(self, stays: list[_Stay], day: int) -> None:
        """Deaths of all open stays at once: negative binomial around the stage rate, with
        post-handling spikes and outbreaks, split over causes."""
        if not stays:
            return
        h = self.h
        pop = np.array([s.pop for s in stays], dtype=np.int64)
        base = np.array([self._base_rate(s, day) for s in stays])
        since = day - np.array([s.spike_from for s in stays])
        recent = (since >= 0) & (since < h.handling_spike_days)
        spike = np.where(recent, base * (h.handling_spike_factor - 1) * np.exp(-since / 2.0), 0.0)
        calm = np.array([s.outbreak_until < day for s in stays])
        for i in np.flatnonzero(calm & (self.rng.random(len(stays)) < h.outbreak_prob_per_day)):
            stays[i].outbreak_until = day + int(self.rng.integers(*h.outbreak_days))
        sick = day <= np.array([s.outbreak_until for s in stays])
        outbreak = np.where(sick, base * (h.outbreak_factor - 1), 0.0)
        mu = pop * (base + spike + outbreak)
        deaths = np.minimum(
            self.rng.negative_binomial(NB_DISPERSION, NB_DISPERSION / (NB_DISPERSION + mu)), pop
        )
        hit = np.flatnonzero(deaths > 0)
        if not len(hit):
            return
        at_sea = np.array([stays[i].stage.at_sea for i in hit], dtype=np.int64)
        weights = base[hit, None] * CAUSE_WEIGHTS[at_sea]
        weights[:, CAUSE_CODE["HANDLING"]] += spike[hit]
        weights[:, CAUSE_CODE["DISEASE"]] += outbreak[hit]
        split = self.rng.multinomial(deaths[hit], weights / weights.sum(axis=1, keepdims=True))
        rows, causes = np.nonzero(split)
        counts = split[rows, causes]
        dead = [stays[i] for i in hit[rows]]
        for stay, count in zip(dead, counts, strict=True):
            stay.pop -= int(count)
        self.rows.extend(
            "mortality_event",
            batch_id=[self.batch.batch_id] * len(dead),
            assignment_id=[s.id for s in dead],
            container_id=[s.container.id for s in dead],
            event_date=[self._date(day)] * len(dead),
            fish_count=counts.tolist(),
            cause=causes.tolist(),
            biomass_kg=(counts * np.array([s.weight for s in dead]) / 1000.0).tolist(),
        )

    # ---- one day --------------------------------------------------------------------------------
    def step(self, day: int) -> None:
        self.handled = set()
        for move, sources in self.pending.pop(day, []):
            self._pour(move, sources, day)
        for stay in self.delousing.pop(day, []):
            if stay in self.open and stay.pop > 0:
                stay.lice *= 1 - float(self.rng.uniform(*self.h.delousing_efficacy))
                self._treatment(stay, day, "delousing")
        self._vaccinations(day)
        self._harvest(day)
        self._mortality([s for s in self.open if s.pop > 0], day)
        self._grow_and_feed([s for s in self.open if s.pop > 0], day)
        for stay in self.open:
            if stay.pop <= 0:  # emptied by deaths alone: stays open, holds nothing
                stay.biomass.append(0.0)
                stay.fed.append(False)
        self._observe(day)

    def _temperature_today(self, stay: _Stay, day: int) -> float:
        first_day = self.reading_windows[stay.container.id][0]
        return float(self.temperature_c[stay.container.id][day - first_day])

    def _grow_and_feed(self, stays: list[_Stay], day: int) -> None:
        """Growth of all stays holding fish, then feed = biomass gain × FCR (not when handled)."""
        if not stays:
            return
        start_weight = np.array([s.weight for s in stays])
        tgc = np.array([s.tgc for s in stays])
        temperature = np.array([self._temperature_today(s, day) for s in stays])
        weight = grow(start_weight, tgc, temperature)
        pop = np.array([s.pop for s in stays], dtype=np.int64)
        gain_kg = pop * (weight - start_weight) / 1000.0
        fcr = np.array([s.stage.fcr or 0.0 for s in stays])
        handled = np.array([s.id in self.handled for s in stays])
        fed = (fcr > 0) & ~handled & (gain_kg > 0)
        for stay, w, n, f in zip(stays, weight.tolist(), pop.tolist(), fed.tolist(), strict=True):
            stay.weight = w
            stay.biomass.append(n * w / 1000.0)
            stay.fed.append(f)
        if fed.any():
            self._feed([stays[i] for i in np.flatnonzero(fed)], day, (gain_kg * fcr)[fed],
                       start_weight[fed], pop[fed])  # fmt: skip

    def _feed(
        self, stays: list[_Stay], day: int, need_kg: np.ndarray, start_weight: np.ndarray,
        pop: np.ndarray,
    ) -> None:  # fmt: skip
        """Two (or more) feedings a day per stay, the day's ration split with some noise."""
        n = len(stays)
        noise = np.maximum(0.5, 1 + self.rng.normal(0, self.h.feed_noise, n))
        total = need_kg * noise
        hours = self.h.feeding_hours
        split = self.rng.dirichlet(np.full(len(hours), 20.0), size=n)
        kinds = [feed_type(w) for w in start_weight.tolist()]
        biomass = (pop * start_weight / 1000.0).tolist()
        day_start = np.datetime64(self._date(day), "D").astype("datetime64[us]")
        for j, hour in enumerate(hours):
            self.rows.extend(
                "feeding_event",
                batch_id=[self.batch.batch_id] * n,
                assignment_id=[s.id for s in stays],
                container_id=[s.container.id for s in stays],
                fed_at=[day_start + np.timedelta64(hour, "h")] * n,
                feed_type=kinds,
                amount_kg=(total * split[:, j]).tolist(),
                biomass_kg=biomass,
            )

    # ---- treatments, harvest, observations -------------------------------------------------------
    def _treatment(self, stay: _Stay, day: int, kind: str) -> None:
        stay.spike_from = day
        self.handled.add(stay.id)
        self.rows.add(
            "treatment",
            batch_id=self.batch.batch_id,
            assignment_id=stay.id,
            container_id=stay.container.id,
            treatment_date=self._date(day),
            kind=kind,
        )

    def _vaccinations(self, day: int) -> None:
        """Once per container of the stage in which fish pass the vaccination weight."""
        for stay in self.open:
            if stay.pop <= 0 or stay.id in self.handled or stay.vaccinated:
                continue
            if stay.stage.id != self.vaccination_stage:
                continue
            next_window = self._day(self.batch.stage_starts[stay.stage.id])
            if stay.weight >= self.vaccination_weight or day >= next_window - 2:
                stay.vaccinated = True
                self._treatment(stay, day, "vaccination")

    def _harvest(self, day: int) -> None:
        sea = [s for s in self.open if s.stage.at_sea and s.pop > 0]
        if not sea:
            return
        assert self.sea_day0 is not None
        for stay in sea:  # a ring at its density limit is harvested at once
            limit = stay.container.max_biomass_kg
            if stay.pop * stay.weight / 1000.0 >= limit and stay not in self.harvest_queue:
                self.harvest_queue.insert(0, stay)
        mean = sum(s.pop * s.weight for s in sea) / sum(s.pop for s in sea)
        receiving = day < self.sea_day0 + self.h.transfer_window_days and any(
            not s.stage.at_sea for s in self.open
        )
        latest = day >= self.sea_day0 + self.scenario.sea_stage.days
        if (
            not self.harvest_started
            and not receiving
            and (mean >= self.batch.harvest_target_g or latest)
        ):
            self.harvest_started = True
            ordered = sorted(sea, key=lambda s: (-s.weight, s.id))
            self.harvest_queue += [s for s in ordered if s not in self.harvest_queue]
        quota = self.h.harvest_rings_per_day if self.harvest_started else 0
        for stay in list(self.harvest_queue):
            over_limit = stay.pop * stay.weight / 1000.0 >= stay.container.max_biomass_kg
            if quota <= 0 and not over_limit:
                break
            self.harvest_queue.remove(stay)
            quota -= 1
            self.rows.add(
                "harvest_event",
                batch_id=self.batch.batch_id,
                assignment_id=stay.id,
                container_id=stay.container.id,
                harvest_date=self._date(day),
                fish_count=stay.pop,
                biomass_kg=stay.pop * stay.weight / 1000.0,
                mean_weight_g=stay.weight,
            )
            stay.pop = 0
            stay.biomass.append(0.0)
            stay.fed.append(False)
            self.handled.add(stay.id)
            self._close(stay, day)

    def _observe(self, day: int) -> None:
        h = self.h
        for stay in self.open:
            if (
                stay.pop <= 0
                or (day - stay.start) % h.sample_interval_days != h.sample_interval_days - 1
            ):
                continue
            self._growth_sample(stay, day)
            if stay.stage.at_sea:
                self._lice(stay, day)

    def _growth_sample(self, stay: _Stay, day: int) -> None:
        n = min(self.h.sample_fish, stay.pop)
        sd = stay.weight * SAMPLE_CV * float(self.rng.uniform(0.8, 1.2))
        z = float(np.clip(self.rng.normal(), -SAMPLE_Z_MAX, SAMPLE_Z_MAX))
        mean = stay.weight + z * sd / math.sqrt(n)
        k = float(self.rng.normal(*CONDITION_FACTOR))
        self.rows.add(
            "growth_sample",
            batch_id=self.batch.batch_id,
            assignment_id=stay.id,
            container_id=stay.container.id,
            sample_date=self._date(day),
            fish_count=n,
            mean_weight_g=mean,
            sd_weight_g=sd,
            mean_length_cm=(100.0 * mean / k) ** (1 / 3),
            condition_factor=k,
        )

    def _lice(self, stay: _Stay, day: int) -> None:
        temperature = self._temperature_today(stay, day)
        stay.lice = stay.lice * math.exp(
            LICE_GROWTH_PER_DEGREE_DAY * temperature * self.h.sample_interval_days
        )
        stay.lice += LICE_INFLOW_PER_DAY * self.h.sample_interval_days
        n = self.h.lice_fish
        adult = float(self.rng.poisson(stay.lice * n)) / n
        self.rows.add(
            "lice_count",
            batch_id=self.batch.batch_id,
            assignment_id=stay.id,
            container_id=stay.container.id,
            count_date=self._date(day),
            fish_count=n,
            adult_female_per_fish=adult,
            mobile_per_fish=float(self.rng.poisson(stay.lice * 2.0 * n)) / n,
            attached_per_fish=float(self.rng.poisson(stay.lice * 1.5 * n)) / n,
        )
        if adult > self.h.lice_threshold:
            self.delousing.setdefault(day + 1, []).append(stay)

    # ---- the run --------------------------------------------------------------------------------
    def run(self) -> None:
        transitions = {  # day the incoming window of stage k opens -> stage k
            self._day(start): stage
            for start, stage in zip(
                self.batch.stage_starts[1:], self.scenario.stages[1:], strict=True
            )
            if self.batch.containers_of(stage.id)
        }
        self._place_eggs()
        for day in range(0, self.last_day + 1):
            stage = transitions.get(day)
            if stage is not None:
                self._schedule_transfer(self.scenario.stages[stage.id - 2], day)
                if stage.at_sea:
                    self.sea_day0 = day
            self.step(day)
            if not self.open:
                break


@dataclass
class _Pour:
    """Fills one stage's destination containers in turn, each up to its share."""

    containers: list[int]
    targets: np.ndarray
    multipliers: list[float]
    stage: StageSpec
    current: int = 0
    stays: list[_Stay] = field(default_factory=list)
    filled: list[int] = field(default_factory=list)

    def next_destination(self, engine: _Engine, day: int) -> tuple[_Stay, int | None]:
        """The destination to pour into and its room (None = take everything left)."""
        if not self.stays:
            self._open(engine, day)
        last = self.current == len(self.containers) - 1
        room = int(round(self.targets[self.current])) - self.filled[self.current]
        if room <= 0 and not last:
            self.current += 1
            self._open(engine, day)
            last = self.current == len(self.containers) - 1
            room = int(round(self.targets[self.current])) - self.filled[self.current]
        return self.stays[self.current], None if last else room

    def _open(self, engine: _Engine, day: int) -> None:
        n = len(self.stays)
        self.stays.append(
            engine._open_stay(self.containers[n], self.stage, day, self.multipliers[n])
        )
        self.filled.append(0)


# ---- assembling the rows ----------------------------------------------------------------------

_COLUMN_TYPES: dict[str, dict[str, str]] = {
    "transfer_action": {
        "id": "i8",
        "batch_id": "i8",
        "source_assignment_id": "O",
        "dest_assignment_id": "i8",
        "transfer_date": "datetime64[D]",
        "fish_count": "i8",
        "mean_weight_g": "f8",
        "biomass_kg": "f8",
    },
    "mortality_event": {
        "batch_id": "i8",
        "assignment_id": "i8",
        "container_id": "i8",
        "event_date": "datetime64[D]",
        "fish_count": "i8",
        "cause": "i8",
        "biomass_kg": "f8",
    },
    "feeding_event": {
        "batch_id": "i8",
        "assignment_id": "i8",
        "container_id": "i8",
        "fed_at": "datetime64[us]",
        "feed_type": "O",
        "amount_kg": "f8",
        "biomass_kg": "f8",
    },
    "growth_sample": {
        "batch_id": "i8",
        "assignment_id": "i8",
        "container_id": "i8",
        "sample_date": "datetime64[D]",
        "fish_count": "i8",
        "mean_weight_g": "f8",
        "sd_weight_g": "f8",
        "mean_length_cm": "f8",
        "condition_factor": "f8",
    },
    "lice_count": {
        "batch_id": "i8",
        "assignment_id": "i8",
        "container_id": "i8",
        "count_date": "datetime64[D]",
        "fish_count": "i8",
        "adult_female_per_fish": "f8",
        "mobile_per_fish": "f8",
        "attached_per_fish": "f8",
    },
    "treatment": {
        "batch_id": "i8",
        "assignment_id": "i8",
        "container_id": "i8",
        "treatment_date": "datetime64[D]",
        "kind": "O",
    },
    "harvest_event": {
        "batch_id": "i8",
        "assignment_id": "i8",
        "container_id": "i8",
        "harvest_date": "datetime64[D]",
        "fish_count": "i8",
        "biomass_kg": "f8",
        "mean_weight_g": "f8",
    },
}


def _assignment_columns(engine: _Engine) -> dict[str, np.ndarray]:
    stays = engine.stays
    return {
        "id": np.array([s.id for s in stays], dtype=np.int64),
        "batch_id": np.full(len(stays), engine.batch.batch_id, dtype=np.int64),
        "container_id": np.array([s.container.id for s in stays], dtype=np.int64),
        "stage_id": np.array([s.stage.id for s in stays], dtype=np.int64),
        "start_date": np.array([engine._date(s.start) for s in stays], dtype="datetime64[D]"),
        "end_date": np.array(
            [None if s.end is None else engine._date(s.end) for s in stays], dtype=object
        ),
        "tgc": np.array([s.tgc for s in stays], dtype=np.float64),
    }


def _reading_sources(engine: _Engine) -> list:
    """(key columns, sensor window, first date) of every sensor of every stay."""
    sources = []
    minutes_per_day = engine.scenario.readings.per_day
    assert minutes_per_day > 0
    for stay in engine.stays:
        last = engine.last_day if stay.end is None else stay.end - 1
        days = last - stay.start + 1
        container = stay.container
        first_window_day = engine.reading_windows[container.id][0]
        at_sea = container.sea_area_id is not None
        density = np.asarray(stay.biomass[:days]) / container.volume_m3
        fed = np.asarray(stay.fed[:days], dtype=np.float64)
        for sensor in engine.farm.sensors_by_container[container.id]:
            parameter = engine.scenario.parameters[sensor.parameter_id - 1]
            cols = (engine.batch.batch_id, stay.id, container.id, sensor.id, sensor.parameter_id)
            if parameter.name == "Temperature":  # the very values whose means grew the fish
                window = engine.temperature_window[container.id]
                sources.append(
                    (cols, window, stay.start - first_window_day, days, engine._date(stay.start))
                )
                continue
            level = parameter.sea_level if at_sea else parameter.fresh_level
            rng = np.random.default_rng(np.random.SeedSequence([engine.batch.seed, 4, sensor.id]))
            base = (level or 0.0) + env.ar1(rng, days, parameter.drift_sd)
            base = base + parameter.density_slope * density / 10.0
            window = env.SensorWindow(
                parameter, base, fed, engine._sensor_seed(container.id, parameter.name)
            )
            sources.append((cols, window, 0, days, engine._date(stay.start)))
    return sources


def simulate(batch: BatchPlan, scenario: Scenario, farm: Farm, run_seed: int) -> BatchRows:
    engine = _Engine(batch, scenario, farm, run_seed)
    engine.run()
    tables = {"assignment": _assignment_columns(engine)}
    for table, columns in _COLUMN_TYPES.items():
        tables[table] = engine.rows.arrays(table, columns)
    harvested = bool(engine.stays) and not engine.open and any(s.stage.at_sea for s in engine.stays)
    end_date = engine._date(max(s.end or 0 for s in engine.stays)) if harvested else None
    rows = BatchRows(
        batch_id=batch.batch_id,
        status="harvested" if harvested else "active",
        end_date=end_date,
        tables=tables,
        temperature={},
        _reading_sources=_reading_sources(engine),
        _minutes=np.asarray(scenario.readings.minutes_of_day, dtype=np.float64),
        _feeding_hours=scenario.husbandry.feeding_hours,
    )
    rows.temperature = _temperature_rows(rows)
    return rows


def _temperature_rows(rows: BatchRows) -> dict[str, np.ndarray]:
    parts = list(rows.readings("Temperature"))
    keys = ("assignment_id", "reading_time", "value")
    if not parts:
        return {k: np.zeros(0) for k in keys}
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}
