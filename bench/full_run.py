"""The full default run end to end, in embedded mode, as a user runs it.

    .venv/bin/python -m bench.full_run [--scenario scenarios/default.toml] [--workers 2]

Runs `aquasim run` in a fresh data directory and reports: wall time per phase
(from the run's own summary), the jobs' engine / assimilation / write time, rows
per table, rows/s, peak memory per worker process, each check's time, and — in
the same run, on the same database — the raw binary COPY ceiling for the same
rows: a sample of batches is read back with COPY TO, deleted, and copied in again
by as many parallel connections as there were workers (the data ends identical).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import psycopg
from psycopg import sql

from pipeline.services import EmbeddedServices, libpq_url
from schema.models import BATCH_TABLES, COPY_COLUMNS

ROOT = Path(__file__).resolve().parent.parent


class ProcessSampler(threading.Thread):
    """Peak resident memory of the celery worker processes, and the CPU time of the
    workers and of PostgreSQL (server processes, reaped children included: a writer's
    backend lives only as long as its job), sampled every half second."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak: dict[int, tuple[str, int]] = {}
        self.series: list[tuple[float, float, float]] = []  # (time, worker cpu, postgres cpu)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            totals = {"worker": 0.0, "postgres": 0.0}
            for proc in psutil.process_iter(["pid", "ppid", "name", "cmdline", "memory_info"]):
                kind = _kind(proc.info)
                if kind is None:
                    continue
                group = "postgres" if kind == "postgres" else "worker"
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    totals[group] += times.user + times.system
                    if _is_root(proc):  # children it has reaped
                        totals[group] += times.children_user + times.children_system
                if group == "worker" and proc.info["memory_info"]:
                    rss = proc.info["memory_info"].rss
                    if rss > self.peak.get(proc.info["pid"], ("", 0))[1]:
                        self.peak[proc.info["pid"]] = (kind, rss)
            self.series.append((time.time(), totals["worker"], totals["postgres"]))

    def cores_busy(self, since: float, until: float) -> tuple[float, float]:
        """Average cores used by the workers and by PostgreSQL between two epoch times."""
        inside = [x for x in self.series if since <= x[0] <= until]
        if len(inside) < 2:
            return 0.0, 0.0
        (t0, w0, p0), (t1, w1, p1) = inside[0], inside[-1]
        return (w1 - w0) / (t1 - t0), (p1 - p0) / (t1 - t0)


def _is_root(proc: psutil.Process) -> bool:
    try:
        parent = proc.parent()
    except psutil.Error:
        return False
    return parent is None or _kind({"name": parent.name(), "cmdline": parent.cmdline()}) is None


def _kind(info: dict) -> str | None:
    if info["name"] == "postgres":
        return "postgres"
    cmd = " ".join(info["cmdline"] or ())
    if "celery" in cmd and " worker" in cmd:
        name = re.search(r"-n (\S+)", cmd)
        return name.group(1) if name else "worker"
    return None


def run_aquasim(scenario: str, workers: int, env: dict[str, str], *extra: str) -> tuple[float, str]:
    sampler = ProcessSampler()
    sampler.start()
    began = time.perf_counter()
    done = subprocess.run(
        [str(ROOT / ".venv/bin/aquasim"), "run", "--scenario", scenario, "--workers", str(workers),
         *extra],
        env=env, cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - began
    sampler.stop.set()
    sampler.join()
    output = done.stdout + done.stderr
    if done.returncode != 0:
        print(output[-3000:])
        sys.exit(f"aquasim run failed with exit code {done.returncode}")
    global SAMPLER
    SAMPLER = sampler
    return wall, output


SAMPLER = ProcessSampler()


def _dump(conn: psycopg.Connection, table: str, batch_id: int) -> bytes:
    cols = sql.SQL(", ").join(map(sql.Identifier, COPY_COLUMNS[table]))
    query = sql.SQL(
        "COPY (SELECT {} FROM {} WHERE batch_id = {}) TO STDOUT (FORMAT BINARY)"
    ).format(cols, sql.Identifier(table), sql.Literal(batch_id))
    with conn.cursor() as cur, cur.copy(query) as copy:
        return b"".join(bytes(part) for part in copy)


def _reload(url: str, batch_id: int, dumps: dict[str, bytes]) -> float:
    """Delete one batch's rows and COPY the very same rows back; seconds of the COPYs."""
    with psycopg.connect(url) as conn:
        with conn.transaction():
            for table in reversed(BATCH_TABLES):
                conn.execute(
                    sql.SQL("DELETE FROM {} WHERE batch_id = %s").format(sql.Identifier(table)),
                    (batch_id,),
                )
        began = time.perf_counter()
        with conn.transaction(), conn.cursor() as cur:
            for table in BATCH_TABLES:
                cols = sql.SQL(", ").join(map(sql.Identifier, COPY_COLUMNS[table]))
                query = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
                    sql.Identifier(table), cols
                )
                with cur.copy(query) as copy:
                    copy.write(dumps[table])
        return time.perf_counter() - began


