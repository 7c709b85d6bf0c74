"""The bulk writer and table checksums against a real PostgreSQL (I-18, I-19)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import cache
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg import sql
from sqlalchemy import create_engine, insert

from pipeline.farm import Farm, build_farm
from pipeline.planner import Plan, plan
from pipeline.scenario import MORTALITY_CAUSES, Scenario, load_scenario
from schema import BATCH_TABLES, COPY_COLUMNS, create_schema, metadata
from schema.models import Batch
from tests.conftest import ROOT
from workers.checksum import (
    READINGS,
    ColumnSpec,
    batch_checksum,
    checksum_columns,
    sql_checksum,
    stored_checksums,
    table_columns,
)
from workers.engine import simulate
from workers.writer import _wire_values, write_batch

Columns = dict[str, np.ndarray]
HARVESTED, ACTIVE = 1, 5  # demo batches: one finished, one still at sea (open assignments)


@cache
def _world() -> tuple[Scenario, Farm, Plan]:
    scenario = load_scenario(ROOT / "scenarios" / "demo.toml")
    farm = build_farm(scenario)
    return scenario, farm, plan(scenario, farm)


@dataclass
class Rows:
    """What the writer needs of the engine's BatchRows."""

    batch_id: int
    status: str
    end_date: date | None
    tables: dict[str, Columns]
    pieces: list[Columns] = field(default_factory=list)
    stream: Callable[[], Iterator[Columns]] | None = None

    def readings(self) -> Iterator[Columns]:
        return self.stream() if self.stream is not None else iter(self.pieces)


def _daily_state(assignment: Columns) -> Columns:
    """A stand-in daily state (3 days per assignment) with NULL temperature and FCR."""
    ids = np.repeat(assignment["id"], 3)
    days = np.repeat(assignment["start_date"], 3) + np.tile(np.arange(3), len(assignment["id"]))
    n = len(ids)
    temperature = np.linspace(4.0, 12.0, n)
    temperature[::4] = np.nan
    fcr = np.full(n, 1.1)
    fcr[::3] = np.nan
    return {
        "assignment_id": ids,
        "state_date": days.astype("datetime64[D]"),
        "batch_id": np.repeat(assignment["batch_id"], 3),
        "container_id": np.repeat(assignment["container_id"], 3),
        "population": np.arange(n, dtype=np.int64) * 1000,
        "mean_weight_g": np.linspace(0.1, 5000.0, n),
        "biomass_kg": np.linspace(1.0, 1e5, n),
        "deaths": np.arange(n, dtype=np.int64) % 7,
        "fish_in": np.zeros(n, dtype=np.int64),
        "fish_out": np.zeros(n, dtype=np.int64),
        "harvested": np.zeros(n, dtype=np.int64),
        "feed_kg": np.linspace(0.0, 900.0, n),
        "temperature_c": temperature,
        "fcr": fcr,
    }


@cache
def _engine_rows(batch_id: int) -> Rows:
    scenario, farm, p = _world()
    out = simulate(p.batch(batch_id), scenario, farm, p.seed)
    tables = dict(out.tables)
    if "daily_assignment_state" not in tables:
        tables["daily_assignment_state"] = _daily_state(tables["assignment"])
    return Rows(out.batch_id, out.status, out.end_date, tables, list(out.readings()))


def _shuffled(rows: Rows, seed: int) -> Rows:
    """The same rows in another order: tables permuted, readings re-cut and permuted."""
    rng = np.random.default_rng(seed)

    def permute(cols: Columns) -> Columns:
        order = rng.permutation(len(next(iter(cols.values()))))
        return {k: v[order] for k, v in cols.items()}

    tables = {t: permute(c) for t, c in rows.tables.items()}
    whole = permute({k: np.concatenate([p[k] for p in rows.pieces]) for k in rows.pieces[0]})
    cuts = np.sort(rng.choice(len(whole["value"]), size=25, replace=False))
    pieces = [
        dict(zip(whole, parts, strict=True))
        for parts in zip(*(np.split(v, cuts) for v in whole.values()), strict=True)
    ]
    return Rows(rows.batch_id, rows.status, rows.end_date, tables, pieces)


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    """A database with the schema, the demo farm and its planned batches (no rows yet)."""
    engine = create_engine(db_url)
    try:
        create_schema(engine)
        _, farm, p = _world()
        with engine.begin() as c:
            for table, rows in farm.table_rows().items():
                if rows:
                    c.execute(insert(metadata.tables[table]), rows)
            c.execute(
                insert(Batch),
                [
                    {
                        "id": b.batch_id,
                        "batch_number": b.batch_id,
                        "geography_id": b.geography_id,
                        "start_date": b.start_date,
                        "eggs": b.eggs,
                        "harvest_target_g": b.harvest_target_g,
                        "seed": b.seed,
                    }
                    for b in p.batches
                ],
            )
    finally:
        engine.dispose()
    url = db_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(url, autocommit=True) as connection:
        yield connection


