"""The bulk writer: one batch's rows into PostgreSQL, in one transaction, by binary COPY.

Shaped like a TSBS Processor: `TableWriter` owns one table's COPY (`open`,
`write(columns)`, `close`), buffering up to `chunk_rows` rows and encoding numpy
column arrays straight into PostgreSQL's binary tuple format. Tables whose
columns are all fixed-width and NOT NULL (the readings among them) are encoded
through a structured big-endian numpy dtype into a reused chunk buffer; tables
with text or nullable columns through a vectorised scatter of variable-length
rows. `write_batch` runs one `TableWriter` per table in load order inside one
transaction: delete an earlier attempt's rows (on a retry), update the batch,
COPY, let the caller check its attempt token, commit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from schema.models import BATCH_TABLES
from workers.checksum import (
    PG_EPOCH_DAYS,
    PG_EPOCH_US,
    BatchRowsLike,
    ColumnSpec,
    TableChecksum,
    batch_checksum,
    factorize,
    numeric_values,
    table_columns,
    table_pieces,
    text_values,
)

CHUNK_ROWS = 200_000

_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, header extension length
_TRAILER = b"\xff\xff"
_WIRE: dict[str, str] = {
    "int2": ">i2",
    "int4": ">i4",
    "int8": ">i8",
    "float8": ">f8",
    "date": ">i4",
    "timestamptz": ">i8",
}
_INT_RANGE = {"int2": (-(2**15), 2**15 - 1), "int4": (-(2**31), 2**31 - 1)}


@dataclass(frozen=True)
class WriteResult:
    rows: dict[str, int]
    checksums: dict[str, str]
    checksum: str
    seconds: dict[str, float]  # per table (readings include their lazy generation), "delete"

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


# ---- encoding -----------------------------------------------------------------------------


def _wire_values(spec: ColumnSpec, values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """A fixed-width column as native-order values in PostgreSQL's epoch/units, NULL mask."""
    data, mask = numeric_values(spec, values)
    if spec.kind == "date":
        data = data - PG_EPOCH_DAYS
    elif spec.kind == "timestamptz":
        data = data - PG_EPOCH_US
    elif spec.kind in _INT_RANGE and data.size:
        lo, hi = _INT_RANGE[spec.kind]
        if data.min() < lo or data.max() > hi:
            raise OverflowError(f"column {spec.name} has values outside {spec.kind}")
    if spec.kind == "float8" and spec.nullable:
        nan = np.isnan(data)
        if nan.any():
            mask = nan if mask is None else mask | nan
    if mask is not None and not spec.nullable:
        raise ValueError(f"column {spec.name} is NOT NULL but holds None")
    return data, mask


def _fixed_dtype(specs: tuple[ColumnSpec, ...]) -> np.dtype:
    fields: list[tuple[str, str]] = [("n", ">i2")]
    for i, s in enumerate(specs):
        fields += [(f"l{i}", ">i4"), (f"v{i}", _WIRE[s.kind])]
    return np.dtype(fields)


def _scatter(buf: np.ndarray, at: np.ndarray, payload: np.ndarray) -> None:
    """buf[at[i] + j] = payload[i, j] (a 1-D payload goes to every row)."""
    buf[at[:, None] + np.arange(payload.shape[-1])] = payload


@dataclass
class _Field:
    """One column of variable-layout rows: payload size per row (-1 = NULL) and bytes."""

    size: np.ndarray
    fixed: np.ndarray | None = None  # (rows, width) big-endian payload
    codes: np.ndarray | None = None  # text: index into blobs per row
    blobs: tuple[np.ndarray | None, ...] = ()


