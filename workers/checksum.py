"""Order-independent table checksums, computed alike from arrays and from stored rows.

A row's hash chains the canonical 64-bit value of each of its columns (surrogate
keys left out) through splitmix64; a table's checksum is its row count and the
sum of its row hashes modulo 2**64, so row order never matters (I-18, I-19).

Canonical values: integers are themselves; float8 is its IEEE bit pattern (any
NaN, like NULL, is `NULL_VALUE`); a date is days since 1970-01-01; a timestamp is
microseconds since 1970-01-01 UTC; text is the first 8 bytes of the md5 of its
UTF-8, read as a signed big-endian integer; NULL is `NULL_VALUE`.

The writer feeds the arrays it COPYs through `TableChecksum`. The stored path
has PostgreSQL compute the same canonical values set-based (md5 for text,
`coalesce` for NULLs) and stream them as fixed-width binary COPY, which numpy
parses and mixes exactly as the writer did.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from functools import cache
from typing import Protocol

import numpy as np
import psycopg
from psycopg import sql
from sqlalchemy import BigInteger, Date, DateTime, Double, Integer, SmallInteger, Text

from pipeline.scenario import MORTALITY_CAUSES
from schema.models import BATCH_TABLES, COPY_COLUMNS, metadata

READINGS = "environmental_reading"

# Columns left out of a table's checksum: surrogate keys.
SURROGATE_KEYS: dict[str, tuple[str, ...]] = {"transfer_action": ("id",)}

# Text columns the engine hands over as int codes into these values.
TEXT_CODES: dict[tuple[str, str], tuple[str, ...]] = {
    ("mortality_event", "cause"): MORTALITY_CAUSES,
}

NULL_VALUE = 0x6E756C6C_6E756C6C  # b"nullnull": the canonical value of NULL (and of NaN)

PG_EPOCH_DAYS = 10_957  # 2000-01-01 (PostgreSQL's epoch) in days since 1970-01-01
PG_EPOCH_US = PG_EPOCH_DAYS * 86_400_000_000

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_MASK64 = (1 << 64) - 1
_STREAM_BYTES = 8 << 20  # parse stored rows in pieces of about this size


# ---- column model (shared with the writer) ----------------------------------------------


class BatchRowsLike(Protocol):
    """What the writer and the checksums need of the engine's `BatchRows`."""

    batch_id: int
    status: str
    end_date: date | None
    tables: dict[str, dict[str, np.ndarray]]

    def readings(self) -> Iterator[dict[str, np.ndarray]]: ...


def table_pieces(rows: BatchRowsLike, table: str) -> Iterable[Mapping[str, np.ndarray]]:
    """One table's rows of a batch as column-array pieces (readings streamed)."""
    if table == READINGS and READINGS not in rows.tables:
        return rows.readings()
    columns = rows.tables.get(table)
    return [columns] if columns else []


@dataclass(frozen=True, slots=True)
class ColumnSpec:
    name: str
    kind: str  # int2 | int4 | int8 | float8 | date | timestamptz | text
    nullable: bool

    @property
    def width(self) -> int | None:
        """Bytes of the binary wire value; None for text (variable)."""
        return _WIDTHS[self.kind]


_WIDTHS: dict[str, int | None] = {
    "int2": 2,
    "int4": 4,
    "int8": 8,
    "float8": 8,
    "date": 4,
    "timestamptz": 8,
    "text": None,
}


def _kind(type_: object) -> str:
    # BigInteger and SmallInteger subclass Integer: test them first
    for cls, kind in (
        (BigInteger, "int8"),
        (SmallInteger, "int2"),
        (Integer, "int4"),
        (Double, "float8"),
        (DateTime, "timestamptz"),
        (Date, "date"),
        (Text, "text"),
    ):
        if isinstance(type_, cls):
            return kind
    raise TypeError(f"no binary encoding for column type {type_!r}")


@cache
def table_columns(table: str) -> tuple[ColumnSpec, ...]:
    """The COPY columns of a batch table, in COPY order, with their wire kinds."""
    cols = metadata.tables[table].columns
    return tuple(
        ColumnSpec(name, _kind(cols[name].type), bool(cols[name].nullable))
        for name in COPY_COLUMNS[table]
    )


@cache
def checksum_columns_of(table: str) -> tuple[ColumnSpec, ...]:
    """The columns a table's checksum covers: all COPY columns but surrogate keys."""
    skip = SURROGATE_KEYS.get(table, ())
    return tuple(c for c in table_columns(table) if c.name not in skip)


def null_mask(values: np.ndarray) -> np.ndarray | None:
    """Where an object array holds None (None if nowhere, or not an object array)."""
    if values.dtype != object:
        return None
    mask = np.fromiter((v is None for v in values), dtype=bool, count=len(values))
    return mask if mask.any() else None


