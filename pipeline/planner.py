"""The planner: which batch starts when, and which containers each stage holds.

A pure function of the scenario (and its farm). It fixes everything that
involves more than one batch: start dates, each batch's own constants (eggs,
harvest target, seed) and, per stage, the containers the batch may hold and the
half-open date window in which it holds them. Windows of one container never
overlap, so the engine, which only uses its batch's reservations, can never
race another batch for a container.

Timeline of a batch starting on day s, with stage lengths D1..D5, transfer
window W and longest sea stay D6:

    stage k (freshwater) is reserved [T_k, T_{k+1} + W)   T_1 = s, T_{k+1} = T_k + D_k
    the sea stage is reserved      [T_6, T_6 + D6 + H)   H = harvest window

so source and destination containers are both held during each transfer
window, and rings are held up to the batch's latest possible harvest. A stage
is reserved only if its window opens on or before the as-of date.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date, timedelta

import numpy as np

from pipeline.farm import Container, Farm
from pipeline.scenario import Scenario, StageSpec

STEADY_STATE_OFFSET_DAYS = 900


class InfeasiblePlan(ValueError):
    """The requested batches do not fit the farm."""

    def __init__(self, requested: int, largest: int, reason: str) -> None:
        super().__init__(
            f"{requested} batches do not fit the farm ({reason}); "
            f"the largest feasible count is {largest}"
        )
        self.requested = requested
        self.largest = largest


@dataclass(frozen=True, slots=True)
class Reservation:
    id: int
    batch_id: int
    container_id: int
    stage_id: int
    start: date
    end: date  # exclusive


@dataclass(frozen=True)
class BatchPlan:
    batch_id: int  # = batch number
    geography_id: int
    start_date: date
    eggs: int
    harvest_target_g: float
    seed: int
    stage_starts: tuple[date, ...]  # first day of each stage's incoming window; [0] = start
    reservations: tuple[Reservation, ...]

    def containers_of(self, stage_id: int) -> tuple[int, ...]:
        return tuple(r.container_id for r in self.reservations if r.stage_id == stage_id)

    def reservation_of(self, stage_id: int) -> tuple[date, date] | None:
        for r in self.reservations:
            if r.stage_id == stage_id:
                return r.start, r.end
        return None


@dataclass(frozen=True, slots=True)
class StageUse:
    geography_id: int
    stage_id: int
    containers: int
    reserved_days: int
    available_days: int

    @property
    def utilisation(self) -> float:
        return self.reserved_days / self.available_days if self.available_days else 0.0


@dataclass(frozen=True)
class Plan:
    seed: int
    as_of: date
    scenario_hash: str
    window: tuple[date, date]  # steady-state window of the utilisation figures
    batches: tuple[BatchPlan, ...]
    usage: tuple[StageUse, ...] = field(repr=False)

    @property
    def bottleneck(self) -> StageUse:
        return max(self.usage, key=lambda u: (u.utilisation, -u.geography_id, u.stage_id))

    def batch(self, batch_id: int) -> BatchPlan:
        return self.batches[batch_id - 1]


# ---- per-batch constants ------------------------------------------------------------------


def batch_rng(run_seed: int, batch_number: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([run_seed, batch_number]))


def _batch_constants(scenario: Scenario, run_seed: int, number: int) -> tuple[int, float, int]:
    rng = batch_rng(run_seed, number)
    eggs = int(rng.integers(scenario.eggs[0], scenario.eggs[1] + 1))
    target = float(rng.uniform(*scenario.harvest_target_g))
    seed = int(rng.integers(0, 2**63 - 1))
    return eggs, target, seed


def stage_survival(scenario: Scenario, mortality_factor: float) -> list[float]:
    """Expected fraction of eggs alive at the end of each freshwater stage."""
    alive, out = 1.0, []
    for stage in scenario.freshwater_stages:
        alive *= (1 - stage.mortality_pct_day * mortality_factor / 100) ** stage.days
        out.append(alive)
    return out


def latest_weight_g(scenario: Scenario, stage: StageSpec) -> float:
    """Nominal weight of the stage's fish at the end of the outgoing transfer window: growth
    is linear in the cube root, so it extends the stage's cube-root gain by W/D."""
    assert stage.weight_out_g is not None
    w = scenario.husbandry.transfer_window_days
    gain = stage.weight_out_g ** (1 / 3) - stage.weight_in_g ** (1 / 3)
    return (stage.weight_in_g ** (1 / 3) + gain * (stage.days + w) / stage.days) ** 3