def _field(table: str, spec: ColumnSpec, values: np.ndarray) -> _Field:
    n = len(values)
    if spec.kind == "text":
        codes, uniques = factorize(values)
        if None in uniques and not spec.nullable:
            raise ValueError(f"column {table}.{spec.name} is NOT NULL but holds None")
        blobs = tuple(None if u is None else np.frombuffer(u.encode(), np.uint8) for u in uniques)
        sizes = np.array([-1 if b is None else len(b) for b in blobs], dtype=np.int64)
        return _Field(sizes[codes], codes=codes, blobs=blobs)
    data, mask = _wire_values(spec, values)
    width = spec.width or 0
    size = np.full(n, width, dtype=np.int64)
    if mask is not None:
        size[mask] = -1
    fixed = data.astype(_WIRE[spec.kind]).view(np.uint8).reshape(n, width)
    return _Field(size, fixed=fixed)


def encode_rows(
    table: str, specs: tuple[ColumnSpec, ...], columns: Mapping[str, np.ndarray]
) -> bytes:
    """Binary COPY tuples for rows with variable layouts (text, NULLs), vectorised."""
    fields = [_field(table, s, np.asarray(columns[s.name])) for s in specs]
    n = len(fields[0].size)
    row_bytes = 2 + sum(4 + np.maximum(f.size, 0) for f in fields)
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(row_bytes[:-1], out=starts[1:])
    buf = np.empty(int(row_bytes.sum()), dtype=np.uint8)
    _scatter(buf, starts, np.array([len(specs)], ">i2").view(np.uint8))
    at = starts + 2
    for f in fields:
        _scatter(buf, at, f.size.astype(">i4").view(np.uint8).reshape(n, 4))
        at += 4
        if f.fixed is not None:
            present = f.size >= 0
            _scatter(buf, at[present], f.fixed[present])
        elif f.codes is not None:
            for k, blob in enumerate(f.blobs):
                if blob is not None and len(blob):
                    _scatter(buf, at[f.codes == k], blob)
        at += np.maximum(f.size, 0)
    return buf.tobytes()


# ---- the processor ------------------------------------------------------------------------


class TableWriter:
    """COPY one table from column arrays: open / write(columns) / close.

    Rows are buffered up to `chunk_rows` and sent as one binary COPY, so memory
    is bounded by the chunk whatever the number or size of the pieces written.
    Every row written also goes into the table's checksum.
    """

    def __init__(self, cur: psycopg.Cursor, table: str, chunk_rows: int = CHUNK_ROWS) -> None:
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be positive")
        self.cur = cur
        self.table = table
        self.chunk_rows = chunk_rows
        self.specs = table_columns(table)
        self.names = tuple(s.name for s in self.specs)
        self.fixed = all(s.width is not None and not s.nullable for s in self.specs)
        self.checksum = TableChecksum(table)
        self.rows = 0
        self._copy_cm: psycopg.Copy | None = None
        self._copy: psycopg.Copy | None = None
        self._buf: np.ndarray | None = None
        self._fill = 0

    def open(self) -> None:
        query = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
            sql.Identifier(self.table), sql.SQL(", ").join(map(sql.Identifier, self.names))
        )
        self._copy_cm = self.cur.copy(query)
        self._copy = self._copy_cm.__enter__()
        self._copy.write(_HEADER)

    def write(self, columns: Mapping[str, np.ndarray]) -> None:
        if self._copy is None:
            raise RuntimeError("TableWriter.write before open")
        if set(columns) != set(self.names):
            raise ValueError(
                f"{self.table}: expected columns {sorted(self.names)}, got {sorted(columns)}"
            )
        n = len(columns[self.names[0]])
        if any(len(columns[c]) != n for c in self.names):
            raise ValueError(f"{self.table}: columns of unequal length")
        if n == 0:
            return
        columns = {
            s.name: text_values(self.table, s, np.asarray(columns[s.name]))
            if s.kind == "text"
            else np.asarray(columns[s.name])
            for s in self.specs
        }
        self.checksum.update(columns)
        self.rows += n
        for lo in range(0, n, self.chunk_rows):
            piece = {c: v[lo : lo + self.chunk_rows] for c, v in columns.items()}
            if self.fixed:
                self._buffer(piece)
            else:
                self._copy.write(encode_rows(self.table, self.specs, piece))

    def _buffer(self, columns: Mapping[str, np.ndarray]) -> None:
        if self._buf is None:
            self._buf = np.empty(self.chunk_rows, dtype=_fixed_dtype(self.specs))
            self._buf["n"] = len(self.specs)
            for i, s in enumerate(self.specs):
                self._buf[f"l{i}"] = s.width
        n = len(columns[self.names[0]])
        done = 0
        while done < n:
            take = min(n - done, self.chunk_rows - self._fill)
            out = self._buf[self._fill : self._fill + take]
            for i, s in enumerate(self.specs):
                data, _ = _wire_values(s, columns[s.name][done : done + take])
                out[f"v{i}"] = data
            self._fill += take
            done += take
            if self._fill == self.chunk_rows:
                self._flush()

    def _flush(self) -> None:
        if self._fill and self._buf is not None and self._copy is not None:
            self._copy.write(memoryview(self._buf[: self._fill].view(np.uint8)))
        self._fill = 0

    def close(self) -> int:
        """Send what is buffered and end the COPY; returns the rows written."""
        if self._copy is None or self._copy_cm is None:
            raise RuntimeError("TableWriter.close before open")
        self._flush()
        self._copy.write(_TRAILER)
        cm, self._copy_cm, self._copy, self._buf = self._copy_cm, None, None, None
        cm.__exit__(None, None, None)
        return self.rows

    def abort(self, exc: BaseException) -> None:
        """End the COPY with an error (the server discards it)."""
        cm, self._copy_cm, self._copy, self._buf = self._copy_cm, None, None, None
        if cm is not None:
            cm.__exit__(type(exc), exc, exc.__traceback__)

    def __enter__(self) -> TableWriter:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
        else:
            self.abort(exc)