def numeric_values(spec: ColumnSpec, values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """A non-text column as (int64 or float64 array, NULL mask or None).

    Dates become days and timestamps microseconds since 1970-01-01; NULLs (None
    in an object array) become 0 under the mask. NaN stays NaN: callers decide.
    """
    mask = null_mask(values)
    if values.dtype == object:
        fill: object = 0
        if spec.kind == "date":
            fill = date(1970, 1, 1)
        elif spec.kind == "timestamptz":
            fill = datetime(1970, 1, 1)
        values = np.array([fill if v is None else v for v in values])
    if spec.kind == "float8":
        return values.astype(np.float64, copy=False), mask
    if spec.kind == "date":
        return values.astype("datetime64[D]", copy=False).view(np.int64), mask
    if spec.kind == "timestamptz":
        return values.astype("datetime64[us]", copy=False).view(np.int64), mask
    return values.astype(np.int64, copy=False), mask


def text_values(table: str, spec: ColumnSpec, values: np.ndarray) -> np.ndarray:
    """A text column as an object array of str/None (int codes translated, see TEXT_CODES)."""
    categories = TEXT_CODES.get((table, spec.name))
    if categories is not None and values.dtype != object:
        return np.asarray(categories, dtype=object)[values]
    return values


def factorize(values: np.ndarray | Sequence[object]) -> tuple[np.ndarray, list[str | None]]:
    """A text column as (int64 codes, distinct values in first-seen order)."""
    index: dict[object, int] = {}
    codes = np.fromiter(
        (index.setdefault(v, len(index)) for v in values), dtype=np.int64, count=len(values)
    )
    return codes, list(index)  # type: ignore[arg-type]


@cache
def text_hash(text: str) -> int:
    digest = hashlib.md5(text.encode("utf-8"), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def canonical(spec: ColumnSpec, values: np.ndarray) -> np.ndarray:
    """The canonical int64 value of every row of one column (see module docstring)."""
    if spec.kind == "text":
        codes, uniques = factorize(values)
        table = np.array(
            [NULL_VALUE if u is None else text_hash(u) for u in uniques], dtype=np.int64
        )
        return table[codes]
    data, mask = numeric_values(spec, values)
    if spec.kind == "float8":
        out = data.view(np.int64).copy()
        out[np.isnan(data)] = NULL_VALUE
    else:
        out = data.copy() if mask is not None else data
    if mask is not None:
        out[mask] = NULL_VALUE
    return out


# ---- mixing -------------------------------------------------------------------------------


def _mix_into(h: np.ndarray, value: np.ndarray) -> None:
    """h = splitmix64(h ^ value), in place, on uint64."""
    np.bitwise_xor(h, value.view(np.uint64), out=h)
    h += _GOLDEN
    h ^= h >> _S30
    h *= _M1
    h ^= h >> _S27
    h *= _M2
    h ^= h >> _S31


def row_hashes(canonical_columns: Sequence[np.ndarray]) -> np.ndarray:
    """The uint64 hash of every row, given its columns' canonical int64 values in order."""
    n = len(canonical_columns[0]) if canonical_columns else 0
    h = np.zeros(n, dtype=np.uint64)
    for value in canonical_columns:
        _mix_into(h, np.ascontiguousarray(value, dtype=np.int64))
    return h


class TableChecksum:
    """Accumulates one table's checksum over any number of pieces of rows."""

    def __init__(self, table: str) -> None:
        self.table = table
        self.specs = checksum_columns_of(table)
        self.rows = 0
        self.total = 0

    def update(self, columns: Mapping[str, np.ndarray]) -> None:
        """Add rows given as the engine's or the writer's column arrays."""
        values = []
        for spec in self.specs:
            column = np.asarray(columns[spec.name])
            if spec.kind == "text":
                column = text_values(self.table, spec, column)
            values.append(canonical(spec, column))
        self.add_canonical(values)

    def add_canonical(self, values: Sequence[np.ndarray]) -> None:
        hashes = row_hashes(values)
        self.rows += len(hashes)
        self.total = (self.total + int(hashes.sum(dtype=np.uint64))) & _MASK64

    def hexdigest(self) -> str:
        return f"{self.rows}:{self.total:016x}"


def checksum_columns(table: str, columns: Mapping[str, np.ndarray]) -> str:
    """The checksum of one table's rows given as column arrays (any row order)."""
    acc = TableChecksum(table)
    if columns:
        acc.update(columns)
    return acc.hexdigest()


def rows_checksums(rows: BatchRowsLike) -> dict[str, str]:
    """Every table's checksum of a simulated batch, no database needed: what `write_batch`
    reports and `stored_checksums` recomputes for the same rows (I-18 re-simulation)."""
    out = {}
    for table in BATCH_TABLES:
        acc = TableChecksum(table)
        for piece in table_pieces(rows, table):
            acc.update(piece)
        out[table] = acc.hexdigest()
    return out


def empty_checksum(table: str) -> str:
    return TableChecksum(table).hexdigest()


def batch_checksum(per_table: Mapping[str, str]) -> str:
    """One checksum over all batch tables, in load order (a missing table counts as empty)."""
    lines = "".join(f"{t}={per_table.get(t, empty_checksum(t))}\n" for t in BATCH_TABLES).encode()
    return hashlib.sha256(lines).hexdigest()


# ---- the stored path ---------------------------------------------------------------------


def _stored_expr(spec: ColumnSpec) -> tuple[sql.Composable, str]:
    """SQL giving a column's canonical input as a fixed-width non-null value, and its dtype."""
    col = sql.Identifier(spec.name)
    null = sql.Literal(NULL_VALUE)
    if spec.kind == "float8":
        return sql.SQL("coalesce({}, 'NaN'::float8)").format(col), ">f8"
    if spec.kind == "text":
        md5 = sql.SQL("('x' || left(md5({}), 16))::bit(64)::int8").format(col)
        return sql.SQL("coalesce({}, {})").format(md5, null), ">i8"
    if not spec.nullable:  # dates and timestamps as sent natively, in PostgreSQL's epoch
        if spec.kind == "date":
            return col, ">i4"
        if spec.kind == "timestamptz":
            return col, ">i8"
        return sql.SQL("{}::int8").format(col), ">i8"
    if spec.kind == "date":
        value = sql.SQL("({} - DATE '1970-01-01')::int8").format(col)
    elif spec.kind == "timestamptz":
        value = sql.SQL("(extract(epoch FROM {}) * 1000000)::int8").format(col)
    else:
        value = sql.SQL("{}::int8").format(col)
    return sql.SQL("coalesce({}, {})").format(value, null), ">i8"


def _stored_canonical(spec: ColumnSpec, raw: np.ndarray) -> np.ndarray:
    """Canonical int64 values from one parsed column of the stored query."""
    if spec.kind == "float8":
        values = raw.astype(np.float64)
        out = values.view(np.int64).copy()
        out[np.isnan(values)] = NULL_VALUE
        return out
    out = raw.astype(np.int64)
    if not spec.nullable and spec.kind == "date":
        out += PG_EPOCH_DAYS
    elif not spec.nullable and spec.kind == "timestamptz":
        out += PG_EPOCH_US
    return out


def sql_checksum(conn: psycopg.Connection, table: str, batch_id: int) -> str:
    """The checksum of one batch's stored rows of `table`, equal to `checksum_columns`."""
    specs = checksum_columns_of(table)
    exprs = [_stored_expr(s) for s in specs]
    fields: list[tuple[str, str]] = [("n", ">i2")]
    for i, (_, dtype) in enumerate(exprs):
        fields += [(f"l{i}", ">i4"), (f"v{i}", dtype)]
    row = np.dtype(fields)
    query = sql.SQL(
        "COPY (SELECT {} FROM {} WHERE batch_id = {}) TO STDOUT (FORMAT BINARY)"
    ).format(sql.SQL(", ").join(e for e, _ in exprs), sql.Identifier(table), sql.Literal(batch_id))
    acc = TableChecksum(table)
    pending = bytearray()
    header = 19

    def consume(final: bool) -> None:
        nonlocal pending, header
        start = header
        body = len(pending) - start - (2 if final else 0)
        n = max(body, 0) // row.itemsize
        if n:
            rows = np.frombuffer(pending, dtype=row, count=n, offset=start)
            acc.add_canonical([_stored_canonical(s, rows[f"v{i}"]) for i, s in enumerate(specs)])
        pending = pending[start + n * row.itemsize :]
        header = 0

    with conn.cursor() as cur, cur.copy(query) as copy:
        for block in copy:
            pending += block
            if len(pending) >= _STREAM_BYTES:
                consume(final=False)
    consume(final=True)
    if bytes(pending) != b"\xff\xff":
        raise ValueError(f"unexpected binary COPY tail from {table}: {bytes(pending[:16])!r}")
    return acc.hexdigest()


def stored_checksums(conn: psycopg.Connection, batch_id: int) -> dict[str, str]:
    """Every batch table's checksum recomputed from the rows stored for `batch_id`.

    Runs in a transaction block of its own (a savepoint inside the caller's), so an
    idle connection is left idle.
    """
    with conn.transaction():
        return {t: sql_checksum(conn, t, batch_id) for t in BATCH_TABLES}
