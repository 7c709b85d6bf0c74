"""The Celery tasks: thin shells over `run_job`, the sweeper and the verification.

`simulate_batch(run_id, batch_id)` runs one batch job (`run_job`, a plain function
a test can call without Celery):

1. take the batch's advisory lock on a dedicated connection, held for the whole
   job; if another delivery holds it, back off (retry later) without touching
   the ledger;
2. claim the job in the ledger (queued → running, or take over a running job
   whose holder is gone — it no longer holds the lock);
3. load the run's scenario and the batch's plan (scenario and farm are cached
   per worker process), run engine → assimilation → writer, always replacing
   what an earlier attempt left, while a heartbeat renews the lease;
4. inside the writer's transaction, just before it commits, check the attempt
   token and mark the job succeeded, so rows and success commit together (the
   per-table checksums follow right after the commit: the writer computes them
   while writing and hands them over only on return);
5. on an error: a transient database or broker error is retried with backoff
   (the retry takes the job over); anything else fails the job with the
   error's last traceback line and is never retried (bad data stays bad).

Test hooks (documented, read per job from the worker's environment):
`AQUASIM_FAIL_BATCHES=3,7` makes those batches' jobs raise after claiming;
`AQUASIM_HOLD_BATCHES=2` makes those jobs pause `AQUASIM_HOLD_S` seconds
(default 3) with all rows written, just before the commit.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any

import kombu.exceptions
import psycopg
import redis
import sqlalchemy.exc
from celery import Task
from sqlalchemy import Engine

from pipeline import ledger
from pipeline.database import load_run, make_engine
from pipeline.services import EmbeddedPostgres, libpq_url
from pipeline.settings import Settings
from pipeline.sweeper import sweep as sweep_once
from workers.batch import BatchOutcome, compute_batch, load_job_inputs
from workers.celery_app import TASK_SIMULATE, TASK_SWEEP, TASK_VERIFY, Broker, app
from workers.signals import Heartbeat
from workers.writer import WriteResult, write_batch

logger = logging.getLogger("aquasim.worker")

BATCH_LOCK_CLASS = 0x61716A62  # advisory lock (class, batch_id): one delivery per batch
BUSY_RETRIES = 8  # back-offs while another delivery holds the batch, then leave it to the sweeper
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.DisconnectionError,
    redis.ConnectionError,
    redis.TimeoutError,
    kombu.exceptions.OperationalError,
    ConnectionError,
    TimeoutError,
)


class BatchBusy(Exception):
    """Another delivery of this batch holds its lock."""


class BatchFailed(Exception):
    """The job raised; the ledger has it as failed with the error."""


class InjectedFailure(RuntimeError):
    """Raised for batches named in AQUASIM_FAIL_BATCHES (a test hook)."""


@dataclass(frozen=True)
class JobResult:
    batch_id: int
    outcome: str  # succeeded | failed | skipped | stale
    rows: int = 0
    attempt: int = 0
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- the job, without Celery -------------------------------------------------------------


def run_job(
    engine: Engine,
    run_id: int,
    batch_id: int,
    *,
    worker: str,
    lease_s: float,
    max_attempts: int,
    chunk_rows: int = 200_000,
) -> JobResult:
    """One delivery of one batch job (see the module docstring). Raises BatchBusy when
    another delivery holds the batch, BatchFailed when the job failed (the ledger says
    so), and transient errors as they are (the ledger still says running)."""
    url = libpq_url(engine.url.render_as_string(hide_password=False))
    with psycopg.connect(
        url, autocommit=True, application_name=f"aquasim batch {batch_id}"
    ) as lock:
        got = lock.execute(
            "SELECT pg_try_advisory_lock(%s, %s)", (BATCH_LOCK_CLASS, batch_id)
        ).fetchone()
        if not (got and got[0]):
            raise BatchBusy(f"batch {batch_id} is being run by another delivery")
        result = ledger.claim(
            lock, run_id, batch_id, worker=worker, lease_s=lease_s, max_attempts=max_attempts
        )
        if result.claim is None:
            detail = "attempts exhausted" if result.exhausted else f"job is {result.state}"
            return JobResult(batch_id, "failed" if result.exhausted else "skipped", detail=detail)
        claim = result.claim
        try:
            with Heartbeat(
                functools.partial(ledger.renew_lease, lock, claim, lease_s),
                lease_s / 3,
                f"batch {batch_id}",
            ):
                outcome = _write(engine, url, claim, chunk_rows)
        except ledger.StaleAttempt as exc:
            return JobResult(batch_id, "stale", attempt=claim.attempts, detail=str(exc))
        except TRANSIENT_ERRORS:
            raise  # retried; the retry takes the job over (this lock goes with this connection)
        except Exception as exc:
            error = error_line(exc)
            ledger.fail(lock, claim, error)
            raise BatchFailed(f"batch {batch_id}: {error}") from exc
        return JobResult(batch_id, "succeeded", outcome.rows_written, claim.attempts)


def _write(engine: Engine, url: str, claim: ledger.Claim, chunk_rows: int) -> BatchOutcome:
    """Engine → assimilation → writer, marking the job succeeded inside the write's
    transaction (after the token check), so rows and success commit together."""
    batch_id = claim.batch_id
    if batch_id in _env_batches("AQUASIM_FAIL_BATCHES"):
        raise InjectedFailure(f"batch {batch_id} failed on purpose (AQUASIM_FAIL_BATCHES)")
    inputs = load_job_inputs(engine, batch_id)
    rows, seconds = compute_batch(inputs.batch, inputs.scenario, inputs.farm, inputs.run_seed)

    def before_commit(conn: psycopg.Connection, written: WriteResult) -> None:
        if batch_id in _env_batches("AQUASIM_HOLD_BATCHES"):
            time.sleep(float(os.environ.get("AQUASIM_HOLD_S", "3")))
        ledger.succeed(
            conn, claim, rows_written=written.total_rows, rows_per_table=written.rows,
            checksum=written.checksum, checksums=written.checksums,
            timings={**seconds, "write": time.perf_counter() - began},
        )  # fmt: skip

    began = time.perf_counter()
    with psycopg.connect(url, application_name=f"aquasim batch {batch_id} writer") as conn:
        written = write_batch(
            conn, rows, replace=True, chunk_rows=chunk_rows, before_commit=before_commit
        )
    seconds["write"] = time.perf_counter() - began
    return BatchOutcome(rows, written, seconds)


def error_line(exc: BaseException) -> str:
    """The last line of the exception's traceback, e.g. `ValueError: bad weight`."""
    return "".join(traceback.format_exception_only(exc)).strip().splitlines()[-1]


