"""The planner: conflict-free reservations, determinism, sizing and infeasibility."""

from __future__ import annotations

import copy
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipeline.farm import Farm, build_farm
from pipeline.planner import InfeasiblePlan, Plan, plan
from pipeline.scenario import Scenario, load_scenario, parse_scenario

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"
DEMO = load_scenario(SCENARIOS / "demo.toml")
DEMO_DATA: dict[str, Any] = DEMO.model_dump(mode="json")


def assert_conflict_free(farm: Farm, result: Plan) -> None:
    """No two reservations of one container overlap ([start, end) half-open); every
    reservation is in its batch's geography and of its container's stage; the rings of
    a batch lie in one sea area."""
    spans: dict[int, list[tuple]] = defaultdict(list)
    ids = set()
    for b in result.batches:
        sea_areas = set()
        for r in b.reservations:
            container = farm.container_by_id[r.container_id]
            assert r.batch_id == b.batch_id
            assert r.start < r.end
            assert container.geography_id == b.geography_id, (b.batch_id, r)
            assert container.stage_id == r.stage_id, (b.batch_id, r)
            if container.sea_area_id is not None:
                sea_areas.add(container.sea_area_id)
            spans[r.container_id].append((r.start, r.end, b.batch_id))
            ids.add(r.id)
        assert len(sea_areas) <= 1, (b.batch_id, sea_areas)
    assert len(ids) == sum(len(b.reservations) for b in result.batches)
    for container_id, held in spans.items():
        held.sort()
        for earlier, later in zip(held, held[1:], strict=False):
            assert earlier[1] <= later[0], (container_id, earlier, later)


@st.composite
def small_scenarios(draw: st.DrawFn) -> tuple[Scenario, int]:
    data = copy.deepcopy(DEMO_DATA)
    geographies = data["geographies"][: draw(st.integers(1, 2))]
    for geo in geographies:
        geo["stations"] = draw(st.integers(1, 2))
        geo["hall_containers"] = {name: draw(st.integers(1, 4)) for name in geo["hall_containers"]}
        geo["sea_areas"] = draw(st.integers(1, 3))
        geo["rings_per_area"] = draw(st.integers(1, 8))
    data["geographies"] = geographies
    data["years"] = draw(st.sampled_from([0.5, 1.0, 2.0, 3.5, 5.0]))
    low = draw(st.integers(100_000, 1_500_000))
    data["eggs"] = [low, low + draw(st.integers(0, 400_000))]
    data["husbandry"]["transfer_window_days"] = draw(st.integers(1, 30))
    data["batches"] = draw(st.integers(1, 25))
    return parse_scenario(data), draw(st.integers(0, 2**63 - 1))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_scenarios())
def test_reservations_never_conflict(case: tuple[Scenario, int]) -> None:
    scenario, seed = case
    farm = build_farm(scenario)
    try:
        result = plan(scenario, farm, seed=seed)
    except InfeasiblePlan as exc:
        event("infeasible: planned the largest count instead")
        if exc.largest == 0:
            return
        result = plan(scenario, farm, seed=seed, batches=exc.largest)
        assert len(result.batches) == exc.largest
    else:
        assert len(result.batches) == scenario.batches
    assert_conflict_free(farm, result)


def test_same_scenario_and_seed_give_the_same_plan() -> None:
    first = plan(DEMO, build_farm(DEMO), seed=11)
    again = plan(load_scenario(SCENARIOS / "demo.toml"), build_farm(DEMO), seed=11)
    assert first == again


def test_another_seed_draws_other_eggs() -> None:
    farm = build_farm(DEMO)
    one = [b.eggs for b in plan(DEMO, farm, seed=1).batches]
    two = [b.eggs for b in plan(DEMO, farm, seed=2).batches]
    assert one != two


def test_default_scenario_fills_the_farm_to_the_target() -> None:
    scenario = load_scenario(SCENARIOS / "default.toml")
    farm = build_farm(scenario)
    result = plan(scenario, farm)
    assert len(result.batches) >= 144
    assert 0.65 <= result.bottleneck.utilisation <= 0.85
    assert result.bottleneck.utilisation <= scenario.target_saturation
    assert_conflict_free(farm, result)


def test_infeasible_request_names_the_largest_count_that_fits() -> None:
    farm = build_farm(DEMO)
    with pytest.raises(InfeasiblePlan) as info:
        plan(DEMO, farm, batches=500)
    largest = info.value.largest
    assert 0 < largest < 500
    assert f"largest feasible count is {largest}" in str(info.value)
    assert len(plan(DEMO, farm, batches=largest).batches) == largest
    with pytest.raises(InfeasiblePlan):
        plan(DEMO, farm, batches=largest + 1)
