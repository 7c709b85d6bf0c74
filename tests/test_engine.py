"""The engine and assimilation on single batches, without a database."""

from __future__ import annotations

from collections import defaultdict
from functools import cache

import numpy as np
import pytest

from pipeline.farm import Farm, build_farm
from pipeline.planner import Plan, plan
from pipeline.scenario import Scenario, load_scenario
from workers.assimilation import assimilate_rows
from workers.engine import BatchRows, simulate


@cache
def _setup(path: str) -> tuple[Scenario, Farm, Plan]:
    scenario = load_scenario(path)
    farm = build_farm(scenario)
    return scenario, farm, plan(scenario, farm)


@cache
def _run(path: str, batch_id: int) -> tuple[BatchRows, dict]:
    scenario, farm, p = _setup(path)
    rows = simulate(p.batch(batch_id), scenario, farm, p.seed)
    return rows, assimilate_rows(rows, scenario.as_of_date)


SEASONS = {"spring": (3, 4, 5), "autumn": (9, 10, 11)}


def _harvested_batch(path: str, geography_id: int, season: str) -> int:
    """An old batch of the geography whose sea transfer falls in the season."""
    scenario, _, p = _setup(path)
    for b in p.batches:
        old_enough = (scenario.as_of_date - b.start_date).days > 1100
        sea_month = b.stage_starts[-1].month
        if b.geography_id == geography_id and old_enough and sea_month in SEASONS[season]:
            return b.batch_id
    raise AssertionError(f"no harvested {season} batch")


DEMO = "scenarios/demo.toml"
DEFAULT = "scenarios/default.toml"


def test_same_batch_twice_gives_identical_rows() -> None:
    scenario, farm, p = _setup(DEMO)
    first = simulate(p.batch(2), scenario, farm, p.seed)
    second = simulate(p.batch(2), scenario, farm, p.seed)
    for table, cols in first.tables.items():
        for name, values in cols.items():
            assert np.array_equal(values, second.tables[table][name]), (table, name)
    for a, b in zip(first.readings(), second.readings(), strict=True):
        assert np.array_equal(a["value"], b["value"])


@pytest.mark.parametrize("batch_id", [1, 2, 9])
def test_assignments_lie_inside_reservations(batch_id: int) -> None:
    scenario, _, p = _setup(DEMO)
    batch = p.batch(batch_id)
    rows, _ = _run(DEMO, batch_id)
    a = rows.tables["assignment"]
    reserved = {r.container_id: r for r in batch.reservations}
    for cid, start, end, stage in zip(
        a["container_id"], a["start_date"], a["end_date"], a["stage_id"], strict=True
    ):
        r = reserved[int(cid)]
        assert r.stage_id == stage
        assert r.start <= start.astype(object)
        assert (end or scenario.as_of_date) <= r.end


def test_population_is_conserved_and_never_doubles() -> None:
    rows, state = _run(DEMO, 1)
    t = rows.tables["transfer_action"]
    placed = np.array([s is None for s in t["source_assignment_id"]])
    per_day: dict = defaultdict(int)
    for d, pop in zip(state["state_date"], state["population"], strict=True):
        per_day[d] += int(pop)
    deaths = defaultdict(int)
    for d, n in zip(
        rows.tables["mortality_event"]["event_date"],
        rows.tables["mortality_event"]["fish_count"],
        strict=True,
    ):
        deaths[d] += int(n)
    harvested = defaultdict(int)
    for d, n in zip(
        rows.tables["harvest_event"]["harvest_date"],
        rows.tables["harvest_event"]["fish_count"],
        strict=True,
    ):
        harvested[d] += int(n)
    alive = int(t["fish_count"][placed].sum())
    assert alive == _setup(DEMO)[2].batch(1).eggs
    for d in sorted(per_day):
        alive -= deaths[d] + harvested[d]
        assert per_day[d] == alive, d


def test_destination_fed_by_two_sources_never_exceeds_the_batch() -> None:
    rows, state = _run(DEFAULT, 1)
    t = rows.tables["transfer_action"]
    sources_per_dest: dict[int, set] = defaultdict(set)
    days_per_dest: dict[int, set] = defaultdict(set)
    for src, dst, d in zip(
        t["source_assignment_id"], t["dest_assignment_id"], t["transfer_date"], strict=True
    ):
        if src is not None:
            sources_per_dest[int(dst)].add(int(src))
            days_per_dest[int(dst)].add(d)
    fan_in = [d for d, s in sources_per_dest.items() if len(s) > 1 and len(days_per_dest[d]) > 1]
    assert fan_in, "expected a destination receiving from two sources on different days"
    totals: dict = defaultdict(int)
    for d, pop in zip(state["state_date"], state["population"], strict=True):
        totals[d] += int(pop)
    dates = sorted(totals)
    steps = np.diff([totals[d] for d in dates])
    assert steps.max() <= 0