# ---- one batch ----------------------------------------------------------------------------


def write_batch(
    conn: psycopg.Connection,
    rows: BatchRowsLike,
    *,
    replace: bool,
    chunk_rows: int = CHUNK_ROWS,
    before_commit: Callable[[psycopg.Connection, WriteResult], None] | None = None,
) -> WriteResult:
    """Write all of one batch's rows in one transaction; on a retry (`replace`) first
    delete whatever an earlier attempt left. `before_commit(conn, result)` runs last
    inside the transaction (the caller checks its attempt token there and records the
    result with the rows; raising aborts).
    Any exception rolls everything back and propagates.
    """
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise RuntimeError("write_batch needs a connection outside any transaction")
    counts: dict[str, int] = {}
    checksums: dict[str, str] = {}
    seconds: dict[str, float] = {}
    with conn.transaction(), conn.cursor() as cur:
        if replace:
            t0 = time.perf_counter()
            for table in reversed(BATCH_TABLES):
                cur.execute(
                    sql.SQL("DELETE FROM {} WHERE batch_id = %s").format(sql.Identifier(table)),
                    (rows.batch_id,),
                )
            seconds["delete"] = time.perf_counter() - t0
        cur.execute(
            "UPDATE batch SET status = %s, end_date = %s WHERE id = %s",
            (rows.status, rows.end_date, rows.batch_id),
        )
        if cur.rowcount != 1:
            raise LookupError(f"batch {rows.batch_id} is not in the batch table")
        for table in BATCH_TABLES:
            t0 = time.perf_counter()
            with TableWriter(cur, table, chunk_rows) as writer:
                for piece in table_pieces(rows, table):
                    writer.write(piece)
            counts[table] = writer.rows
            checksums[table] = writer.checksum.hexdigest()
            seconds[table] = time.perf_counter() - t0
        result = WriteResult(counts, checksums, batch_checksum(checksums), seconds)
        if before_commit is not None:
            before_commit(conn, result)
    return result