def copy_ceiling(url: str, batch_ids: list[int], workers: int) -> tuple[int, float]:
    """Rows and wall seconds to COPY the sample's rows back with `workers` connections."""
    with psycopg.connect(url) as conn:
        dumps = {b: {t: _dump(conn, t, b) for t in BATCH_TABLES} for b in batch_ids}
        rows = conn.execute(
            "SELECT sum(rows_written) FROM batch_job WHERE batch_id = ANY(%s)", (batch_ids,)
        ).fetchone()[0]
    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(lambda b: _reload(url, b, dumps[b]), batch_ids))
    return int(rows), time.perf_counter() - began


def report(url: str, wall: float, output: str, workers: int, ceiling_sample: int) -> None:
    phases = re.search(r"phases: ([^\n]+)", output)
    print(f"aquasim run wall time: {wall:.1f} s")
    print(f"phases (from the run's summary): {phases.group(1) if phases else '?'}")
    with psycopg.connect(url) as conn:
        jobs = conn.execute(
            "SELECT count(*), sum(rows_written), "
            "sum((timings->>'engine')::float), sum((timings->>'assimilation')::float), "
            "sum((timings->>'write')::float), min(started_at), max(finished_at) "
            "FROM batch_job WHERE state = 'succeeded'"
        ).fetchone()
        n, rows, engine_s, assim_s, write_s, first, last = jobs
        rows = int(rows)
        span = (last - first).total_seconds()
        print(
            f"jobs: {n} batches, {rows:,} rows in {span:.1f} s of jobs = {rows / span:,.0f} rows/s"
        )
        print(
            f"job time summed over workers: engine {engine_s:.1f} s, "
            f"assimilation {assim_s:.1f} s, write {write_s:.1f} s "
            f"(write path alone: {rows / write_s * workers:,.0f} rows/s with {workers} writers)"
        )
        per_table = conn.execute(
            "SELECT key, sum(value::bigint) FROM batch_job, jsonb_each_text(rows_per_table) "
            "GROUP BY key ORDER BY 2 DESC"
        ).fetchall()
        print("rows per table: " + ", ".join(f"{t} {c:,}" for t, c in per_table))
        checks = conn.execute(
            "SELECT invariant, elapsed_s, passed FROM verification_result "
            "WHERE checked_at = (SELECT max(checked_at) FROM verification_result) ORDER BY id"
        ).fetchall()
        print("checks: " + ", ".join(f"{i} {s:.1f}s{'' if p else ' FAILED'}" for i, s, p in checks))
        sample = [
            r[0]
            for r in conn.execute(
                "SELECT batch_id FROM batch_job WHERE state = 'succeeded' ORDER BY batch_id"
            ).fetchall()
        ]
    for pid, (label, rss) in sorted(SAMPLER.peak.items()):
        print(f"peak memory {label} (pid {pid}): {rss / 2**20:.0f} MiB")
    step = max(1, len(sample) // ceiling_sample)
    chosen = sample[::step][:ceiling_sample]
    ceiling_rows, ceiling_s = copy_ceiling(url, chosen, workers)
    ceiling = ceiling_rows / ceiling_s
    end_to_end = rows / span
    print(
        f"raw COPY ceiling, same database, {workers} connections, {len(chosen)} batches: "
        f"{ceiling_rows:,} rows in {ceiling_s:.1f} s = {ceiling:,.0f} rows/s"
    )
    print(f"run throughput / COPY ceiling = {end_to_end / ceiling:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", default="scenarios/default.toml")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--ceiling-batches", type=int, default=12)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--skip-run", action="store_true", help="report on --data-dir only")
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="aquasim-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AQUASIM_")}
    env["AQUASIM_DATA_DIR"] = str(data_dir)
    wall, output = (0.0, "") if args.skip_run else run_aquasim(args.scenario, args.workers, env)
    services = EmbeddedServices(data_dir)
    services.start()
    try:
        report(libpq_url(services.database_url), wall, output, args.workers, args.ceiling_batches)
    finally:
        services.stop()
    print(f"data directory: {data_dir} (`AQUASIM_DATA_DIR={data_dir} aquasim up` serves it)")


if __name__ == "__main__":
    main()
