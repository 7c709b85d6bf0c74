"""Rows/s with 1 and 2 workers on the same subset of batches, and where the time goes.

    .venv/bin/python -m bench.scaling [--batches 40] [--workers 1,2] [--scenario F]

Each worker count runs `aquasim run` on a fresh embedded data directory and reports
the jobs' rows/s, peak memory per worker process, and the CPU seconds spent by the
workers (engine, assimilation, encoding) against those of the PostgreSQL server
(COPY parsing, index maintenance, WAL): whichever is busier than its share of the
machine's cores is the bottleneck.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import psutil
import psycopg

from bench import full_run
from pipeline.services import EmbeddedServices, libpq_url


def one(scenario: str, batches: int, workers: int) -> dict[str, float]:
    data_dir = Path(tempfile.mkdtemp(prefix=f"aquasim-scale{workers}-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AQUASIM_")}
    env["AQUASIM_DATA_DIR"] = str(data_dir)
    full_run.run_aquasim(scenario, workers, env, "--batches", str(batches))
    sampler = full_run.SAMPLER
    services = EmbeddedServices(data_dir)
    services.start()
    try:
        with psycopg.connect(libpq_url(services.database_url)) as conn:
            rows, first, last, engine_s, write_s = conn.execute(
                "SELECT sum(rows_written), min(started_at), max(finished_at), "
                "sum((timings->>'engine')::float + (timings->>'assimilation')::float), "
                "sum((timings->>'write')::float) FROM batch_job WHERE state = 'succeeded'"
            ).fetchone()
    finally:
        services.stop()
    span = (last - first).total_seconds()
    busy_workers, busy_pg = sampler.cores_busy(first.timestamp(), last.timestamp())
    worker_peak = max((rss for _, rss in sampler.peak.values()), default=0)
    return {
        "workers": workers,
        "rows": int(rows),
        "seconds": span,
        "rows_per_s": int(rows) / span,
        "engine_s": engine_s,
        "write_s": write_s,
        "busy_workers": busy_workers,
        "busy_pg": busy_pg,
        "peak_worker_mib": worker_peak / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", default="scenarios/default.toml")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args()
    cores = psutil.cpu_count() or 1
    results = [one(args.scenario, args.batches, int(w)) for w in args.workers.split(",")]
    base = results[0]["rows_per_s"]
    for r in results:
        busy_pg, busy_workers = r["busy_pg"], r["busy_workers"]
        print(
            f"{r['workers']} worker(s): {r['rows']:,} rows in {r['seconds']:.1f} s = "
            f"{r['rows_per_s']:,.0f} rows/s ({r['rows_per_s'] / base:.2f}x); "
            f"cores busy: workers {busy_workers:.2f}, PostgreSQL {busy_pg:.2f} of {cores}; "
            f"job time: engine+assimilation {r['engine_s']:.1f} s, write {r['write_s']:.1f} s; "
            f"peak worker memory {r['peak_worker_mib']:.0f} MiB"
        )
    last = results[-1]
    total = last["busy_workers"] + last["busy_pg"]
    verdict = (
        "the machine's cores (CPU-bound: add cores or a separate database server)"
        if total > 0.85 * cores
        else "PostgreSQL (one backend per writer)"
        if last["busy_pg"] > last["busy_workers"]
        else "the workers' engine"
    )
    print(f"bottleneck with {last['workers']} workers: {verdict}")


if __name__ == "__main__":
    main()
