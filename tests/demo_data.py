"""Shared test data: scratch databases and the demo dataset written as a run would."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterable, Iterator

import psycopg

from pipeline.database import make_engine, persist_plan
from pipeline.farm import build_farm
from pipeline.planner import plan
from pipeline.scenario import load_scenario
from schema import create_schema
from tests.conftest import ROOT, _admin_url
from workers.batch import run_batch


@contextlib.contextmanager
def scratch_database(server_url: str, prefix: str, template: str | None = None) -> Iterator[str]:
    """A new database on the server (optionally a copy of `template`), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = _admin_url(server_url, "postgres")
    copy = f' TEMPLATE "{template}"' if template else ""
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{copy}')
    try:
        yield _admin_url(server_url, name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def build_demo(url: str, batch_ids: Iterable[int] | None = None) -> None:
    """The demo plan in the (empty) database at `url`, and its batches (all, or those
    named) generated in-process with the ledger filled as `aquasim run` fills it."""
    scenario = load_scenario(ROOT / "scenarios" / "demo.toml")
    farm = build_farm(scenario)
    the_plan = plan(scenario, farm)
    engine = make_engine(url)
    try:
        create_schema(engine)
        run_id = persist_plan(engine, scenario, farm, the_plan)
    finally:
        engine.dispose()
    wanted = set(batch_ids) if batch_ids is not None else None
    with psycopg.connect(url) as conn:
        for batch in the_plan.batches:
            if wanted is not None and batch.batch_id not in wanted:
                continue
            key = {"run": run_id, "batch": batch.batch_id}
            conn.execute(
                "UPDATE batch_job SET state = 'running', started_at = clock_timestamp(), "
                "attempts = attempts + 1 WHERE run_id = %(run)s AND batch_id = %(batch)s",
                key,
            )
            conn.commit()
            outcome = run_batch(conn, batch, scenario, farm, the_plan.seed, replace=False)
            conn.execute(
                "UPDATE batch_job SET state = 'succeeded', finished_at = clock_timestamp(), "
                "rows_written = %(rows)s, rows_per_table = %(per)s, checksum = %(sum)s, "
                "checksums = %(sums)s, timings = %(timings)s, worker = 'test' "
                "WHERE run_id = %(run)s AND batch_id = %(batch)s",
                {
                    **key,
                    "rows": outcome.rows_written,
                    "per": json.dumps(outcome.written.rows),
                    "sum": outcome.written.checksum,
                    "sums": json.dumps(outcome.written.checksums),
                    "timings": json.dumps(outcome.seconds),
                },
            )
            conn.commit()
