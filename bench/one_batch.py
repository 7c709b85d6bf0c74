"""One full batch of the default scenario: engine, assimilation, and the write path
against a raw binary COPY of the same rows into the same database, in one run.

    .venv/bin/python -m bench.one_batch [--rounds 3]

Uses AQUASIM_DATABASE_URL if set, else a throw-away embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

from pipeline.database import make_engine, persist_plan
from pipeline.farm import build_farm
from pipeline.planner import plan
from pipeline.scenario import load_scenario
from pipeline.services import EmbeddedPostgres, libpq_url
from schema.ddl import create_schema
from schema.models import BATCH_TABLES
from workers.assimilation import assimilate_rows
from workers.batch import compute_batch
from workers.engine import simulate
from workers.writer import _HEADER, _TRAILER, TableWriter, write_batch


class _Capture:
    """Stands in for a COPY: keeps the encoded bytes instead of sending them."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(bytes(data))


def _encoded(rows) -> dict[str, bytes]:
    out = {}
    for table in BATCH_TABLES:
        capture = _Capture()
        writer = TableWriter(None, table, 200_000)
        writer._copy, writer._copy_cm = capture, None  # noqa: SLF001 - bench only
        pieces = rows.readings() if table == "environmental_reading" else [rows.tables[table]]
        for piece in pieces:
            writer.write(piece)
        writer._flush()  # noqa: SLF001
        out[table] = _HEADER + b"".join(capture.parts) + _TRAILER
    return out


def _raw_copy(conn: psycopg.Connection, encoded: dict[str, bytes], columns) -> None:
    with conn.transaction(), conn.cursor() as cur:
        for table, data in encoded.items():
            names = sql.SQL(", ").join(map(sql.Identifier, columns[table]))
            query = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
                sql.Identifier(table), names
            )
            with cur.copy(query) as copy:
                copy.write(data)


def _clear(conn: psycopg.Connection, batch_id: int) -> None:
    with conn.transaction():
        for table in reversed(BATCH_TABLES):
            conn.execute(
                sql.SQL("DELETE FROM {} WHERE batch_id = %s").format(sql.Identifier(table)),
                (batch_id,),
            )
    conn.execute("VACUUM environmental_reading")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    scenario = load_scenario("scenarios/default.toml")
    farm = build_farm(scenario)
    the_plan = plan(scenario, farm)
    batch = max(  # the full lifecycle holding the most containers
        (b for b in the_plan.batches if (scenario.as_of_date - b.start_date).days > 1000),
        key=lambda b: (len(b.reservations), -b.batch_id),
    )

    engine_s, assim_s = [], []
    for _ in range(args.rounds):
        began = time.perf_counter()
        rows = simulate(batch, scenario, farm, the_plan.seed)
        engine_s.append(time.perf_counter() - began)
        began = time.perf_counter()
        assimilate_rows(rows, scenario.as_of_date)
        assim_s.append(time.perf_counter() - began)
    rows, _ = compute_batch(batch, scenario, farm, the_plan.seed)
    life = ((rows.end_date or scenario.as_of_date) - batch.start_date).days
    print(f"batch {batch.batch_id}: {rows.status} after {life} days, eggs {batch.eggs:,}")
    print(
        f"engine       median {statistics.median(engine_s):.3f} s  {[round(x, 3) for x in engine_s]}"  # noqa: E501
    )
    print(
        f"assimilation median {statistics.median(assim_s):.3f} s  {[round(x, 3) for x in assim_s]}"
    )

    url = os.environ.get("AQUASIM_DATABASE_URL")
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        if url is None:
            server = EmbeddedPostgres(Path(tmp))
            server.start()
            url = server.url
        try:
            _bench_write(url, scenario, farm, the_plan, rows, args.rounds)
        finally:
            if server is not None:
                server.stop()


def _bench_write(url, scenario, farm, the_plan, rows, rounds: int) -> None:
    engine = make_engine(url)
    create_schema(engine)
    persist_plan(engine, scenario, farm, the_plan)
    engine.dispose()
    from schema.models import COPY_COLUMNS

    encoded = _encoded(rows)
    total = rows.reading_count() + sum(
        len(next(iter(rows.tables[t].values()))) for t in BATCH_TABLES if t in rows.tables
    )
    results: dict[str, list[float]] = {"raw COPY": [], "writer": []}
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        for _ in range(rounds):
            _clear(conn, rows.batch_id)
            began = time.perf_counter()
            _raw_copy(conn, encoded, COPY_COLUMNS)
            results["raw COPY"].append(total / (time.perf_counter() - began))
            _clear(conn, rows.batch_id)
            conn.autocommit = False
            began = time.perf_counter()
            written = write_batch(conn, rows, replace=False)
            results["writer"].append(total / (time.perf_counter() - began))
            conn.autocommit = True
    print("rows per table: " + ", ".join(f"{t} {n:,}" for t, n in written.rows.items()))
    print(f"total rows {total:,}")
    for name, values in results.items():
        print(
            f"{name:9s} median {statistics.median(values):,.0f} rows/s  "
            f"{[round(v) for v in values]}"
        )
    ratio = statistics.median(results["writer"]) / statistics.median(results["raw COPY"])
    print(f"writer / raw COPY = {ratio:.0%}")


if __name__ == "__main__":
    main()
