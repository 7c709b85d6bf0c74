"""`aquasim run`: the overnight job — prepare, plan once, enqueue, work, verify, summarise.

1. Take the coordinator lock (a session advisory lock held for the whole command):
   a second `aquasim run` on the same database refuses with one line, exit 2.
2. `--reset` drops the dataset; plan once (`ensure_planned` refuses another
   scenario, seed or batch count than the stored plan).
3. Enqueue: every planned job is sent; queued jobs the broker no longer holds are
   sent again (a resumed run). Running jobs are left to their workers (their lease
   says whether they are alive), succeeded ones are never redone, and failed ones
   stay failed until `aquasim requeue` (the summary says so and the exit code is 1).
4. Start `--workers` local `celery worker` processes (default one per core; 0 = wait
   for workers started elsewhere) and show progress until no job is planned,
   queued or running; meanwhile run the sweeper every few seconds, so lost workers
   and a lost queue are recovered even where no beat runs.
5. Stop the local workers, run the verification (when `pipeline.verify` exists),
   print the summary. Exit 1 when a job failed or the verification did.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated

import kombu.exceptions
import psycopg
import redis
import sqlalchemy.exc
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from sqlalchemy import Engine

from pipeline import ledger
from pipeline.cli._app import (
    Application,
    BatchesOption,
    ScenarioOption,
    SeedOption,
    UserError,
    app,
    mask,
)
from pipeline.cli.plan import ensure_planned
from pipeline.services import check_reachable, hide_password, libpq_url
from pipeline.sweeper import SweepReport, sweep
from schema.ddl import drop_schema
from workers.celery_app import Broker

COORDINATOR_LOCK_KEY = 0x61717561_636F6F72  # 'aqua' 'coor': one `aquasim run` per database
POLL_S = 0.5
SWEEP_EVERY_S = 5.0
WORKER_STOP_TIMEOUT_S = 60.0  # a warm shutdown lets a running batch finish
WORKER_RESTARTS = 3  # a local worker that keeps dying aborts the run
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    sqlalchemy.exc.OperationalError,
    redis.RedisError,
    kombu.exceptions.OperationalError,
    OSError,
)


# ---- the coordinator lock ------------------------------------------------------------------


@contextlib.contextmanager
def coordinator_lock(engine: Engine) -> Iterator[None]:
    """Hold the database's coordinator lock for the block, or refuse (UserError)."""
    url = libpq_url(engine.url.render_as_string(hide_password=False))
    with psycopg.connect(url, autocommit=True, application_name="aquasim run") as conn:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (COORDINATOR_LOCK_KEY,)).fetchone()
        if not (row and row[0]):
            raise UserError(
                f"another `aquasim run` is already running on {mask(engine.url)}"
                f"{_holder(conn)}; wait for it to finish (`aquasim status` shows its progress)"
            )
        yield  # the lock goes with the connection


def _holder(conn: psycopg.Connection) -> str:
    row = conn.execute(
        "SELECT a.backend_start, a.client_addr, a.pid FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
        "AND l.granted AND l.classid = %s AND l.objid = %s AND l.objsubid = 1",
        (COORDINATOR_LOCK_KEY >> 32, COORDINATOR_LOCK_KEY & 0xFFFFFFFF),
    ).fetchone()
    if row is None:
        return ""
    started, client, pid = row
    where = f" from {client}" if client else ""
    return f" (since {started:%Y-%m-%d %H:%M:%S}{where}, server pid {pid})"


# ---- local worker processes ----------------------------------------------------------------


def worker_command(index: int) -> list[str]:
    """The argv of local worker `index`: one prefork process, a name unique on this host."""
    return [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
        "--concurrency", "1", "--pool", "prefork", "--loglevel", "INFO",
        "-n", f"aquasim-{index}.{os.getpid()}@%h", "--without-mingle", "--without-gossip",
    ]  # fmt: skip


@dataclass
class LocalWorker:
    index: int
    log_path: Path
    process: subprocess.Popen | None = None
    restarts: int = 0
    _log: IO[bytes] | None = field(default=None, repr=False)


