"""The run ledger: every `batch_job` state change, one function and one transaction each.

PostgreSQL, not the broker, is the source of truth for job state (rq's registries
in one table). A job moves

    planned ──enqueue──► queued ──claim──► running ──succeed──► succeeded
                           ▲  ▲                │ │ └──fail / exhaust──► failed
                           │  └──expire────────┘ └──take_over (holder gone)   │
                           └──────────────────requeue─────────────────────────┘

and `TRANSITIONS` below is that picture as data: a function may only move rows
out of its transition's `sources` into its `target` (every UPDATE says
`state = ANY(sources)`), so an illegal move simply matches no row.

What the columns mean while a job is in a state:

- `attempts` counts claims (take-overs included); `requeue` keeps it.
- `attempt_token` is the claim's uuid. A write commits only while the token in
  the ledger is still its own (`succeed` runs inside the writer's transaction
  and locks the row), so a delivery that lost its claim can never commit.
- `lease_expires_at` is how long the job's current holder is trusted: for a
  running job its worker (renewed by a heartbeat), for a queued job the broker
  (a short grace after the message was sent; after it the sweeper checks that
  the broker still holds the message and re-sends it if not).

Functions take a SQLAlchemy Engine or a psycopg connection; each runs in its own
transaction, except `succeed`, which joins the writer's.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from sqlalchemy import Engine

from schema.models import JOB_STATES

QUEUED_GRACE_S = 10.0  # a queued job's message must show up in the broker within this


@dataclass(frozen=True)
class Transition:
    name: str
    sources: tuple[str, ...]
    target: str


TRANSITIONS: dict[str, Transition] = {
    t.name: t
    for t in (
        Transition("enqueue", ("planned", "queued"), "queued"),  # queued→queued: re-send
        Transition("claim", ("queued",), "running"),
        Transition("take_over", ("running",), "running"),  # its holder is gone (lock free)
        Transition("succeed", ("running",), "succeeded"),
        Transition("fail", ("running",), "failed"),
        Transition("expire", ("running",), "queued"),  # lease expired, attempts left
        Transition("exhaust", ("running",), "failed"),  # holder lost, no attempts left
        Transition("requeue", ("failed",), "queued"),
        Transition("requeue_stuck", ("running",), "queued"),  # lease expired, by hand
    )
}
LEGAL: frozenset[tuple[str, str]] = frozenset(
    (source, t.target) for t in TRANSITIONS.values() for source in t.sources
)
assert {s for pair in LEGAL for s in pair} <= set(JOB_STATES)

Bind = Engine | psycopg.Connection


class StaleAttempt(RuntimeError):
    """The job's attempt token changed: this delivery lost its claim and must not commit."""


@dataclass(frozen=True)
class Claim:
    """One delivery's hold on one job."""

    run_id: int
    batch_id: int
    token: str
    attempts: int
    worker: str


@dataclass(frozen=True)
class ClaimResult:
    claim: Claim | None
    state: str | None  # the job's state when no claim was made (None: no such job)
    exhausted: bool = False  # the job was failed because its attempts ran out


@dataclass(frozen=True)
class Counts:
    by_state: dict[str, int]
    rows_written: int

    def __getitem__(self, state: str) -> int:
        return self.by_state.get(state, 0)

    @property
    def total(self) -> int:
        return sum(self.by_state.values())

    @property
    def open(self) -> int:
        """Jobs not finished: planned, queued or running."""
        return self["planned"] + self["queued"] + self["running"]


@dataclass(frozen=True)
class Failure:
    batch_id: int
    attempts: int
    worker: str | None
    finished_at: datetime | None
    error: str | None


# ---- plumbing ------------------------------------------------------------------------------


@contextlib.contextmanager
def transaction(bind: Bind) -> Iterator[psycopg.Connection]:
    """A psycopg connection inside one transaction (a pooled one for an Engine)."""
    if isinstance(bind, psycopg.Connection):
        with bind.transaction():
            yield bind
        return
    raw = bind.raw_connection()
    try:
        conn = raw.driver_connection
        assert isinstance(conn, psycopg.Connection)
        with conn.transaction():
            yield conn
    finally:
        raw.close()


def _move(
    conn: psycopg.Connection,
    name: str,
    where: str,
    params: Mapping[str, Any],
    sets: str = "",
) -> list[int]:
    """UPDATE the run's jobs in `name`'s source states matching `where`; their batch ids."""
    t = TRANSITIONS[name]
    query = (
        f"UPDATE batch_job SET state = %(target)s{', ' + sets if sets else ''} "
        f"WHERE run_id = %(run_id)s AND state = ANY(%(sources)s) AND ({where}) "
        "RETURNING batch_id"
    )
    rows = conn.execute(query, {**params, "target": t.target, "sources": list(t.sources)})
    return sorted(r[0] for r in rows.fetchall())


def _ids_filter(batch_ids: Sequence[int] | None) -> tuple[str, dict[str, Any]]:
    if batch_ids is None:
        return "TRUE", {}
    return "batch_id = ANY(%(ids)s)", {"ids": list(batch_ids)}


