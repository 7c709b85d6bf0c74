"""The Celery app (`celery -A workers.celery_app worker|beat|flower`) and the broker as the
coordinator sees it.

Configured for long idempotent jobs: acknowledged after the job (`task_acks_late`),
put back when the worker process dies (`task_reject_on_worker_lost`), one message
reserved per worker process (`worker_prefetch_multiplier`), a visibility timeout
far above the longest job, a bounded number of jobs per child process, JSON
messages, and events on (Flower). No result backend: the ledger (`batch_job`) is
where job state lives.

Settings (`AQUASIM_BROKER_URL`, `AQUASIM_QUEUE`, `AQUASIM_VERIFY_INTERVAL_S`) are read
when this module is imported; with no broker URL it uses the embedded Redis of
the data directory if that has ever been started, else a local Redis.

`Broker` is the coordinator's handle on one broker URL and queue: it sends batch
jobs and tells which of a run's jobs the broker still holds (the sweeper's check).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable

import redis
from celery import Celery
from pydantic import ValidationError

from pipeline.services import EmbeddedRedis
from pipeline.settings import Settings

TASK_SIMULATE = "workers.tasks.simulate_batch"
TASK_SWEEP = "workers.tasks.sweep"
TASK_VERIFY = "workers.tasks.verify_run"

VISIBILITY_TIMEOUT_S = 6 * 3600  # far above the longest batch and any back-off countdown
MAX_TASKS_PER_CHILD = 50  # recycle worker processes: bounded memory drift
SWEEP_INTERVAL_S = 30.0
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")  # kombu's priority lists
_UNACKED = "unacked"  # kombu's hash of delivered, unacknowledged messages


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError:  # the CLI reports bad settings itself, naming the field
        return Settings.model_construct()


def default_broker_url(settings: Settings) -> str:
    """The configured broker, else the data directory's embedded Redis, else a local one."""
    if settings.broker_url:
        return settings.broker_url
    embedded = EmbeddedRedis(settings.data_dir)
    return embedded.url if embedded.port is not None else LOCAL_REDIS_URL


def configure(app: Celery, settings: Settings) -> None:
    app.conf.update(
        broker_url=default_broker_url(settings),
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a restarted Redis is waited for, forever
        task_default_queue=settings.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=MAX_TASKS_PER_CHILD,
        worker_cancel_long_running_tasks_on_connection_loss=False,  # the ledger copes
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_track_started=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        timezone="UTC",
        beat_schedule={
            "aquasim.verify": {"task": TASK_VERIFY, "schedule": settings.verify_interval_s},
            "aquasim.sweep": {"task": TASK_SWEEP, "schedule": SWEEP_INTERVAL_S},
        },
    )


app = Celery("aquasim", include=["workers.tasks", "workers.signals"])
configure(app, _settings())


# ---- the broker, as the coordinator sees it ------------------------------------------------


class Broker:
    """Send batch jobs to one Redis broker's queue, and see which ones it holds."""

    def __init__(self, url: str, queue: str) -> None:
        self.url = url
        self.queue = queue

    def publish(self, run_id: int, batch_ids: Iterable[int]) -> None:
        """Send one `simulate_batch(run_id, batch_id)` message per batch (kombu errors
        propagate after Celery's short publish retries)."""
        ids = list(batch_ids)
        if not ids:
            return
        with app.connection_for_write(self.url) as connection:
            producer = app.amqp.Producer(connection)
            for batch_id in ids:
                app.send_task(
                    TASK_SIMULATE, args=(run_id, batch_id), queue=self.queue, producer=producer
                )

    def held(self, run_id: int) -> set[int]:
        """Batches of the run with a message waiting in the queue or delivered and not
        yet acknowledged (reserved or running on a worker)."""
        client = redis.Redis.from_url(self.url, socket_timeout=10, socket_connect_timeout=5)
        with client:
            raw: list[bytes] = []
            for suffix in _PRIORITY_SUFFIXES:
                raw.extend(client.lrange(self.queue + suffix, 0, -1))
            for entry in client.hvals(_UNACKED):
                try:
                    message, _exchange, routing_key = json.loads(entry)
                except (ValueError, TypeError):
                    continue
                if routing_key == self.queue:
                    raw.append(json.dumps(message).encode())
        held = set()
        for item in raw:
            job = _job_of(item)
            if job is not None and job[0] == run_id:
                held.add(job[1])
        return held

    def ping(self) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=3, socket_connect_timeout=3)
        with client:
            client.ping()


def _job_of(raw: bytes | str) -> tuple[int, int] | None:
    """(run_id, batch_id) of a kombu-encoded simulate_batch message, else None."""
    try:
        message = json.loads(raw)
        if message.get("headers", {}).get("task") != TASK_SIMULATE:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return int(args[0]), int(args[1])
    except (ValueError, TypeError, KeyError, IndexError):
        return None
