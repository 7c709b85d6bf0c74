"""Reading one batch's recorded rows back as column arrays (for assimilation)."""

from __future__ import annotations

from datetime import UTC

import numpy as np
import psycopg

from workers.assimilation import STATE_COLUMNS, Columns

_QUERIES = {
    "assignment": (
        "SELECT id, batch_id, container_id, stage_id, start_date, end_date, tgc "
        "FROM assignment WHERE batch_id = %s"
    ),
    "transfer_action": (
        "SELECT id, batch_id, source_assignment_id, dest_assignment_id, transfer_date, "
        "fish_count, mean_weight_g, biomass_kg FROM transfer_action WHERE batch_id = %s"
    ),
    "mortality_event": (
        "SELECT assignment_id, event_date, fish_count, biomass_kg "
        "FROM mortality_event WHERE batch_id = %s"
    ),
    "harvest_event": (
        "SELECT assignment_id, harvest_date, fish_count, biomass_kg "
        "FROM harvest_event WHERE batch_id = %s"
    ),
    "feeding_event": (
        "SELECT assignment_id, fed_at, amount_kg FROM feeding_event WHERE batch_id = %s"
    ),
    "growth_sample": (
        "SELECT assignment_id, sample_date, fish_count, mean_weight_g, sd_weight_g "
        "FROM growth_sample WHERE batch_id = %s"
    ),
    "temperature": (
        "SELECT r.assignment_id, r.reading_time, r.value FROM environmental_reading r "
        "JOIN parameter p ON p.id = r.parameter_id "
        "WHERE r.batch_id = %s AND p.name = 'Temperature'"
    ),
    "daily_assignment_state": (
        f"SELECT {', '.join(STATE_COLUMNS)} FROM daily_assignment_state WHERE batch_id = %s"
    ),
}

_DATE_COLUMNS = {"start_date", "transfer_date", "event_date", "harvest_date", "sample_date",
                 "state_date"}  # fmt: skip
_TIME_COLUMNS = {"fed_at", "reading_time"}
_OBJECT_COLUMNS = {"end_date", "source_assignment_id"}


def _column(name: str, values: list) -> np.ndarray:
    if name in _OBJECT_COLUMNS:
        return np.array(values, dtype=object)
    if name in _DATE_COLUMNS:
        return np.array(values, dtype="datetime64[D]")
    if name in _TIME_COLUMNS:
        naive = [v.astimezone(UTC).replace(tzinfo=None) for v in values]
        return np.array(naive, dtype="datetime64[us]")
    if values and isinstance(values[0], float) or name in ("temperature_c", "fcr"):
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    return np.array(values, dtype=np.int64)


def read_table(conn: psycopg.Connection, name: str, batch_id: int) -> Columns:
    with conn.cursor() as cur:
        cur.execute(_QUERIES[name], (batch_id,))
        names = [d.name for d in cur.description or ()]
        rows = cur.fetchall()
    columns = list(zip(*rows, strict=True)) if rows else [[] for _ in names]
    return {n: _column(n, list(v)) for n, v in zip(names, columns, strict=True)}


def read_batch(conn: psycopg.Connection, batch_id: int) -> dict[str, Columns]:
    """Every input of assimilation, plus the stored daily state, for one batch."""
    return {name: read_table(conn, name, batch_id) for name in _QUERIES}