_QUEUED_FIELDS = (
    "lease_expires_at = now() + make_interval(secs => %(grace)s), "
    "attempt_token = NULL, worker = NULL"
)
_RESET_FIELDS = (
    "started_at = NULL, finished_at = NULL, error = NULL, rows_written = NULL, "
    "rows_per_table = NULL, checksum = NULL, checksums = NULL, timings = NULL"
)


# ---- coordinator side --------------------------------------------------------------------


def enqueue(
    bind: Bind, run_id: int, batch_ids: Sequence[int] | None = None, grace_s: float = QUEUED_GRACE_S
) -> list[int]:
    """planned → queued (and queued → queued, to re-send a lost message): the jobs the
    caller must now send to the broker. None = every planned job; named jobs are
    taken from planned or queued."""
    where, params = _ids_filter(batch_ids)
    if batch_ids is None:
        where = "state = 'planned'"
    with transaction(bind) as conn:
        return _move(conn, "enqueue", where, {"run_id": run_id, "grace": grace_s, **params},
                     _QUEUED_FIELDS)  # fmt: skip


def requeue(
    bind: Bind, run_id: int, batch_ids: Sequence[int] | None = None, grace_s: float = QUEUED_GRACE_S
) -> list[int]:
    """failed → queued (every failed job, or the named ones that are failed), times and
    error cleared, attempts kept. The caller sends them."""
    where, params = _ids_filter(batch_ids)
    with transaction(bind) as conn:
        return _move(conn, "requeue", where, {"run_id": run_id, "grace": grace_s, **params},
                     f"{_QUEUED_FIELDS}, {_RESET_FIELDS}")  # fmt: skip


def requeue_stuck(
    bind: Bind, run_id: int, batch_ids: Sequence[int] | None = None, grace_s: float = QUEUED_GRACE_S
) -> list[int]:
    """running with an expired lease → queued, whatever its attempts (by hand)."""
    where, params = _ids_filter(batch_ids)
    with transaction(bind) as conn:
        return _move(conn, "requeue_stuck", f"lease_expires_at < now() AND {where}",
                     {"run_id": run_id, "grace": grace_s, **params},
                     f"{_QUEUED_FIELDS}, {_RESET_FIELDS}")  # fmt: skip


def expire(
    bind: Bind, run_id: int, max_attempts: int, grace_s: float = QUEUED_GRACE_S
) -> list[int]:
    """running with an expired lease and attempts left → queued (the sweeper re-sends)."""
    with transaction(bind) as conn:
        return _move(conn, "expire", "lease_expires_at < now() AND attempts < %(max)s",
                     {"run_id": run_id, "max": max_attempts, "grace": grace_s},
                     _QUEUED_FIELDS)  # fmt: skip


def exhaust(bind: Bind, run_id: int, max_attempts: int) -> list[int]:
    """running with an expired lease and no attempts left → failed."""
    with transaction(bind) as conn:
        return _move(conn, "exhaust", "lease_expires_at < now() AND attempts >= %(max)s",
                     {"run_id": run_id, "max": max_attempts},
                     "finished_at = clock_timestamp(), attempt_token = NULL, error = "
                     "format('lease expired on attempt %%s of %%s (worker %%s lost)', "
                     "attempts, %(max)s, coalesce(worker, '?'))")  # fmt: skip


def unconfirmed(bind: Bind, run_id: int, *, all_queued: bool = False) -> list[int]:
    """Queued jobs past their grace (or all queued ones): the sweeper checks these
    against the broker."""
    where = "TRUE" if all_queued else "lease_expires_at IS NULL OR lease_expires_at < now()"
    with transaction(bind) as conn:
        rows = conn.execute(
            f"SELECT batch_id FROM batch_job WHERE run_id = %s AND state = 'queued' AND ({where}) "
            "ORDER BY batch_id",
            (run_id,),
        ).fetchall()
    return [r[0] for r in rows]


def set_run_status(bind: Bind, run_id: int, status: str) -> None:
    with transaction(bind) as conn:
        conn.execute("UPDATE run SET status = %s WHERE id = %s", (status, run_id))


# ---- worker side -------------------------------------------------------------------------


def claim(
    bind: Bind, run_id: int, batch_id: int, *, worker: str, lease_s: float, max_attempts: int
) -> ClaimResult:
    """queued → running, or running → running when its holder is gone (take-over): attempts
    bumped, new token, worker, start time and lease set. Call it only while holding the
    batch's advisory lock: a running job whose lock is free has lost its holder. A
    take-over with no attempts left fails the job instead (running → failed)."""
    with transaction(bind) as conn:
        row = conn.execute(
            "SELECT state, attempts, worker FROM batch_job "
            "WHERE run_id = %s AND batch_id = %s FOR UPDATE",
            (run_id, batch_id),
        ).fetchone()
        if row is None:
            return ClaimResult(None, None)
        state, attempts, previous = row
        if state == "running" and attempts >= max_attempts:
            error = (
                f"worker {previous or '?'} lost on attempt {attempts} of {max_attempts}; giving up"
            )
            conn.execute(
                "UPDATE batch_job SET state = %s, finished_at = clock_timestamp(), "
                "attempt_token = NULL, lease_expires_at = NULL, error = %s "
                "WHERE run_id = %s AND batch_id = %s",
                (TRANSITIONS["exhaust"].target, error, run_id, batch_id),
            )
            return ClaimResult(None, "failed", exhausted=True)
        name = {"queued": "claim", "running": "take_over"}.get(state)
        if name is None:
            return ClaimResult(None, state)
        token = uuid.uuid4().hex
        moved = _move(
            conn, name, "batch_id = %(batch_id)s",
            {"run_id": run_id, "batch_id": batch_id, "token": token, "worker": worker,
             "lease": lease_s},
            "attempts = attempts + 1, attempt_token = %(token)s, worker = %(worker)s, "
            "started_at = now(), finished_at = NULL, error = NULL, "
            "lease_expires_at = now() + make_interval(secs => %(lease)s)",
        )  # fmt: skip
        assert moved == [batch_id]
        return ClaimResult(Claim(run_id, batch_id, token, attempts + 1, worker), None)


