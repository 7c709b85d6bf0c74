"""The verification task: every invariant I-1 … I-20 over the stored rows, stored in
`verification_result`, with the realism figures of farm-model.md §6.

Which batches are checked: those whose job has succeeded, in both modes — a batch
whose job never ran (or failed, or is running) has no complete rows to check. The
rows of such batches are not ignored, though: I-19 reports any row of a batch
without a succeeded job as an orphan (in scheduled mode a queued or running job's
batch may still hold an earlier attempt's rows).

- `scheduled=True` (celery beat, mid-run): the run-wide checks (I-5, I-16) are
  skipped until every job of the run has finished (succeeded or failed).
- `scheduled=False` (`aquasim verify`, the end of `aquasim run`): every check runs.

All checks read one snapshot (one REPEATABLE READ transaction, `work_mem` raised
for the big aggregates), and the results are inserted in that same transaction,
one `verification_result` row per invariant.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import IsolationLevel
from psycopg.types.json import Jsonb
from sqlalchemy import Engine

from pipeline.checks import (
    DETERMINISM_SAMPLE,
    IDEMPOTENCE_SAMPLE,
    INVARIANTS,
    CheckResult,
    check_I_18,
    check_I_19,
    plausibility_result,
    run_context,
)
from pipeline.realism import RealismFigure, realism_figures
from pipeline.services import libpq_url

WORK_MEM = "256MB"  # the I-15 aggregate spills at 64 MB on the full run
RUN_WIDE = ("I-5", "I-16")  # wait, when scheduled, until the run has finished
FINISHED = ("succeeded", "failed")

# One line per invariant (invariants.md).
DESCRIPTIONS: dict[str, str] = {
    "I-1": "Container exclusivity",
    "I-2": "Plan fidelity",
    "I-3": "Geography",
    "I-4": "Lifecycle order",
    "I-5": "No orphan batch",
    "I-6": "Exactly one assignment per row",
    "I-7": "Denormalised keys agree",
    "I-8": "Population conservation per assignment-day",
    "I-9": "Conservation at transfers",
    "I-10": "No doubling",
    "I-11": "Opening state from records",
    "I-12": "Each fish counted once a day",
    "I-13": "Weight continuity",
    "I-14": "Complete daily state",
    "I-15": "Sensor coverage",
    "I-16": "Terminal consistency",
    "I-17": "No future rows",
    "I-18": "Determinism (re-simulated sample)",
    "I-19": "Idempotent jobs (stored checksums, no orphans)",
    "I-20": "Plausibility (realism bands)",
}


class NoRun(LookupError):
    """The database holds no planned run."""


@dataclass(frozen=True)
class VerificationReport:
    run_id: int
    scheduled: bool
    results: list[CheckResult]
    realism: list[RealismFigure]  # empty when I-20 was not asked for
    batches_checked: list[int]  # succeeded jobs
    jobs: dict[str, int]  # batch_job rows of the run per state
    skipped: dict[str, str] = field(default_factory=dict)  # invariant → why not checked
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """Every invariant checked holds (skipped ones are not failures)."""
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[str]:
        return [r.invariant for r in self.results if not r.passed]

    @property
    def batches_unchecked(self) -> int:
        return sum(self.jobs.values()) - len(self.batches_checked)


def normalise(name: str) -> str:
    """'I-8', 'i-8', 'I8' and '8' all name I-8; unknown names raise KeyError."""
    text = name.strip().upper().removeprefix("I").removeprefix("-")
    key = f"I-{text}"
    if key not in INVARIANTS:
        raise KeyError(f"unknown invariant {name!r} (known: I-1 … I-{len(INVARIANTS)})")
    return key


def _jobs(conn: psycopg.Connection[Any], run_id: int) -> tuple[list[int], dict[str, int]]:
    rows = conn.execute(
        "SELECT batch_id, state FROM batch_job WHERE run_id = %s ORDER BY batch_id",
        (run_id,),
        prepare=False,
    ).fetchall()
    states: dict[str, int] = {}
    for _, state in rows:
        states[state] = states.get(state, 0) + 1
    return [int(b) for b, s in rows if s == "succeeded"], states


def run_verification(
    engine: Engine,
    *,
    scheduled: bool,
    only: list[str] | None = None,
    sample: int = DETERMINISM_SAMPLE,
    idempotence_sample: int = IDEMPOTENCE_SAMPLE,
) -> VerificationReport:
    """Check the invariants (all, or those named in `only`) over the batches whose job
    succeeded, store one verification_result row per invariant checked, return them
    with the realism figures. `sample`: batches re-simulated for I-18;
    `idempotence_sample`: batches whose stored rows I-19 re-checksums (all when fewer)."""
    began = time.perf_counter()
    wanted = None if only is None else {normalise(n) for n in only}
    names = [n for n in INVARIANTS if wanted is None or n in wanted]
    url = libpq_url(engine.url.render_as_string(hide_password=False))
    with psycopg.connect(url) as conn:
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        with conn.transaction():
            conn.execute(f"SET LOCAL work_mem = '{WORK_MEM}'")
            has_ledger = conn.execute("SELECT to_regclass('run') IS NOT NULL").fetchone()
            try:
                if not (has_ledger and has_ledger[0]):
                    raise LookupError("no run table")
                ctx = run_context(conn)
            except LookupError as exc:
                raise NoRun("the database holds no run: run `aquasim plan` first") from exc
            batch_ids, jobs = _jobs(conn, ctx.run_id)
            finished = sum(jobs.get(s, 0) for s in FINISHED) == sum(jobs.values())
            skipped: dict[str, str] = {}
            results: list[CheckResult] = []
            realism: list[RealismFigure] = []
            for name in names:
                if scheduled and name in RUN_WIDE and not finished:
                    skipped[name] = "run-wide: waits until every job of the run has finished"
                    continue
                if name == "I-18":
                    results.append(check_I_18(conn, batch_ids, sample=sample))
                elif name == "I-19":
                    results.append(
                        check_I_19(
                            conn, batch_ids, sample=idempotence_sample, in_flight_ok=scheduled
                        )
                    )
                elif name == "I-20":
                    t0 = time.perf_counter()
                    realism = realism_figures(conn, batch_ids)
                    results.append(plausibility_result(realism, time.perf_counter() - t0))
                else:
                    results.append(INVARIANTS[name](conn, batch_ids))
            _store(conn, ctx.run_id, results)
    return VerificationReport(
        run_id=ctx.run_id,
        scheduled=scheduled,
        results=results,
        realism=realism,
        batches_checked=batch_ids,
        jobs=jobs,
        skipped=skipped,
        seconds=time.perf_counter() - began,
    )


def _store(conn: psycopg.Connection[Any], run_id: int, results: list[CheckResult]) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO verification_result"
            " (run_id, invariant, rows_examined, violations, examples, elapsed_s, passed)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)",
            [
                (
                    run_id,
                    r.invariant,
                    r.rows_examined,
                    r.violations,
                    Jsonb(r.examples),
                    r.seconds,
                    r.passed,
                )
                for r in results
            ],
        )