class LocalWorkers:
    """N `celery worker` subprocesses, each in its own process group, logging to files."""

    def __init__(self, count: int, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.workers = [LocalWorker(i, log_dir / f"worker-{i}.log") for i in range(1, count + 1)]

    def __enter__(self) -> LocalWorkers:
        if self.workers:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        for worker in self.workers:
            self._start(worker)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self, worker: LocalWorker) -> None:
        if worker._log is None:
            worker._log = worker.log_path.open("ab")
        worker.process = subprocess.Popen(
            worker_command(worker.index),
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=worker._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the coordinator only; it stops them
        )

    def check(self) -> list[str]:
        """Restart local workers that exited; lines to report. UserError when one keeps dying."""
        notes = []
        for worker in self.workers:
            if worker.process is None or worker.process.poll() is None:
                continue
            code = worker.process.returncode
            if worker.restarts >= WORKER_RESTARTS:
                raise UserError(
                    f"local worker {worker.index} exited (code {code}) {worker.restarts + 1} "
                    f"times; see {worker.log_path}"
                )
            worker.restarts += 1
            notes.append(f"local worker {worker.index} exited (code {code}); restarted")
            self._start(worker)
        return notes

    def stop(self, *, idle: bool = False) -> None:
        """Stop every worker: SIGTERM (warm shutdown: a running batch finishes) or, when
        `idle` (no job left to run), SIGQUIT (immediate); then SIGKILL what remains."""
        running = [w for w in self.workers if w.process is not None and w.process.poll() is None]
        for worker in running:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGQUIT if idle else signal.SIGTERM)
        deadline = time.monotonic() + WORKER_STOP_TIMEOUT_S
        for worker in running:
            try:
                worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.process.pid, signal.SIGKILL)
                worker.process.wait()
        for worker in self.workers:
            if worker._log is not None:
                worker._log.close()
                worker._log = None


# ---- the command ---------------------------------------------------------------------------


@dataclass
class Phases:
    seconds: dict[str, float] = field(default_factory=dict)
    _began: float = field(default_factory=time.perf_counter)

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._began
        self._began = now

    def describe(self) -> str:
        parts = [f"{name} {s:.1f} s" for name, s in self.seconds.items()]
        return " · ".join(parts + [f"total {sum(self.seconds.values()):.1f} s"])


@app.command()
def run(
    ctx: typer.Context,
    scenario: ScenarioOption = None,
    seed: SeedOption = None,
    batches: BatchesOption = None,
    worker_count: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=0,
            max=512,
            metavar="N",
            help="Local worker processes (default: AQUASIM_WORKERS, else one per core; "
            "0 = wait for workers started elsewhere).",
        ),
    ] = None,
    reset: Annotated[bool, typer.Option("--reset", help="Wipe the dataset first.")] = False,
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            dir_okay=False,
            metavar="FILE",
            help="HTML report to write at the end (default: <data dir>/report.html).",
        ),
    ] = None,
    no_report: Annotated[bool, typer.Option("--no-report", help="Write no report.")] = False,
) -> None:
    """The overnight job: plan once, generate every batch not yet done, verify, summarise."""
    application = Application.of(ctx, scenario=scenario, seed=seed)
    application.scenario  # noqa: B018 - a bad scenario fails before anything is written
    settings = application.settings
    n_workers = settings.workers if worker_count is None else worker_count
    out = application.out
    phases = Phases()
    with application.urls() as (database_url, broker_url):
        check_reachable(database_url, broker_url)
        with application.database() as engine, coordinator_lock(engine):
            if reset:
                drop_schema(engine)
            planned = ensure_planned(application, engine, batches)
            run_id = planned.run_id
            broker = Broker(broker_url, settings.queue)
            start = ledger.counts(engine, run_id)
            ledger.set_run_status(engine, run_id, "running")
            broker.publish(run_id, ledger.enqueue(engine, run_id))
            sweep(engine, broker, run_id, settings.max_attempts, all_queued=True)
            phases.lap("prepare")

            if ledger.counts(engine, run_id).open:
                env = {
                    **os.environ,
                    "AQUASIM_DATABASE_URL": database_url,
                    "AQUASIM_BROKER_URL": broker_url,
                    "AQUASIM_QUEUE": settings.queue,
                    "AQUASIM_DATA_DIR": str(settings.data_dir.resolve()),
                }
                log_dir = settings.data_dir / "logs"
                where = (
                    f"{n_workers} local worker{'s' * (n_workers != 1)} (logs in {log_dir}/)"
                    if n_workers
                    else "workers started elsewhere"
                )
                out.print(
                    Text(
                        f"Run {run_id}: {planned.batches} batches; waiting for {where} on "
                        f"queue {settings.queue!r} at {hide_password(broker_url)}"
                    ),
                    soft_wrap=True,
                )
                try:
                    with _stop_signals_interrupt(), LocalWorkers(n_workers, env, log_dir) as local:
                        _wait(out, engine, broker, run_id, settings.max_attempts, start, local)
                        local.stop(idle=True)
                except KeyboardInterrupt:
                    ledger.set_run_status(engine, run_id, "interrupted")
                    out.print("interrupted: `aquasim run` again resumes where this one stopped")
                    raise typer.Exit(130) from None
            phases.lap("generate")

            end = ledger.counts(engine, run_id)
            failures = ledger.failures(engine, run_id)
            ledger.set_run_status(engine, run_id, "failed" if failures else "succeeded")
            verified = _verify(out, engine)
            phases.lap("verify")
            if not no_report:
                _report(out, engine, report or settings.data_dir / "report.html")

    _summary(out, planned.batches, start, end, failures, verified, phases)
    if failures or verified is False:
        raise typer.Exit(1)