# ---- reading back -------------------------------------------------------------------------


def _norm(value: Any) -> Any:
    """A comparable form: floats by bit pattern, timestamps as naive UTC."""
    if isinstance(value, float):
        return None if value != value else value.hex()
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


def _sorted(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return sorted(rows, key=lambda r: tuple(repr(v) for v in r))


def _expected(table: str, pieces: list[Columns]) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    for cols in pieces:
        lists = []
        for spec in table_columns(table):
            values = cols[spec.name]
            if table == "mortality_event" and spec.name == "cause":
                values = np.asarray(MORTALITY_CAUSES, dtype=object)[values]
            elif values.dtype.kind == "M":
                values = values.astype(object)
            lists.append([_norm(v.item() if isinstance(v, np.generic) else v) for v in values])
        rows += zip(*lists, strict=True)
    return _sorted(rows)


def _stored(conn: psycopg.Connection, table: str, batch_id: int) -> list[tuple[Any, ...]]:
    query = sql.SQL("SELECT {} FROM {} WHERE batch_id = %s").format(
        sql.SQL(", ").join(map(sql.Identifier, COPY_COLUMNS[table])), sql.Identifier(table)
    )
    rows = conn.execute(query, (batch_id,), binary=True).fetchall()
    return _sorted([tuple(_norm(v) for v in row) for row in rows])


def _counts(conn: psycopg.Connection, batch_id: int) -> dict[str, int]:
    return {
        t: conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE batch_id = %s").format(sql.Identifier(t)),
            (batch_id,),
        ).fetchone()[0]  # type: ignore[index]
        for t in BATCH_TABLES
    }


def _lengths(rows: Rows) -> dict[str, int]:
    out = {t: len(c["batch_id"]) for t, c in rows.tables.items()}
    out[READINGS] = sum(len(p["value"]) for p in rows.pieces)
    return {t: out.get(t, 0) for t in BATCH_TABLES}


def _pieces_of(rows: Rows, table: str) -> list[Columns]:
    return rows.pieces if table == READINGS else [rows.tables[table]]


# ---- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_id", [HARVESTED, ACTIVE])
def test_every_row_round_trips_exactly(conn: psycopg.Connection, batch_id: int) -> None:
    rows = _engine_rows(batch_id)
    # a chunk size that splits pieces across chunks
    result = write_batch(conn, rows, replace=False, chunk_rows=7_777)

    assert result.rows == _lengths(rows) == _counts(conn, batch_id)
    assert result.rows[READINGS] > 7_777 and result.rows["daily_assignment_state"] > 0
    for table in BATCH_TABLES:
        assert _stored(conn, table, batch_id) == _expected(table, _pieces_of(rows, table)), table
    status, end_date = conn.execute(
        "SELECT status, end_date FROM batch WHERE id = %s", (batch_id,)
    ).fetchone()  # type: ignore[misc]
    assert (status, end_date) == (rows.status, rows.end_date)


def test_nulls_are_stored_as_null(conn: psycopg.Connection) -> None:
    rows = _engine_rows(ACTIVE)
    write_batch(conn, rows, replace=False)
    open_stays = sum(v is None for v in rows.tables["assignment"]["end_date"])
    placements = sum(v is None for v in rows.tables["transfer_action"]["source_assignment_id"])
    nan_temperature = int(np.isnan(rows.tables["daily_assignment_state"]["temperature_c"]).sum())
    assert open_stays and placements and nan_temperature
    found = conn.execute(
        "SELECT (SELECT count(*) FROM assignment WHERE batch_id = %(b)s AND end_date IS NULL),"
        " (SELECT count(*) FROM transfer_action"
        "   WHERE batch_id = %(b)s AND source_assignment_id IS NULL),"
        " (SELECT count(*) FROM daily_assignment_state"
        "   WHERE batch_id = %(b)s AND temperature_c IS NULL)",
        {"b": ACTIVE},
    ).fetchone()
    assert found == (open_stays, placements, nan_temperature)


