"""The sweeper: put back in the queue what the ledger says is owed, like rq's registry cleanup.

One pass (`sweep`) does, for the run:

1. running jobs whose lease expired (their worker died or hangs): back to queued
   while attempts remain (`ledger.expire`), else failed (`ledger.exhaust`);
2. queued jobs whose message the broker no longer holds (Redis restarted, the
   message was lost between ledger and broker, …): sent again. A queued job is
   only checked once its grace after sending has passed, and a message counts as
   held while it waits in the queue or sits unacknowledged with a worker.

Sending a job twice is harmless (the batch lock and the attempt token keep the
second delivery from writing), so the pass errs on the side of re-sending. It
runs from `aquasim run` every few seconds and from celery beat (`workers.tasks.sweep`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pipeline import ledger


class Broker(Protocol):
    """What the sweeper needs of the broker (`workers.celery_app.Broker`)."""

    def held(self, run_id: int) -> set[int]: ...

    def publish(self, run_id: int, batch_ids: list[int]) -> None: ...


@dataclass
class SweepReport:
    expired: list[int] = field(default_factory=list)  # running → queued, re-sent
    exhausted: list[int] = field(default_factory=list)  # running → failed
    lost: list[int] = field(default_factory=list)  # queued, not in the broker: re-sent

    @property
    def changed(self) -> bool:
        return bool(self.expired or self.exhausted or self.lost)

    def describe(self) -> str:
        parts = [
            f"{name} {', '.join(map(str, ids))}"
            for name, ids in (
                ("lease expired, re-queued:", self.expired),
                ("attempts exhausted, failed:", self.exhausted),
                ("lost by the broker, re-sent:", self.lost),
            )
            if ids
        ]
        return "; ".join(parts) or "nothing to do"


def sweep(
    bind: ledger.Bind,
    broker: Broker,
    run_id: int,
    max_attempts: int,
    *,
    all_queued: bool = False,
) -> SweepReport:
    """One pass over the run's ledger (see the module docstring). `all_queued` checks
    every queued job against the broker, not only those past their grace (at start-up).
    Broker errors propagate; the ledger is left consistent (a job moved to queued but
    not sent is found by the next pass)."""
    report = SweepReport()
    report.expired = ledger.expire(bind, run_id, max_attempts)
    report.exhausted = ledger.exhaust(bind, run_id, max_attempts)
    unconfirmed = [
        b for b in ledger.unconfirmed(bind, run_id, all_queued=all_queued)
        if b not in report.expired
    ]  # fmt: skip
    if unconfirmed:
        held = broker.held(run_id)
        missing = [b for b in unconfirmed if b not in held]
        report.lost = ledger.enqueue(bind, run_id, missing) if missing else []
    if report.expired:
        broker.publish(run_id, report.expired)
    if report.lost:
        broker.publish(run_id, report.lost)
    return report