def _report(out: Console, engine: Engine, path: Path) -> None:
    """The HTML report, after the timed phases; a failure to plot never fails the run."""
    from pipeline.report import write_report

    try:
        with psycopg.connect(libpq_url(engine.url.render_as_string(False))) as conn:
            summary = write_report(conn, path)
    except Exception as exc:  # noqa: BLE001 - the data is written and verified already
        out.print(Text(f"report not written: {exc}"))
        return
    out.print(Text(f"report: {summary.path} ({summary.bytes / 1e6:.1f} MB)"), soft_wrap=True)


@contextlib.contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP act like Ctrl-C for the block (the local workers get stopped)."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers
        return
    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _wait(
    out: Console,
    engine: Engine,
    broker: Broker,
    run_id: int,
    max_attempts: int,
    start: ledger.Counts,
    local: LocalWorkers,
) -> None:
    """Show progress until no job is open; sweep every few seconds."""
    columns = (
        TextColumn("batches"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed · {task.fields[running]} running"),
        TextColumn("{task.fields[rows]:,} rows · {task.fields[rate]:,.0f} rows/s"),
        TimeRemainingColumn(),
    )
    began = time.perf_counter()
    next_sweep = began + SWEEP_EVERY_S
    outage: str | None = None
    with Progress(*columns, console=out) as progress:
        done0 = start["succeeded"] + start["failed"]
        task = progress.add_task(
            "batches", total=start.total, completed=done0, failed=start["failed"], running=0,
            rows=0, rate=0.0,
        )  # fmt: skip
        while True:
            try:
                counts = ledger.counts(engine, run_id)
                if time.perf_counter() >= next_sweep:
                    report: SweepReport = sweep(engine, broker, run_id, max_attempts)
                    next_sweep = time.perf_counter() + SWEEP_EVERY_S
                    if report.changed:
                        progress.console.print(Text(f"sweeper: {report.describe()}"))
                if outage is not None:
                    progress.console.print("connection back; carrying on")
                    outage = None
            except OUTAGE_ERRORS as exc:
                if outage is None:
                    outage = " ".join(str(exc).split())[:200]
                    progress.console.print(Text(f"server unreachable, retrying: {outage}"))
                next_sweep = time.perf_counter() + SWEEP_EVERY_S
                time.sleep(POLL_S)
                continue
            rows = counts.rows_written - start.rows_written
            progress.update(
                task,
                completed=counts["succeeded"] + counts["failed"],
                failed=counts["failed"],
                running=counts["running"],
                rows=rows,
                rate=rows / max(time.perf_counter() - began, 1e-9),
            )
            if not counts.open:
                return
            for note in local.check():
                progress.console.print(note)
            time.sleep(POLL_S)


def _verify(out: Console, engine: Engine) -> bool | None:
    """Run the verification if this build has it; whether it passed (None: not run)."""
    try:
        from pipeline.cli.verify import print_report
        from pipeline.verify import run_verification
    except ImportError as exc:
        out.print(f"verification skipped: {exc}")
        return None
    report = run_verification(engine, scheduled=False)
    print_report(out, report)
    return report.passed


def _summary(
    out: Console,
    planned: int,
    start: ledger.Counts,
    end: ledger.Counts,
    failures: list[ledger.Failure],
    verified: bool | None,
    phases: Phases,
) -> None:
    generated = end["succeeded"] - start["succeeded"]
    rows = end.rows_written - start.rows_written
    seconds = phases.seconds.get("generate", 0.0)
    rate = rows / seconds if seconds > 0 else 0.0
    lines = [
        f"{planned} batches planned, {generated} generated now, {len(failures)} failed; "
        f"{rows:,} rows in {seconds:.1f} s ({rate:,.0f} rows/s); "
        f"{end['succeeded']} of {end.total} batches done, {end.rows_written:,} rows in all",
        f"phases: {phases.describe()}",
    ]
    for failure in failures:
        lines.append(
            f"batch {failure.batch_id} failed (attempt {failure.attempts}): {failure.error}"
        )
    if failures:
        lines.append("re-run them with `aquasim requeue`, then `aquasim run` (or running workers)")
    if verified is False:
        lines.append("verification FAILED: see the table above")
    for line in lines:
        out.print(Text(line), soft_wrap=True)
