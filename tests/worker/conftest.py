"""A real Celery worker process (training queue, prefork, one fresh child per job) on the session's
Postgres database and Redis, and an API app configured like it. Tests kill its children for real."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Fast heartbeats so that orphaned jobs are noticed within seconds, not minutes.
WORKER_SETTINGS = {
    "job_heartbeat_interval_s": 0.5,
    "job_heartbeat_stale_s": 4.0,
    "job_requeue_interval_s": 2.0,
    "checkpoint_every_steps": 5,
    "job_log_every_steps": 1,
    "preload_base_model": False,
}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> str:
    """A tiny random BERT (hidden 64) that trains in seconds: the jobs' base model."""
    from tests.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("worker-model") / "bert", "bert", hidden=64))


@pytest.fixture(scope="session")
def worker_env(pg_url: str, redis_url: str, redis_prefix: str, tiny_base: str, tmp_path_factory) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPAFIT_") or k.startswith("SPAFIT_TEST_")}
    env.update({
        "SPAFIT_MODE": "server", "SPAFIT_DATABASE_URL": pg_url, "SPAFIT_BROKER_URL": redis_url,
        "SPAFIT_BROKER_KEY_PREFIX": redis_prefix, "SPAFIT_ALLOWED_BASE_MODELS": tiny_base,
        "SPAFIT_DEFAULT_BASE_MODEL": tiny_base, "SPAFIT_DATA_DIR": str(tmp_path_factory.mktemp("worker-data")),
        "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
    })
    env.update({f"SPAFIT_{k.upper()}": str(v) for k, v in WORKER_SETTINGS.items()})
    return env


class WorkerProcess:
    """`celery worker` as the deployment runs it (same CLI entry point), its log in a file."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env, self.log_path = env, log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> WorkerProcess:
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", "--queues", "training,light", "--concurrency", "1",
             "--loglevel", "INFO"],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b" ready." in self.log_path.read_bytes():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready in {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]


@pytest.fixture(scope="session")
def worker(worker_env: dict[str, str], tmp_path_factory) -> Iterator[WorkerProcess]:
    w = WorkerProcess(worker_env, tmp_path_factory.mktemp("worker-log") / "worker.log").start()
    yield w
    w.stop()


@pytest.fixture
def job_app(make_settings: Callable[..., Any], tiny_base: str, worker: WorkerProcess) -> Any:
    from app.main import create_app

    return create_app(make_settings(allowed_base_models=[tiny_base], default_base_model=tiny_base,
                                    **WORKER_SETTINGS))


@pytest.fixture
def job_client(job_app: Any) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    with TestClient(job_app) as c:
        yield c
