"""The invariant checks (pipeline.checks) against a real PostgreSQL.

One demo dataset is built per module (plan, then four batch jobs: two harvested,
one at sea, one in freshwater). Every check must pass on it; then, for each
invariant, a violation is planted inside a transaction that is rolled back, and
the check must report it with an example. The clean dataset stays clean.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from pipeline.checks import CHECKS, CheckResult, readings_per_day, run_checks, run_context
from pipeline.planner import stage_starts
from pipeline.scenario import load_scenario
from tests.conftest import ROOT
from tests.demo_data import build_demo, scratch_database

HARVESTED, HARVESTED_2, AT_SEA, FRESHWATER = 1, 4, 5, 9
BATCHES = [HARVESTED, HARVESTED_2, AT_SEA, FRESHWATER]
IMPLEMENTED = [f"I-{n}" for n in range(1, 18)]


@dataclass
class Dataset:
    conn: psycopg.Connection[Any]
    url: str
    build_seconds: float


@pytest.fixture(scope="module")
def dataset(server_url: str) -> Iterator[Dataset]:
    """A fresh database holding the demo plan and four simulated batches."""
    with scratch_database(server_url, "aq_checks") as url:
        began = time.perf_counter()
        build_demo(url, BATCHES)
        built = time.perf_counter() - began
        with psycopg.connect(url, autocommit=True) as conn:
            yield Dataset(conn, url, built)


def test_dataset_has_the_intended_batches(dataset: Dataset) -> None:
    rows = dict(
        dataset.conn.execute(
            "SELECT id, status FROM batch WHERE id = ANY(%s) ORDER BY id", (BATCHES,)
        ).fetchall()
    )
    assert rows == {
        HARVESTED: "harvested",
        HARVESTED_2: "harvested",
        AT_SEA: "active",
        FRESHWATER: "active",
    }
    open_stages = dataset.conn.execute(
        "SELECT batch_id, max(stage_id) FROM assignment WHERE end_date IS NULL GROUP BY 1"
    ).fetchall()
    assert dict(open_stages) == {AT_SEA: 6, FRESHWATER: 3}


def test_run_context_reads_the_run(dataset: Dataset) -> None:
    scenario = load_scenario(ROOT / "scenarios" / "demo.toml")
    ctx = run_context(dataset.conn)
    assert ctx.as_of == scenario.as_of_date
    assert ctx.readings_per_day == scenario.readings.per_day == 6
    assert ctx.transfer_window_days == scenario.husbandry.transfer_window_days
    starts = stage_starts(scenario, scenario.as_of_date)
    assert ctx.stage_offsets == tuple((d - scenario.as_of_date).days for d in starts)
    assert ctx.egg_weight_g == scenario.stages[0].weight_in_g
    assert readings_per_day({"hours": [1, 2], "interval_minutes": 15}) == 96
    assert readings_per_day({"hours": [1, 2], "interval_minutes": None}) == 2


def test_every_check_passes_on_clean_data(dataset: Dataset) -> None:
    results = run_checks(dataset.conn, None, BATCHES)
    assert [r.invariant for r in results] == IMPLEMENTED == list(CHECKS)
    print(f"\ndataset built in {dataset.build_seconds:.1f} s; check times (demo, 4 batches):")
    for r in results:
        print(f"  {r.invariant:5} {r.rows_examined:>9} rows  {r.seconds * 1000:8.1f} ms")
    failed = {r.invariant: r.examples[:3] for r in results if r.violations}
    assert not failed
    assert all(r.rows_examined > 0 for r in results)
    assert all(r.examples == [] for r in results)


def test_all_batches_scope_flags_batches_without_rows(dataset: Dataset) -> None:
    """With batch_ids None every planned batch counts: those never simulated are 'active'
    without an open assignment (I-16); everything else still holds."""
    results = {r.invariant: r for r in run_checks(dataset.conn, None, None)}
    others = {k: r.violations for k, r in results.items() if k != "I-16" and r.violations}
    assert not others
    never_run = sorted(
        row[0]
        for row in dataset.conn.execute("SELECT id FROM batch WHERE NOT id = ANY(%s)", (BATCHES,))
    )
    assert never_run
    flagged = sorted(e["batch_id"] for e in results["I-16"].examples)
    assert flagged == never_run[:10]
    assert results["I-16"].violations == len(never_run)
    assert {e["problem"] for e in results["I-16"].examples} == {"active without an open assignment"}


def test_run_checks_selects_in_invariant_order(dataset: Dataset) -> None:
    results = run_checks(dataset.conn, ["I-14", "I-2"], [FRESHWATER])
    assert [r.invariant for r in results] == ["I-2", "I-14"]
    with pytest.raises(KeyError, match="I-99"):
        run_checks(dataset.conn, ["I-99"], None)


def test_empty_batch_list_examines_nothing(dataset: Dataset) -> None:
    for r in run_checks(dataset.conn, ["I-6", "I-8", "I-15"], []):
        assert (r.rows_examined, r.violations) == (0, 0)


# ---- planted violations ---------------------------------------------------------------------

# The first hand-over (not a placement) of a batch.
FIRST_MOVE = (
    "(SELECT min(id) FROM transfer_action"
    " WHERE batch_id = {b} AND source_assignment_id IS NOT NULL)"
)
FIRST_READING = "(SELECT min(reading_time) FROM environmental_reading WHERE batch_id = {b})"
AS_OF = "(SELECT as_of_date FROM run ORDER BY id LIMIT 1)"

PLANTS: list[tuple[str, str, list[str]]] = [
    (
        "I-1",
        "assignment overlapping another of its container",
        [
            "ALTER TABLE assignment DROP CONSTRAINT ex_assignment_container_period",
            f"""INSERT INTO assignment (id, batch_id, container_id, stage_id, start_date,
                                        end_date, tgc)
                SELECT id + 5000, batch_id, container_id, stage_id, start_date + 3,
                       end_date + 3, tgc
                  FROM assignment WHERE id = (SELECT min(id) FROM assignment
                                               WHERE batch_id = {HARVESTED})""",
        ],
    ),
    (
        "I-1",
        "reservation overlapping another of its container",
        [
            "ALTER TABLE container_reservation"
            " DROP CONSTRAINT ex_container_reservation_container_period",
            f"""INSERT INTO container_reservation
                SELECT id + 100000, batch_id, container_id, stage_id, end_date - 1,
                       end_date + 30
                  FROM container_reservation
                 WHERE id = (SELECT min(id) FROM container_reservation
                              WHERE batch_id = {HARVESTED})""",
        ],
    ),
    (
        "I-2",
        "assignment starting a day before its reservation",
        [
            f"""UPDATE assignment SET start_date = start_date - 1
                 WHERE id = (SELECT min(id) FROM assignment WHERE batch_id = {HARVESTED})"""
        ],
    ),
    (
        "I-3",
        "batch in the other geography",
        [f"UPDATE batch SET geography_id = 3 - geography_id WHERE id = {HARVESTED}"],
    ),
    (
        "I-3",
        "a ring in a second sea area",
        [
            f"""UPDATE container c SET sea_area_id = other.id
                  FROM sea_area mine, sea_area other
                 WHERE c.id = (SELECT max(container_id) FROM assignment
                                WHERE batch_id = {HARVESTED} AND stage_id = 6)
                   AND mine.id = c.sea_area_id
                   AND other.geography_id = mine.geography_id AND other.id <> mine.id"""
        ],
    ),
    (
        "I-4",
        "transfer skipping a stage",
        [
            f"""UPDATE transfer_action
                   SET dest_assignment_id = (SELECT min(id) FROM assignment
                                              WHERE batch_id = {HARVESTED} AND stage_id = 3)
                 WHERE id = {FIRST_MOVE.format(b=HARVESTED)}"""
        ],
    ),
    (
        "I-4",
        "previous stage ending long after the next began",
        [
            f"""UPDATE assignment SET end_date = end_date + 20
                 WHERE id = (SELECT id FROM assignment
                              WHERE batch_id = {HARVESTED} AND stage_id = 1
                              ORDER BY end_date DESC LIMIT 1)"""
        ],
    ),
    (
        "I-5",
        "days without any open assignment",
        [
            f"""UPDATE assignment
                   SET start_date = (SELECT max(end_date) FROM assignment
                                      WHERE batch_id = {HARVESTED} AND stage_id = 1) + 3
                 WHERE batch_id = {HARVESTED} AND stage_id = 2"""
        ],
    ),
    (
        "I-6",
        "mortality row after its assignment ended",
        [
            f"""UPDATE mortality_event m SET event_date = a.end_date + 3
                  FROM assignment a
                 WHERE a.id = m.assignment_id
                   AND (m.assignment_id, m.event_date) = (
                         SELECT assignment_id, max(event_date) FROM mortality_event
                          WHERE batch_id = {HARVESTED}
                          GROUP BY assignment_id ORDER BY assignment_id LIMIT 1)"""
        ],
    ),
    (
        "I-6",
        "readings before their assignment began",
        [
            f"""UPDATE environmental_reading
                   SET reading_time = reading_time - interval '400 days'
                 WHERE batch_id = {FRESHWATER}
                   AND reading_time = {FIRST_READING.format(b=FRESHWATER)}"""
        ],
    ),
    (
        "I-7",
        "feeding row naming another container",
        [
            f"""UPDATE feeding_event SET container_id = container_id + 1
                 WHERE (assignment_id, fed_at) = (
                         SELECT assignment_id, min(fed_at) FROM feeding_event
                          WHERE batch_id = {HARVESTED}
                          GROUP BY assignment_id ORDER BY assignment_id LIMIT 1)"""
        ],
    ),
    (
        "I-7",
        "reading from a sensor of another parameter",
        [
            f"""UPDATE environmental_reading r SET sensor_id = s2.id
                  FROM sensor s1, sensor s2
                 WHERE s1.id = r.sensor_id AND s2.container_id = s1.container_id
                   AND s2.parameter_id <> s1.parameter_id
                   AND r.batch_id = {FRESHWATER}
                   AND r.reading_time = {FIRST_READING.format(b=FRESHWATER)}"""
        ],
    ),
    (
        "I-8",
        "a recorded death missing from the daily state",
        [
            f"""DELETE FROM mortality_event
                 WHERE (assignment_id, event_date, cause) = (
                         SELECT assignment_id, event_date, cause FROM mortality_event
                          WHERE batch_id = {AT_SEA} AND cause <> 'HANDLING'
                          ORDER BY event_date DESC, assignment_id LIMIT 1)"""
        ],
    ),
    (
        "I-8",
        "population not following the flows",
        [
            f"""UPDATE daily_assignment_state s SET population = population + 1
                  FROM assignment a
                 WHERE a.id = s.assignment_id AND a.batch_id = {FRESHWATER}
                   AND s.state_date = a.start_date + 5
                   AND a.id = (SELECT min(id) FROM assignment WHERE batch_id = {FRESHWATER})"""
        ],
    ),
    (
        "I-9",
        "transfer moving more fish than the source held",
        [
            f"""UPDATE transfer_action SET fish_count = fish_count + 10
                 WHERE id = {FIRST_MOVE.format(b=HARVESTED)}"""
        ],
    ),
    (
        "I-9",
        "handling losses not recorded",
        [
            f"""DELETE FROM mortality_event m USING transfer_action t
                 WHERE t.id = {FIRST_MOVE.format(b=AT_SEA)}
                   AND m.assignment_id = t.source_assignment_id
                   AND m.event_date = t.transfer_date AND m.cause = 'HANDLING'"""
        ],
    ),
    (
        "I-10",
        "fish counted in the source and the destination",
        [
            f"""UPDATE daily_assignment_state s SET population = s.population + t.fish_count
                  FROM transfer_action t
                 WHERE t.id = {FIRST_MOVE.format(b=HARVESTED)}
                   AND s.assignment_id = t.source_assignment_id
                   AND s.state_date = t.transfer_date"""
        ],
    ),
    (
        "I-11",
        "opening count not from the transfer rows",
        [
            f"""UPDATE daily_assignment_state s SET fish_in = fish_in - 1
                  FROM assignment a
                 WHERE a.id = s.assignment_id AND s.state_date = a.start_date
                   AND a.id = (SELECT min(id) FROM assignment
                                WHERE batch_id = {FRESHWATER} AND stage_id > 1)"""
        ],
    ),
    (
        "I-11",
        "transfer weight not the source's",
        [
            f"""UPDATE transfer_action
                   SET mean_weight_g = mean_weight_g * 1.001, biomass_kg = biomass_kg * 1.001
                 WHERE id = {FIRST_MOVE.format(b=AT_SEA)}"""
        ],
    ),
    (
        "I-12",
        "source not closing at 0 on its hand-over day",
        [
            f"""UPDATE daily_assignment_state s SET population = 7
                  FROM transfer_action t
                 WHERE t.id = {FIRST_MOVE.format(b=AT_SEA)}
                   AND s.assignment_id = t.source_assignment_id
                   AND s.state_date = t.transfer_date"""
        ],
    ),
    (
        "I-13",
        "mean weight off the growth model",
        [
            f"""UPDATE daily_assignment_state s SET mean_weight_g = mean_weight_g * 1.05
                  FROM assignment a
                 WHERE a.id = s.assignment_id AND s.state_date = a.start_date + 10
                   AND a.id = (SELECT min(id) FROM assignment
                                WHERE batch_id = {AT_SEA} AND stage_id = 6)"""
        ],
    ),
    (
        "I-13",
        "opening weight off the received mean by 1e-6",
        [
            f"""UPDATE daily_assignment_state s SET mean_weight_g = mean_weight_g * 1.000001
                  FROM assignment a
                 WHERE a.id = s.assignment_id AND s.state_date = a.start_date
                   AND a.id = (SELECT min(id) FROM assignment
                                WHERE batch_id = {FRESHWATER} AND stage_id = 3)"""
        ],
    ),
    (
        "I-13",
        "written temperatures that did not grow the fish",
        [
            f"""UPDATE environmental_reading r SET value = value + 30
                  FROM assignment a, parameter p
                 WHERE a.id = r.assignment_id AND p.id = r.parameter_id
                   AND p.name = 'Temperature'
                   AND a.id = (SELECT min(id) FROM assignment
                                WHERE batch_id = {HARVESTED} AND stage_id = 4)
                   AND r.batch_id = {HARVESTED}
                   AND r.reading_time >= ((a.start_date + 30)::timestamp AT TIME ZONE 'UTC')
                   AND r.reading_time < ((a.start_date + 31)::timestamp AT TIME ZONE 'UTC')"""
        ],
    ),
    (
        "I-14",
        "a missing day",
        [
            f"""DELETE FROM daily_assignment_state s USING assignment a
                 WHERE a.id = s.assignment_id AND s.state_date = a.start_date + 2
                   AND a.id = (SELECT min(id) FROM assignment WHERE batch_id = {AT_SEA})"""
        ],
    ),
    (
        "I-14",
        "a day after the assignment ended",
        [
            f"""INSERT INTO daily_assignment_state
                SELECT s.assignment_id, s.state_date + 1, s.batch_id, s.container_id,
                       s.population, s.mean_weight_g, s.biomass_kg, 0, 0, 0, 0, 0,
                       s.temperature_c, s.fcr
                  FROM daily_assignment_state s JOIN assignment a ON a.id = s.assignment_id
                 WHERE s.state_date = a.end_date - 1
                   AND a.id = (SELECT min(id) FROM assignment WHERE batch_id = {HARVESTED})"""
        ],
    ),
    (
        "I-15",
        "one reading missing",
        [
            f"""DELETE FROM environmental_reading
                 WHERE batch_id = {AT_SEA}
                   AND (sensor_id, reading_time) = (
                         SELECT sensor_id, max(reading_time) FROM environmental_reading
                          WHERE batch_id = {AT_SEA}
                          GROUP BY sensor_id ORDER BY sensor_id LIMIT 1)"""
        ],
    ),
    (
        "I-16",
        "harvest short of the final population",
        [
            f"""DELETE FROM harvest_event
                 WHERE (assignment_id, harvest_date) = (
                         SELECT assignment_id, harvest_date FROM harvest_event
                          WHERE batch_id = {HARVESTED} ORDER BY assignment_id LIMIT 1)"""
        ],
    ),
    (
        "I-16",
        "active batch without an open assignment",
        [
            f"""UPDATE assignment SET end_date = {AS_OF}
                 WHERE batch_id = {FRESHWATER} AND end_date IS NULL"""
        ],
    ),
    (
        "I-16",
        "open stage younger than the batch",
        [f"UPDATE batch SET start_date = start_date - 200 WHERE id = {FRESHWATER}"],
    ),
    (
        "I-17",
        "a feeding after the as-of date",
        [
            f"""INSERT INTO feeding_event
                SELECT batch_id, assignment_id, container_id,
                       (({AS_OF} + 1)::timestamp + time '08:00') AT TIME ZONE 'UTC',
                       feed_type, amount_kg, biomass_kg
                  FROM feeding_event
                 WHERE batch_id = {FRESHWATER} ORDER BY fed_at DESC LIMIT 1"""
        ],
    ),
    (
        "I-17",
        "a daily state after the as-of date",
        [
            f"""INSERT INTO daily_assignment_state
                SELECT assignment_id, state_date + 1, batch_id, container_id, population,
                       mean_weight_g, biomass_kg, deaths, fish_in, fish_out, harvested,
                       feed_kg, temperature_c, fcr
                  FROM daily_assignment_state
                 WHERE batch_id = {AT_SEA} AND state_date = {AS_OF}"""
        ],
    ),
]


def _plant(conn: psycopg.Connection[Any], statements: list[str]) -> None:
    for statement in statements:
        cur = conn.execute(statement)  # type: ignore[arg-type]
        if not statement.lstrip().upper().startswith("ALTER"):
            assert cur.rowcount > 0, f"planting changed nothing: {statement}"


@pytest.mark.parametrize(
    ("invariant", "statements"),
    [pytest.param(inv, sql, id=f"{inv}: {label}") for inv, label, sql in PLANTS],
)
def test_planted_violation_is_reported(
    dataset: Dataset, invariant: str, statements: list[str]
) -> None:
    conn = dataset.conn
    with conn.transaction(force_rollback=True):
        _plant(conn, statements)
        result: CheckResult = CHECKS[invariant](conn, BATCHES)
    assert result.invariant == invariant
    assert result.violations >= 1, result
    assert 1 <= len(result.examples) <= 10
    assert all(isinstance(e, dict) for e in result.examples)
    # rolled back: the dataset is clean again
    assert CHECKS[invariant](conn, BATCHES).violations == 0


def test_every_invariant_has_a_plant() -> None:
    assert sorted({inv for inv, _, _ in PLANTS}, key=lambda k: int(k[2:])) == IMPLEMENTED


def test_scope_confines_a_violation_to_its_batch(dataset: Dataset) -> None:
    conn = dataset.conn
    with conn.transaction(force_rollback=True):
        conn.execute(
            f"UPDATE transfer_action SET fish_count = fish_count + 10"
            f" WHERE id = {FIRST_MOVE.format(b=HARVESTED)}"
        )
        assert CHECKS["I-9"](conn, [HARVESTED]).violations >= 1
        assert CHECKS["I-9"](conn, [FRESHWATER, AT_SEA]).violations == 0
        assert CHECKS["I-9"](conn, None).violations >= 1


def test_examples_are_capped_at_ten(dataset: Dataset) -> None:
    conn = dataset.conn
    with conn.transaction(force_rollback=True):
        conn.execute(f"UPDATE batch SET geography_id = 3 - geography_id WHERE id = {AT_SEA}")
        result = CHECKS["I-3"](conn, BATCHES)
    assert result.violations > 10
    assert len(result.examples) == 10