@pytest.mark.parametrize("batch_id", [HARVESTED, ACTIVE])
def test_checksums_from_arrays_equal_checksums_from_stored_rows(
    conn: psycopg.Connection, batch_id: int
) -> None:
    result = write_batch(conn, _engine_rows(batch_id), replace=False)
    stored = stored_checksums(conn, batch_id)
    assert stored == result.checksums
    assert batch_checksum(stored) == result.checksum
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_checksum_ignores_row_order_and_surrogate_keys() -> None:
    rows = _engine_rows(HARVESTED)
    shuffled = _shuffled(rows, seed=3)
    for table in rows.tables:
        assert checksum_columns(table, shuffled.tables[table]) == checksum_columns(
            table, rows.tables[table]
        ), table
    renumbered = dict(rows.tables["transfer_action"])
    renumbered["id"] = renumbered["id"] + 1000
    assert checksum_columns("transfer_action", renumbered) == checksum_columns(
        "transfer_action", rows.tables["transfer_action"]
    )


def _changed(values: np.ndarray, spec: ColumnSpec, table: str) -> np.ndarray:
    out = values.copy()
    if table == "mortality_event" and spec.name == "cause":
        out[0] = (out[0] + 1) % len(MORTALITY_CAUSES)
    elif spec.kind == "float8":
        out[0] = np.nextafter(out[0], np.inf) if not np.isnan(out[0]) else 1.0
    elif spec.kind == "text":
        out[0] = out[0] + "x"
    elif values.dtype == object:
        out[0] = None if out[0] is not None else (date(2001, 1, 1) if spec.kind == "date" else 7)
    elif spec.kind == "timestamptz":
        out[0] = out[0] + np.timedelta64(1, "us")
    else:
        out[0] = out[0] + 1
    return out


def test_checksum_sees_any_single_change() -> None:
    rows = _engine_rows(ACTIVE)
    tables = {**rows.tables, READINGS: rows.pieces[0]}
    for table, cols in tables.items():
        if not len(cols["batch_id"]):
            continue
        before = checksum_columns(table, cols)
        for spec in table_columns(table):
            if table == "transfer_action" and spec.name == "id":
                continue
            changed = {**cols, spec.name: _changed(cols[spec.name], spec, table)}
            assert checksum_columns(table, changed) != before, (table, spec.name)
        fewer = {k: v[1:] for k, v in cols.items()}
        assert checksum_columns(table, fewer) != before, table


def test_stored_checksum_sees_a_changed_row(conn: psycopg.Connection) -> None:
    result = write_batch(conn, _engine_rows(HARVESTED), replace=False)
    conn.execute(
        "UPDATE environmental_reading SET value = value * 1.5 + 1"
        " WHERE batch_id = %(b)s AND (sensor_id, reading_time) = ("
        "   SELECT sensor_id, reading_time FROM environmental_reading WHERE batch_id = %(b)s"
        "   ORDER BY reading_time, sensor_id LIMIT 1)",
        {"b": HARVESTED},
    )
    assert sql_checksum(conn, READINGS, HARVESTED) != result.checksums[READINGS]


def test_replace_rewrites_exactly_that_batch(conn: psycopg.Connection) -> None:
    first = write_batch(conn, _engine_rows(HARVESTED), replace=False)
    other = write_batch(conn, _engine_rows(ACTIVE), replace=False)
    other_stored = stored_checksums(conn, ACTIVE)

    again = write_batch(conn, _shuffled(_engine_rows(HARVESTED), seed=11), replace=True)

    assert again.rows == first.rows == _counts(conn, HARVESTED)
    assert again.checksums == first.checksums == stored_checksums(conn, HARVESTED)
    assert again.checksum == first.checksum
    assert _counts(conn, ACTIVE) == other.rows
    assert stored_checksums(conn, ACTIVE) == other_stored == other.checksums
    assert "delete" in again.seconds