def containers_needed(scenario: Scenario, eggs: int) -> list[int]:
    """Containers per stage for a batch of `eggs`, from the density limits.

    Counts use the planning mortality (below the mean, so the estimate errs
    towards more fish); freshwater biomass is held at `fill_fraction` of the
    container's limit at the end of the stage, and at `window_end_fill_fraction`
    on the last day a tank may still hold the stage's fish.
    """
    h = scenario.husbandry
    survival = stage_survival(scenario, h.planning_mortality_factor)
    needed = []
    for i, stage in enumerate(scenario.stages):
        ctype = scenario.container_type_for(stage.id)
        fish_in = eggs * (survival[i - 1] if i else 1.0)
        n = 1
        if ctype.max_count:
            n = max(n, math.ceil(fish_in / ctype.max_count))
        if not stage.at_sea:
            fish_out = eggs * survival[i]
            limit_kg = ctype.biomass_limit_kg
            at_end_kg = fish_out * stage.weight_out_g / 1000
            at_window_end_kg = fish_out * latest_weight_g(scenario, stage) / 1000
            n = max(
                n,
                math.ceil(at_end_kg / (h.fill_fraction * limit_kg)),
                math.ceil(at_window_end_kg / (h.window_end_fill_fraction * limit_kg)),
            )
        needed.append(n)
    return needed


def stage_starts(scenario: Scenario, start: date) -> tuple[date, ...]:
    starts, day = [], start
    for stage in scenario.stages:
        starts.append(day)
        day += timedelta(days=stage.days)
    return tuple(starts)


def reservation_window(
    scenario: Scenario, starts: tuple[date, ...], stage_index: int
) -> tuple[date, date]:
    h = scenario.husbandry
    begin = starts[stage_index]
    stage = scenario.stages[stage_index]
    if stage.at_sea:
        return begin, begin + timedelta(days=stage.days + h.harvest_window_days)
    return begin, starts[stage_index + 1] + timedelta(days=h.transfer_window_days)


# ---- start dates -----------------------------------------------------------------------------


def first_start(scenario: Scenario) -> date:
    return scenario.as_of_date - timedelta(days=round(scenario.years * 365.25))


