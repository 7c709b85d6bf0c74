"""Create, extend and drop the aquasim schema.

`environmental_reading` is natively partitioned by month on `reading_time`
(UTC month boundaries), with a DEFAULT partition so that no insert ever fails
for want of a partition. TimescaleDB is deliberately not used even where it is
installed: a hypertable cannot be made from a table that is already
declaratively partitioned, the embedded server does not ship the extension, and
one code path for every deployment is worth more than compression here.
`timescaledb_available` only reports whether it could be used.
"""

from __future__ import annotations

from datetime import date

from sqlalchemy import Connection, Engine, text

from schema.models import metadata

READINGS = "environmental_reading"
DEFAULT_PARTITION = f"{READINGS}_default"

# Arbitrary key shared by every schema change, so concurrent callers (several
# coordinators, a test and a worker) serialise instead of racing on the catalog.
_SCHEMA_LOCK_KEY = 0x61717561_5F646466


class PartitionConflict(RuntimeError):
    """The default partition already holds readings for a month being partitioned."""


def _lock(conn: Connection) -> None:
    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK_KEY})


def create_schema(engine: Engine) -> None:
    """Create every aquasim table, index and constraint that is missing (idempotent)."""
    with engine.begin() as conn:
        _lock(conn)
        conn.execute(text("CREATE EXTENSION IF NOT EXISTS btree_gist"))
        metadata.create_all(conn, checkfirst=True)
        conn.execute(
            text(f"CREATE TABLE IF NOT EXISTS {DEFAULT_PARTITION} PARTITION OF {READINGS} DEFAULT")
        )


def drop_schema(engine: Engine) -> None:
    """Drop every aquasim table (partitions go with their parent); for `--reset`."""
    with engine.begin() as conn:
        _lock(conn)
        quote = conn.dialect.identifier_preparer.quote
        names = ", ".join(quote(t.name) for t in reversed(metadata.sorted_tables))
        conn.execute(text(f"DROP TABLE IF EXISTS {names} CASCADE"))


def timescaledb_available(conn: Connection) -> bool:
    """Whether the server could load TimescaleDB (informational; see module docstring)."""
    found = conn.scalar(
        text("SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')")
    )
    return bool(found)


def reading_partition_name(month: date) -> str:
    return f"{READINGS}_y{month.year:04d}m{month.month:02d}"


def _months(first: date, last: date) -> list[date]:
    months = []
    current = first.replace(day=1)
    while current <= last:
        months.append(current)
        current = _next_month(current)
    return months


def _next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def ensure_reading_partitions(bind: Engine | Connection, first: date, last: date) -> list[str]:
    """Create the monthly reading partitions covering `first`..`last`; return those created.

    Idempotent and safe to call concurrently. Creating a partition locks the
    parent table, so call it once per run before loading (e.g. from the
    coordinator at plan time), not from every batch job.

    Raises `PartitionConflict` if the default partition already holds readings
    of a month that has no partition yet: PostgreSQL would refuse the new
    partition, and moving rows silently is not this function's business.
    Given a Connection, the work joins its transaction and the caller commits.
    """
    if last < first:
        raise ValueError(f"last ({last}) is before first ({first})")
    if isinstance(bind, Engine):
        with bind.begin() as conn:
            return _ensure_partitions(conn, first, last)
    return _ensure_partitions(bind, first, last)


def _ensure_partitions(conn: Connection, first: date, last: date) -> list[str]:
    _lock(conn)
    created = []
    for month in _months(first, last):
        name = reading_partition_name(month)
        if conn.scalar(text("SELECT to_regclass(:n)"), {"n": name}) is not None:
            continue
        # explicit +00: partition bounds must not depend on the session time zone
        lo, hi = f"{month.isoformat()} 00:00:00+00", f"{_next_month(month).isoformat()} 00:00:00+00"
        stray = conn.scalar(
            text(
                f"SELECT count(*) FROM {DEFAULT_PARTITION}"
                " WHERE reading_time >= CAST(:lo AS timestamptz)"
                " AND reading_time < CAST(:hi AS timestamptz)"
            ),
            {"lo": lo, "hi": hi},
        )
        if stray:
            raise PartitionConflict(
                f"{DEFAULT_PARTITION} holds {stray} readings in [{lo}, {hi}); move them out"
                f" before creating partition {name}"
            )
        conn.execute(
            text(
                f"CREATE TABLE {name} PARTITION OF {READINGS} FOR VALUES FROM ('{lo}') TO ('{hi}')"
            )
        )
        created.append(name)
    return created