def test_daily_weight_follows_growth_model() -> None:
    rows, state = _run(DEMO, 1)
    tgc = dict(zip(rows.tables["assignment"]["id"], rows.tables["assignment"]["tgc"], strict=True))
    previous: dict[int, tuple[float, int]] = {}
    for aid, w, t, pop, fin in zip(
        state["assignment_id"], state["mean_weight_g"], state["temperature_c"],
        state["population"], state["fish_in"], strict=True,
    ):  # fmt: skip
        if aid in previous and fin == 0 and pop > 0:
            expected = (np.cbrt(previous[aid][0]) + tgc[aid] / 1000 * t) ** 3
            assert abs(w - expected) / expected < 0.01
        previous[aid] = (w, pop)


@pytest.mark.parametrize("season", ["spring", "autumn"])
@pytest.mark.parametrize("geography_id", [1, 2])
def test_full_lifecycle_within_realism_bands(geography_id: int, season: str) -> None:
    batch_id = _harvested_batch(DEFAULT, geography_id, season)
    scenario, _, p = _setup(DEFAULT)
    batch = p.batch(batch_id)
    rows, state = _run(DEFAULT, batch_id)
    assert rows.status == "harvested"
    a = rows.tables["assignment"]
    sea_ids = set(a["id"][a["stage_id"] == 6].tolist())
    t = rows.tables["transfer_action"]
    to_sea = sum(
        int(n)
        for n, d in zip(t["fish_count"], t["dest_assignment_id"], strict=True)
        if d in sea_ids
    )
    h = rows.tables["harvest_event"]
    harvested = int(h["fish_count"].sum())
    assert 0.60 <= to_sea / batch.eggs <= 0.90
    sea_mortality = (to_sea - harvested) / to_sea
    assert 0.05 <= sea_mortality <= 0.25
    mean_weight = h["biomass_kg"].sum() * 1000 / harvested
    assert 4500 <= mean_weight <= 7000
    assert abs(mean_weight / batch.harvest_target_g - 1) <= 0.10
    sea_start = min(a["start_date"][a["stage_id"] == 6]).astype(object)
    days_at_sea = (max(h["harvest_date"]).astype(object) - sea_start).days
    assert 280 <= days_at_sea <= 560
    f = rows.tables["feeding_event"]
    sea_feed = sum(
        float(kg)
        for kg, aid in zip(f["amount_kg"], f["assignment_id"], strict=True)
        if aid in sea_ids
    )
    stocked_kg = sum(
        float(kg)
        for kg, d in zip(t["biomass_kg"], t["dest_assignment_id"], strict=True)
        if d in sea_ids
    )
    economic_fcr = sea_feed / (h["biomass_kg"].sum() - stocked_kg)
    assert 1.05 <= economic_fcr <= 1.40
    sea_days = np.isin(state["assignment_id"], list(sea_ids))
    temps = state["temperature_c"][sea_days]
    band = {1: (6, 12), 2: (6, 15)}[geography_id]
    assert np.mean((temps >= band[0]) & (temps <= band[1])) >= 0.99
    ring_volume = scenario.container_type_for(6).volume_m3
    assert (state["biomass_kg"][sea_days] / ring_volume).max() <= 25.0
    stocked: dict[int, int] = defaultdict(int)
    for n, d in zip(t["fish_count"], t["dest_assignment_id"], strict=True):
        if d in sea_ids:
            stocked[int(d)] += int(n)
    assert max(stocked.values()) <= 200_000


def test_every_batch_in_a_sea_area_sees_the_same_sea() -> None:
    from datetime import date

    from workers.environment import sea_area_temperature_c

    scenario, _, p = _setup(DEFAULT)
    geo = scenario.geographies[0]
    long = sea_area_temperature_c(scenario, p.seed, 3, geo, date(2023, 1, 1), 400)
    short = sea_area_temperature_c(scenario, p.seed, 3, geo, date(2023, 6, 1), 100)
    offset = (date(2023, 6, 1) - date(2023, 1, 1)).days
    assert np.array_equal(long[offset : offset + 100], short)