def _split_by_share(scenario: Scenario, total: int) -> list[int]:
    shares = [
        g.share if g.share is not None else g.sea_areas * g.rings_per_area
        for g in scenario.geographies
    ]
    exact = [total * s / sum(shares) for s in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def start_dates(scenario: Scenario, total: int) -> list[tuple[date, int]]:
    """(start date, geography id) of every batch, sorted: even staggering per geography,
    geographies offset from each other so their starts interleave."""
    first = first_start(scenario)
    span = (scenario.as_of_date - first).days
    starts = []
    n_geo = len(scenario.geographies)
    for g, count in enumerate(_split_by_share(scenario, total)):
        if count == 0:
            continue
        interval = span / count
        offset = interval * g / n_geo
        starts += [
            (first + timedelta(days=int(offset + i * interval)), g + 1) for i in range(count)
        ]
    return sorted(starts)


# ---- packing ----------------------------------------------------------------------------------


class _Pool:
    """The containers of one stage in one geography, grouped by station or sea area,
    with the day each becomes free (end of its last reservation)."""

    def __init__(self, containers: list[Container], group_of) -> None:
        self.ids = np.array([c.id for c in containers], dtype=np.int64)
        self.group = np.array([group_of(c) for c in containers], dtype=np.int64)
        self.free_from = np.full(len(containers), -(10**9), dtype=np.int64)

    def take(
        self, day: int, until: int, needed: int, prefer_group: int | None
    ) -> tuple[int, list[int]] | None:
        free = self.free_from <= day
        groups = np.unique(self.group[free])
        best: tuple[tuple, int] | None = None
        for g in groups:
            available = int(np.count_nonzero(free & (self.group == g)))
            if available < needed:
                continue
            key = (g != prefer_group, available, g)  # same station first, then best fit
            if best is None or key < best[0]:
                best = (key, int(g))
        if best is None:
            return None
        group = best[1]
        index = np.flatnonzero(free & (self.group == group))[:needed]
        self.free_from[index] = until
        return group, [int(i) for i in self.ids[index]]


@dataclass
class _Packing:
    batches: list[BatchPlan]
    failure: str | None


def _pools(scenario: Scenario, farm: Farm) -> dict[tuple[int, int], _Pool]:
    pools = {}
    for geo in farm.geographies:
        for stage in scenario.stages:
            members = [
                c for c in farm.containers if c.geography_id == geo["id"] and c.stage_id == stage.id
            ]
            key = (lambda c: c.sea_area_id) if stage.at_sea else (lambda c: c.station_id)
            pools[(geo["id"], stage.id)] = _Pool(members, key)
    return pools


def _pack(scenario: Scenario, farm: Farm, run_seed: int, total: int) -> _Packing:
    epoch = first_start(scenario)
    pools = _pools(scenario, farm)
    batches: list[BatchPlan] = []
    reservation_id = 0
    for number, (start, geo_id) in enumerate(start_dates(scenario, total), start=1):
        eggs, target, seed = _batch_constants(scenario, run_seed, number)
        needed = containers_needed(scenario, eggs)
        starts = stage_starts(scenario, start)
        reservations = []
        station = None
        for index, stage in enumerate(scenario.stages):
            begin, end = reservation_window(scenario, starts, index)
            if begin > scenario.as_of_date:
                break
            taken = pools[(geo_id, stage.id)].take(
                (begin - epoch).days,
                (end - epoch).days,
                needed[index],
                None if stage.at_sea else station,
            )
            if taken is None:
                geo_name = farm.geographies[geo_id - 1]["name"]
                return _Packing(
                    batches,
                    f"batch {number} finds no {needed[index]} free {stage.name} containers "
                    f"in {geo_name} on {begin}",
                )
            group, container_ids = taken
            if not stage.at_sea:
                station = group
            for cid in container_ids:
                reservation_id += 1
                reservations.append(Reservation(reservation_id, number, cid, stage.id, begin, end))
        batches.append(
            BatchPlan(number, geo_id, start, eggs, target, seed, starts, tuple(reservations))
        )
    return _Packing(batches, None)


def _usage(
    scenario: Scenario, farm: Farm, batches: list[BatchPlan]
) -> tuple[tuple[date, date], tuple[StageUse, ...]]:
    lo = first_start(scenario) + timedelta(days=STEADY_STATE_OFFSET_DAYS)
    hi = scenario.as_of_date
    if hi <= lo:  # short scenarios: the whole span
        lo = first_start(scenario)
    days = (hi - lo).days
    reserved: dict[tuple[int, int], int] = {}
    geo_of = {b.batch_id: b.geography_id for b in batches}
    for b in batches:
        for r in b.reservations:
            overlap = (min(r.end, hi) - max(r.start, lo)).days
            if overlap > 0:
                key = (geo_of[r.batch_id], r.stage_id)
                reserved[key] = reserved.get(key, 0) + overlap
    usage = []
    for geo in farm.geographies:
        for stage in scenario.stages:
            count = sum(
                1 for c in farm.containers if c.geography_id == geo["id"] and c.stage_id == stage.id
            )
            usage.append(
                StageUse(
                    geo["id"], stage.id, count, reserved.get((geo["id"], stage.id), 0), count * days
                )
            )
    return (lo, hi), tuple(usage)


def _plan_of(scenario: Scenario, farm: Farm, run_seed: int, batches: list[BatchPlan]) -> Plan:
    window, usage = _usage(scenario, farm, batches)
    return Plan(
        run_seed, scenario.as_of_date, scenario.content_hash(), window, tuple(batches), usage
    )


def _largest(ok, upper: int) -> int:
    """Largest n in [0, upper] with ok(n), assuming ok is monotone decreasing."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _upper_bound(scenario: Scenario, farm: Farm) -> int:
    """No more batches can start than the busiest first stage can take."""
    total = 0
    first = scenario.stages[0]
    span = (scenario.as_of_date - first_start(scenario)).days
    for geo in scenario.geographies:
        slots = geo.stations * max(1, geo.hall_containers[first.name])
        total += slots * (span // max(1, first.days // 4) + 1)
    return max(1, total)


def plan(
    scenario: Scenario, farm: Farm, *, seed: int | None = None, batches: int | None = None
) -> Plan:
    """Plan the run. With `batches` (or the scenario's), exactly that many, or
    InfeasiblePlan naming the largest count that fits; otherwise the largest count
    whose bottleneck utilisation stays at or below the target saturation."""
    run_seed = scenario.seed if seed is None else seed
    requested = batches if batches is not None else scenario.batches

    def feasible(n: int) -> bool:
        return n == 0 or _pack(scenario, farm, run_seed, n).failure is None

    if requested is not None:
        packing = _pack(scenario, farm, run_seed, requested)
        if packing.failure is not None:
            largest = _largest(feasible, requested - 1)
            raise InfeasiblePlan(requested, largest, packing.failure)
        return _plan_of(scenario, farm, run_seed, packing.batches)

    def within_target(n: int) -> bool:
        if n == 0:
            return True
        packing = _pack(scenario, farm, run_seed, n)
        if packing.failure is not None:
            return False
        _, usage = _usage(scenario, farm, packing.batches)
        return max(u.utilisation for u in usage) <= scenario.target_saturation

    count = _largest(within_target, _upper_bound(scenario, farm))
    if count == 0:
        raise InfeasiblePlan(1, 0, "not even one batch fits the target saturation")
    return _plan_of(scenario, farm, run_seed, _pack(scenario, farm, run_seed, count).batches)