def test_a_second_write_without_replace_fails_and_keeps_the_first(
    conn: psycopg.Connection,
) -> None:
    first = write_batch(conn, _engine_rows(HARVESTED), replace=False)
    with pytest.raises(psycopg.errors.UniqueViolation):
        write_batch(conn, _engine_rows(HARVESTED), replace=False)
    assert _counts(conn, HARVESTED) == first.rows
    assert stored_checksums(conn, HARVESTED) == first.checksums


class TokenLost(RuntimeError):
    pass


def test_failing_before_commit_leaves_nothing_written(conn: psycopg.Connection) -> None:
    rows = _engine_rows(ACTIVE)
    seen: list[int] = []

    def check_token(c: psycopg.Connection, _result: object) -> None:
        seen.append(_counts(c, ACTIVE)[READINGS])  # inside the transaction: all rows there
        raise TokenLost("attempt token superseded")

    with pytest.raises(TokenLost):
        write_batch(conn, rows, replace=False, before_commit=check_token)

    assert seen == [_lengths(rows)[READINGS]]
    assert set(_counts(conn, ACTIVE).values()) == {0}
    assert conn.execute("SELECT status FROM batch WHERE id = %s", (ACTIVE,)).fetchone() == (
        "active",
    )
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_failing_retry_keeps_the_earlier_attempt(conn: psycopg.Connection) -> None:
    first = write_batch(conn, _engine_rows(HARVESTED), replace=False)

    def lose(_: psycopg.Connection, _result: object) -> None:
        raise TokenLost

    with pytest.raises(TokenLost):
        write_batch(conn, _engine_rows(HARVESTED), replace=True, before_commit=lose)
    assert stored_checksums(conn, HARVESTED) == first.checksums


def test_write_needs_an_idle_connection(conn: psycopg.Connection) -> None:
    with conn.transaction(), pytest.raises(RuntimeError, match="outside any transaction"):
        write_batch(conn, _engine_rows(HARVESTED), replace=False)


def test_unknown_batch_is_refused(conn: psycopg.Connection) -> None:
    rows = Rows(9_999, "active", None, {})
    with pytest.raises(LookupError):
        write_batch(conn, rows, replace=False)


def test_int4_overflow_is_refused() -> None:
    with pytest.raises(OverflowError):
        _wire_values(ColumnSpec("fish_count", "int4", False), np.array([2**31]))


STREAM_ROWS, PIECE_ROWS, CHUNK_ROWS = 2_000_000, 1_000, 100_000


def _reading_stream() -> Iterator[Columns]:
    t0 = np.datetime64("2024-01-01T00:00", "us")
    for start in range(0, STREAM_ROWS, PIECE_ROWS):
        i = np.arange(start, start + PIECE_ROWS, dtype=np.int64)
        yield {
            "batch_id": np.full(PIECE_ROWS, HARVESTED, dtype=np.int64),
            "assignment_id": i // 50_000,
            "container_id": i % 17,
            "sensor_id": i % 31,
            "parameter_id": i % 3 + 1,
            "reading_time": t0 + (i * 60_000_000).astype("timedelta64[us]"),
            "value": np.sin(i.astype(np.float64)),
        }


def test_readings_stream_through_bounded_memory(conn: psycopg.Connection) -> None:
    rows = Rows(HARVESTED, "active", None, {}, stream=_reading_stream)
    row_bytes = sum(v.itemsize for v in next(_reading_stream()).values())
    whole_stream = STREAM_ROWS * row_bytes  # 112 MB as arrays (more once encoded)

    tracemalloc.start()
    try:
        result = write_batch(conn, rows, replace=False, chunk_rows=CHUNK_ROWS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert result.rows[READINGS] == STREAM_ROWS == _counts(conn, HARVESTED)[READINGS]
    assert CHUNK_ROWS * row_bytes < peak < whole_stream / 4  # the chunk buffer is seen
    assert sql_checksum(conn, READINGS, HARVESTED) == result.checksums[READINGS]
    last = conn.execute(
        "SELECT max(reading_time) FROM environmental_reading WHERE batch_id = %s", (HARVESTED,)
    ).fetchone()[0]  # type: ignore[index]
    assert last == datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=STREAM_ROWS - 1)
