"""The schema against a real PostgreSQL: constraints the database itself enforces."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from typing import Any

import psycopg.errors
import pytest
from sqlalchemy import Connection, Engine, create_engine, insert, inspect, text
from sqlalchemy.exc import IntegrityError

from schema import (
    COPY_COLUMNS,
    DEFAULT_PARTITION,
    PartitionConflict,
    create_schema,
    drop_schema,
    ensure_reading_partitions,
    metadata,
)
from schema.models import (
    Assignment,
    Batch,
    Container,
    ContainerReservation,
    ContainerType,
    Geography,
    Hall,
    LifecycleStage,
    SeaArea,
    Station,
    daily_assignment_state,
    environmental_reading,
    growth_sample,
)

D0, D5, D9 = date(2024, 1, 1), date(2024, 1, 6), date(2024, 1, 10)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = create_engine(db_url)
    create_schema(eng)
    try:
        yield eng
    finally:
        eng.dispose()


def _farm(conn: Connection) -> dict[str, int]:
    """The least farm a batch can live in: one hall with two tanks, one sea area."""
    conn.execute(insert(LifecycleStage), [{"id": i, "name": f"stage {i}"} for i in range(1, 7)])
    conn.execute(insert(Geography).values(id=1, name="Faroe"))
    conn.execute(insert(Station).values(id=1, geography_id=1, name="S1"))
    conn.execute(insert(Hall).values(id=1, station_id=1, name="H1", stage_id=1))
    conn.execute(insert(SeaArea).values(id=1, geography_id=1, name="A1"))
    conn.execute(
        insert(ContainerType).values(
            id=1, name="tray", stage_id=1, volume_m3=1.0, max_biomass_kg=50.0, max_count=None
        )
    )
    tank = {"container_type_id": 1, "hall_id": 1, "volume_m3": 1.0, "max_biomass_kg": 50.0}
    conn.execute(
        insert(Container), [{"id": 1, "name": "T1", **tank}, {"id": 2, "name": "T2", **tank}]
    )
    conn.execute(
        insert(Batch).values(
            id=1,
            batch_number=1,
            geography_id=1,
            start_date=D0,
            eggs=1000,
            harvest_target_g=5000.0,
            seed=42,
        )
    )
    return {"batch": 1, "container": 1, "other_container": 2}


def _stay(conn: Connection, table: str, id_: int, start: date, end: date | None) -> None:
    row: dict[str, Any] = {
        "id": id_,
        "batch_id": 1,
        "container_id": 1,
        "stage_id": 1,
        "start_date": start,
        "end_date": end,
    }
    if table == "assignment":
        conn.execute(insert(Assignment).values(tgc=2.5, **row))
    else:
        conn.execute(insert(ContainerReservation).values(**row))


def _raises(engine: Engine, orig: type[Exception], work: Any) -> None:
    with pytest.raises(IntegrityError) as caught, engine.begin() as conn:
        work(conn)
    assert isinstance(caught.value.orig, orig), caught.value.orig


def test_create_schema_is_idempotent(engine: Engine) -> None:
    create_schema(engine)
    create_schema(engine)
    tables = set(inspect(engine).get_table_names())
    assert set(metadata.tables) | {DEFAULT_PARTITION} <= tables


def test_copy_columns_match_table_order(engine: Engine) -> None:
    with engine.connect() as conn:
        for table, columns in COPY_COLUMNS.items():
            stored = conn.scalars(
                text(
                    "SELECT column_name FROM information_schema.columns"
                    " WHERE table_name = :t ORDER BY ordinal_position"
                ),
                {"t": table},
            ).all()
            assert tuple(stored) == columns, table


@pytest.mark.parametrize("table", ["assignment", "container_reservation"])
def test_container_periods_never_overlap(engine: Engine, table: str) -> None:
    with engine.begin() as conn:
        _farm(conn)
        _stay(conn, table, 1, D0, D5)
        _stay(conn, table, 2, D5, D9)  # same-day hand-over: half-open ranges touch
    overlapping = (date(2024, 1, 3), date(2024, 1, 8))
    _raises(engine, psycopg.errors.ExclusionViolation, lambda c: _stay(c, table, 3, *overlapping))
    _raises(engine, psycopg.errors.CheckViolation, lambda c: _stay(c, table, 3, D9, D9))


def test_open_assignment_blocks_later_ones(engine: Engine) -> None:
    with engine.begin() as conn:
        _farm(conn)
        _stay(conn, "assignment", 1, D0, None)
    later = date(2031, 1, 1)
    _raises(
        engine,
        psycopg.errors.ExclusionViolation,
        lambda c: _stay(c, "assignment", 2, later, date(2031, 2, 1)),
    )


@pytest.mark.parametrize("site", [{"hall_id": 1, "sea_area_id": 1}, {}])
def test_container_sits_in_exactly_one_place(engine: Engine, site: dict[str, int]) -> None:
    with engine.begin() as conn:
        _farm(conn)
    row = {"id": 9, "container_type_id": 1, "name": "X", "volume_m3": 1.0, "max_biomass_kg": 1.0}
    _raises(
        engine,
        psycopg.errors.CheckViolation,
        lambda c: c.execute(insert(Container).values(**row, **site)),
    )


def test_growth_sample_must_agree_with_its_assignment(engine: Engine) -> None:
    with engine.begin() as conn:
        ids = _farm(conn)
        _stay(conn, "assignment", 1, D0, D9)
    sample = {
        "batch_id": ids["batch"],
        "assignment_id": 1,
        "sample_date": D5,
        "fish_count": 30,
        "mean_weight_g": 0.2,
        "sd_weight_g": 0.02,
        "mean_length_cm": 2.5,
        "condition_factor": 1.1,
    }
    with engine.begin() as conn:
        conn.execute(insert(growth_sample).values(container_id=ids["container"], **sample))
    _raises(
        engine,
        psycopg.errors.ForeignKeyViolation,
        lambda c: c.execute(
            insert(growth_sample).values(container_id=ids["other_container"], **sample)
        ),
    )


def _partition_of(conn: Connection, at: str) -> str:
    row = {
        "batch_id": 1,
        "assignment_id": 1,
        "container_id": 1,
        "sensor_id": 1,
        "parameter_id": 1,
        "reading_time": text(f"CAST('{at}' AS timestamptz)"),
        "value": 8.5,
    }
    conn.execute(insert(environmental_reading).values(**row))
    return str(
        conn.scalar(
            text(
                "SELECT tableoid::regclass::text FROM environmental_reading"
                " WHERE reading_time = CAST(:at AS timestamptz)"
            ),
            {"at": at},
        )
    )


def test_readings_land_in_their_month(engine: Engine) -> None:
    with engine.begin() as conn:
        # bounds must be UTC whatever the session time zone
        conn.execute(text("SET LOCAL TIME ZONE 'Pacific/Auckland'"))
        created = ensure_reading_partitions(conn, date(2024, 1, 15), date(2024, 3, 2))
    assert created == [
        "environmental_reading_y2024m01",
        "environmental_reading_y2024m02",
        "environmental_reading_y2024m03",
    ]
    assert ensure_reading_partitions(engine, date(2024, 1, 1), date(2024, 3, 31)) == []
    with engine.begin() as conn:
        assert _partition_of(conn, "2024-02-14 12:00:00+00") == "environmental_reading_y2024m02"
        assert _partition_of(conn, "2024-01-31 23:59:59+00") == "environmental_reading_y2024m01"
        assert _partition_of(conn, "2024-03-01 00:00:00+00") == "environmental_reading_y2024m03"
        assert _partition_of(conn, "2030-06-01 00:00:00+00") == DEFAULT_PARTITION


def test_partitioning_a_month_the_default_already_holds_fails_clearly(engine: Engine) -> None:
    with engine.begin() as conn:
        _partition_of(conn, "2024-05-10 00:00:00+00")
    with pytest.raises(PartitionConflict, match="environmental_reading_y2024m05"):
        ensure_reading_partitions(engine, date(2024, 4, 1), date(2024, 5, 1))
    with engine.connect() as conn:
        # the whole call rolled back: April was not left half-done
        assert conn.scalar(text("SELECT to_regclass('environmental_reading_y2024m04')")) is None


def test_daily_state_is_one_row_per_assignment_day(engine: Engine) -> None:
    row = {
        "assignment_id": 1,
        "state_date": D5,
        "batch_id": 1,
        "container_id": 1,
        "population": 1000,
        "mean_weight_g": 0.2,
        "biomass_kg": 0.2,
        "deaths": 0,
        "fish_in": 0,
        "fish_out": 0,
        "harvested": 0,
        "feed_kg": 0.0,
    }
    with engine.begin() as conn:
        conn.execute(insert(daily_assignment_state).values(**row))
    _raises(
        engine,
        psycopg.errors.UniqueViolation,
        lambda c: c.execute(insert(daily_assignment_state).values(**row)),
    )


def test_drop_then_create_again(engine: Engine) -> None:
    ensure_reading_partitions(engine, date(2024, 1, 1), date(2024, 1, 1))
    with engine.begin() as conn:
        _farm(conn)
        _stay(conn, "assignment", 1, D0, None)
    drop_schema(engine)
    assert inspect(engine).get_table_names() == []
    drop_schema(engine)  # nothing left to drop is fine too
    create_schema(engine)
    with engine.begin() as conn:
        _farm(conn)
        assert conn.scalar(text("SELECT count(*) FROM assignment")) == 0