def _env_batches(name: str) -> set[int]:
    return {int(p) for p in os.environ.get(name, "").replace(" ", "").split(",") if p.isdigit()}


# ---- per worker process ------------------------------------------------------------------


@functools.cache
def _settings() -> Settings:
    return Settings()


_engines: dict[int, Engine] = {}  # pid → engine: never reuse a parent's pool after fork


def worker_engine() -> Engine:
    engine = _engines.get(os.getpid())
    if engine is None:
        settings = _settings()
        url = settings.database_url
        if url is None:
            embedded = EmbeddedPostgres(settings.data_dir)
            if not embedded.running:
                raise LookupError(
                    "no database: set AQUASIM_DATABASE_URL (or start the embedded one: aquasim up)"
                )
            url = embedded.url
        engine = _engines[os.getpid()] = make_engine(url)
    return engine


# ---- the tasks -----------------------------------------------------------------------------


@app.task(
    bind=True,
    name=TASK_SIMULATE,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=TRANSIENT_ERRORS,
    retry_backoff=2,
    retry_backoff_max=120,
    retry_jitter=True,
    max_retries=8,
    throws=(BatchFailed,),
)
def simulate_batch(self: Task, run_id: int, batch_id: int) -> dict[str, Any]:
    """One batch job; see the module docstring."""
    settings = _settings()
    try:
        result = run_job(
            worker_engine(), run_id, batch_id,
            worker=f"{self.request.hostname}[{os.getpid()}]",
            lease_s=settings.lease_s, max_attempts=settings.max_attempts,
            chunk_rows=settings.copy_chunk_rows,
        )  # fmt: skip
    except BatchBusy as exc:
        if self.request.retries >= BUSY_RETRIES:
            return JobResult(batch_id, "skipped", detail=f"{exc}; left to the sweeper").as_dict()
        logger.info("%s; backing off", exc)
        raise self.retry(
            exc=exc, countdown=min(2**self.request.retries, 30), max_retries=BUSY_RETRIES
        ) from None
    return result.as_dict()


@app.task(name=TASK_SWEEP, ignore_result=True)
def sweep() -> dict[str, Any]:
    """Beat's sweeper pass over the database's run (see pipeline.sweeper)."""
    settings = _settings()
    engine = worker_engine()
    record = load_run(engine)
    if record is None:
        return {"skipped": "no run"}
    broker = Broker(str(app.conf.broker_url), settings.queue)
    report = sweep_once(engine, broker, record.id, settings.max_attempts)
    if report.changed:
        logger.warning("sweep of run %s: %s", record.id, report.describe())
    return asdict(report)


@app.task(name=TASK_VERIFY, ignore_result=True)
def verify_run() -> Any:
    """Scheduled verification of the succeeded batches (pipeline.verify stores the rows)."""
    try:
        from pipeline.verify import run_verification
    except ImportError as exc:
        logger.info("verification skipped: %s", exc)
        return {"skipped": str(exc)}
    engine = worker_engine()
    if load_run(engine) is None:
        return {"skipped": "no run"}
    result = run_verification(engine, scheduled=True)
    return repr(result)[:1000]
