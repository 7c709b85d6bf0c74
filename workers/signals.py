"""Worker hooks: timing, logging and the lease heartbeat, in one place.

Like dramatiq middleware, a hook that fails is logged and never fails the job:
every Celery signal receiver here is wrapped by `hook`, and the heartbeat thread
logs its errors and keeps beating.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from celery import signals

logger = logging.getLogger("aquasim.worker")

_started: dict[str, float] = {}  # task id → perf_counter at prerun, per process


def hook(fn: Callable[..., Any]) -> Callable[..., None]:
    """A signal receiver that logs its own failure instead of raising it."""

    @functools.wraps(fn)
    def receiver(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            logger.exception("hook %s failed (ignored)", fn.__name__)

    return receiver


def _label(task: Any, args: Any) -> str:
    name = getattr(task, "name", "?").rsplit(".", 1)[-1]
    return f"{name}{tuple(args or ())}"


@signals.task_prerun.connect(weak=False)
@hook
def _task_started(task_id: str, task: Any, args: Any = None, **_: Any) -> None:
    _started[task_id] = time.perf_counter()
    logger.info("%s started", _label(task, args))


@signals.task_postrun.connect(weak=False)
@hook
def _task_finished(
    task_id: str,
    task: Any,
    args: Any = None,
    retval: Any = None,
    state: str | None = None,
    **_: Any,
) -> None:
    began = _started.pop(task_id, None)
    seconds = f" in {time.perf_counter() - began:.2f} s" if began is not None else ""
    logger.info("%s %s%s: %s", _label(task, args), (state or "done").lower(), seconds, retval)


@signals.task_failure.connect(weak=False)
@hook
def _task_failed(
    task_id: str, exception: BaseException, sender: Any = None, args: Any = None, **_: Any
) -> None:
    logger.warning("%s failed: %s", _label(sender, args), exception)


@signals.task_retry.connect(weak=False)
@hook
def _task_retried(request: Any = None, reason: Any = None, **_: Any) -> None:
    logger.info("%s will be retried: %s", getattr(request, "task", "?"), reason)


@signals.worker_process_init.connect(weak=False)
@hook
def _process_started(**_: Any) -> None:
    """A fresh pool process: nothing inherited from the parent is reused (engines are
    made per process in workers.tasks)."""
    _started.clear()


# ---- the lease heartbeat -------------------------------------------------------------------


class Heartbeat:
    """Call `renew()` every `interval_s` on a daemon thread while the job runs.

    `renew` returns False once the claim is no longer ours; the heartbeat then stops
    and `lost` is set (the job's commit will fail its token check anyway). An
    exception from `renew` (database unreachable) is logged and retried next beat.
    """

    def __init__(self, renew: Callable[[], bool], interval_s: float, label: str = "") -> None:
        self._renew = renew
        self.interval_s = interval_s
        self.label = label
        self.lost = False
        self.beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat {label}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self._renew():
                    self.lost = True
                    logger.warning("%s: lease lost (claim taken over); heartbeat stops", self.label)
                    return
                self.beats += 1
            except Exception as exc:
                logger.warning("%s: lease renewal failed (will retry): %s", self.label, exc)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)