def renew_lease(bind: Bind, claim: Claim, lease_s: float) -> bool:
    """Push a running job's lease forward; False when the claim is no longer ours."""
    with transaction(bind) as conn:
        cur = conn.execute(
            "UPDATE batch_job SET lease_expires_at = now() + make_interval(secs => %s) "
            "WHERE run_id = %s AND batch_id = %s AND state = 'running' AND attempt_token = %s",
            (lease_s, claim.run_id, claim.batch_id, claim.token),
        )
        return cur.rowcount == 1


def succeed(
    conn: psycopg.Connection,
    claim: Claim,
    *,
    rows_written: int,
    rows_per_table: Mapping[str, int] | None = None,
    checksum: str | None = None,
    checksums: Mapping[str, str] | None = None,
    timings: Mapping[str, float] | None = None,
) -> None:
    """running → succeeded, inside the caller's (the writer's) transaction, so the rows
    and the success commit together. Locks the job row and raises StaleAttempt unless
    the token is still this claim's."""
    row = conn.execute(
        "SELECT state, attempt_token FROM batch_job WHERE run_id = %s AND batch_id = %s FOR UPDATE",
        (claim.run_id, claim.batch_id),
    ).fetchone()
    if row is None or row[0] not in TRANSITIONS["succeed"].sources or row[1] != claim.token:
        state = row[0] if row else "missing"
        raise StaleAttempt(
            f"batch {claim.batch_id}: attempt {claim.attempts} lost its claim (job {state})"
        )
    conn.execute(
        "UPDATE batch_job SET state = %s, finished_at = clock_timestamp(), "
        "lease_expires_at = NULL, error = NULL, rows_written = %s, rows_per_table = %s, "
        "checksum = %s, checksums = %s, timings = %s WHERE run_id = %s AND batch_id = %s",
        (
            TRANSITIONS["succeed"].target,
            rows_written,
            _json(rows_per_table),
            checksum,
            _json(checksums),
            _json(timings),
            claim.run_id,
            claim.batch_id,
        ),
    )


def fail(bind: Bind, claim: Claim, error: str) -> bool:
    """running → failed with the error, only while the claim is still ours."""
    with transaction(bind) as conn:
        moved = _move(
            conn, "fail", "batch_id = %(batch_id)s AND attempt_token = %(token)s",
            {"run_id": claim.run_id, "batch_id": claim.batch_id, "token": claim.token,
             "error": error},
            "finished_at = clock_timestamp(), lease_expires_at = NULL, error = %(error)s",
        )  # fmt: skip
        return bool(moved)


# ---- reading -----------------------------------------------------------------------------


def counts(bind: Bind, run_id: int) -> Counts:
    """Jobs per state and the rows the succeeded ones wrote."""
    with transaction(bind) as conn:
        rows = conn.execute(
            "SELECT state, count(*), coalesce(sum(rows_written), 0) FROM batch_job "
            "WHERE run_id = %s GROUP BY state",
            (run_id,),
        ).fetchall()
    by_state = {state: 0 for state in JOB_STATES}
    written = 0
    for state, n, rows_written in rows:
        by_state[state] = n
        if state == "succeeded":
            written = int(rows_written)
    return Counts(by_state, written)


def failures(bind: Bind, run_id: int) -> list[Failure]:
    """The failed jobs with their errors, by batch."""
    with transaction(bind) as conn:
        rows = conn.execute(
            "SELECT batch_id, attempts, worker, finished_at, error FROM batch_job "
            "WHERE run_id = %s AND state = 'failed' ORDER BY batch_id",
            (run_id,),
        ).fetchall()
    return [Failure(*r) for r in rows]


def jobs(bind: Bind, run_id: int, states: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Ledger rows (as dicts) of the run, optionally of some states only, by batch."""
    where = "" if states is None else "AND state = ANY(%(states)s)"
    with transaction(bind) as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"SELECT *, lease_expires_at - now() AS lease_left FROM batch_job "
            f"WHERE run_id = %(run_id)s {where} ORDER BY batch_id",
            {"run_id": run_id, "states": list(states or ())},
        )
        return cur.fetchall()


def _json(value: Mapping[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(dict(value))
