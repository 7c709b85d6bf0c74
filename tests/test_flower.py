"""`aquasim flower`: the dashboard of a live Celery worker, behind basic authentication.

A real `celery -A workers.celery_app worker` process and `aquasim flower` run as
subprocesses on an embedded Redis; the test reads Flower over HTTP with and
without credentials and finds a project task it sent listed by name.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import ROOT

USER, PASSWORD = "ops", f"pw-{uuid.uuid4().hex[:8]}"
FLOWER_MESSAGE = "Flower needs AQUASIM_FLOWER_USER and AQUASIM_FLOWER_PASSWORD"
DEADLINE_S = 40.0
T = TypeVar("T")


def _aquasim() -> list[str]:
    """The installed console script, else the same entry point through this Python."""
    script = Path(sys.executable).with_name("aquasim")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from pipeline.cli import main; main()"]


def _clean_env(tmp_path: Path) -> dict[str, str]:
    """This process's environment without AQUASIM_/FLOWER_/CELERY_ settings."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AQUASIM_", "FLOWER_", "CELERY_"))
    }
    env["AQUASIM_DATA_DIR"] = str(tmp_path / "data")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def project_task() -> str:
    """A registered project task to send; skips (before any server starts) without the app."""
    try:
        from workers.celery_app import app

        app.loader.import_default_modules()
        import workers.tasks  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"workers/celery_app.py (Celery app and workers.tasks) not importable: {exc}")
    names = sorted(n for n in app.tasks if n.startswith("workers."))
    if not names:
        pytest.skip("the Celery app registers no workers.* task yet")
    return "workers.tasks.sweep" if "workers.tasks.sweep" in names else names[0]


@contextlib.contextmanager
def _process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """A subprocess in its own process group, killed with its children on exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # prefork children left behind
            os.killpg(proc.pid, signal.SIGKILL)


def _get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_for(what: str, probe: Callable[[], T | None], logs: list[Path], until: float) -> T:
    while time.monotonic() < until:
        with contextlib.suppress(OSError):
            result = probe()
            if result:
                return result
        time.sleep(0.3)
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)
    pytest.fail(f"timed out waiting for {what}\n{tails}")


def test_flower_refuses_to_start_without_credentials(tmp_path: Path) -> None:
    env = _clean_env(tmp_path)
    env["AQUASIM_FLOWER_USER"] = USER  # a user alone is not enough
    result = subprocess.run(
        [*_aquasim(), "flower"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"aquasim: error: {FLOWER_MESSAGE}"), lines
    assert not (tmp_path / "data").exists()  # refused before starting any server


def test_flower_shows_a_live_worker_and_its_project_tasks(
    project_task: str, tmp_path: Path, redis_url: str, db_url: str
) -> None:
    task_name = project_task
    broker = redis_url.rsplit("/", 1)[0] + "/11"  # a Redis db of its own: no stray messages
    env = _clean_env(tmp_path)
    env.update(AQUASIM_BROKER_URL=broker, AQUASIM_DATABASE_URL=db_url)
    worker_name = f"flowertest-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    auth = (USER, PASSWORD)
    worker_log, flower_log = tmp_path / "worker.log", tmp_path / "flower.log"
    logs = [worker_log, flower_log]
    until = time.monotonic() + DEADLINE_S

    worker_argv = [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
        "--concurrency=1", "--loglevel=INFO", "--task-events", "-n", worker_name,
    ]  # fmt: skip
    flower_env = dict(env, AQUASIM_FLOWER_USER=USER, AQUASIM_FLOWER_PASSWORD=PASSWORD)
    flower_argv = [*_aquasim(), "flower", "--port", str(port), "--address", "127.0.0.1"]
    with (
        _process(worker_argv, env, worker_log),
        _process(flower_argv, flower_env, flower_log) as flower,
    ):

        def answering() -> bool:
            assert flower.poll() is None, "aquasim flower exited"
            return _get(f"{base}/", auth)[0] == 200

        _wait_for("Flower to answer", answering, logs, until)

        # Refused without credentials, and with wrong ones.
        for bad in (None, (USER, "wrong")):
            for path in ("/", "/tasks", "/api/workers", "/api/tasks"):
                status, _ = _get(base + path, bad)
                assert status == 401, (path, bad, status)

        def worker_listed() -> dict[str, Any] | None:
            status, body = _get(f"{base}/api/workers?refresh=1", auth)
            return json.loads(body) if status == 200 and worker_name in json.loads(body) else None

        workers = _wait_for(f"Flower to list {worker_name}", worker_listed, logs, until)
        registered = workers[worker_name].get("registered") or []
        assert task_name in registered, registered

        sender = (
            "import sys; from workers.celery_app import app; print(app.send_task(sys.argv[1]).id)"
        )
        sent = subprocess.run(
            [sys.executable, "-c", sender, task_name],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        task_id = sent.stdout.strip().splitlines()[-1]

        def task_listed() -> dict[str, Any] | None:
            status, body = _get(f"{base}/api/tasks", auth)
            tasks = json.loads(body) if status == 200 else {}
            return tasks if tasks.get(task_id, {}).get("name") == task_name else None

        tasks = _wait_for(f"Flower to list task {task_name} {task_id}", task_listed, logs, until)
        assert tasks[task_id]["worker"] == worker_name
        status, page = _get(f"{base}/tasks", auth)
        assert status == 200 and b"<html" in page.lower()
        status, page = _get(f"{base}/", auth)
        assert status == 200 and worker_name.encode() in page
    assert PASSWORD not in flower_log.read_text(errors="replace")
