"""Shared fixtures for the tests that run the service as real processes: a Celery worker (training queue,
prefork, one fresh child per job) on the session's Postgres and Redis with a tiny random backbone, a live
API server (`spafit serve --no-worker`), keys, and one job trained through the SDK. Session-scoped and
loaded once for the whole suite by tests/conftest.py, so every folder shares one worker and one server."""

from __future__ import annotations

import importlib.util
import io
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIENT_DIR = ROOT / "client"
if importlib.util.find_spec("spafit_client") is None:  # `pip install -e client` installs it
    sys.path.insert(0, str(CLIENT_DIR))

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



JOB_METHOD = {"name": "spafit", "n1": 1, "n2": 2, "rank": 4}
JOB_HYPERPARAMETERS = {"epochs": 2, "batch_size": 8, "learning_rate": 5e-3, "seed": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """An environment for child processes that import the repo and the SDK from this checkout."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(CLIENT_DIR)])
    env.update(extra)
    return env


@dataclass
class LiveServer:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_ready(self, timeout: float = 60) -> LiveServer:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited early:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready in {timeout}s:\n{self.tail()}")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def live_server_process(worker_env: dict[str, str], tmp_path_factory) -> Iterator[LiveServer]:
    """The API as deployed: `python -m app.cli serve --no-worker` (server mode, auth on) on a free port,
    started but not waited for (so that it boots while the worker does)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("live-server") / "server.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--no-worker", "--host", "127.0.0.1", "--port", str(port)],
            # Preloading the backbone makes /readyz wait for it, while the worker boots: no slow first predict.
            cwd=ROOT, env=subprocess_env(worker_env, SPAFIT_PRELOAD_BASE_MODEL="true"), stdout=log,
            stderr=subprocess.STDOUT)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", proc, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def live_server(live_server_process: LiveServer, worker: WorkerProcess) -> LiveServer:
    """The live server, ready (`/readyz` answers 200), with the session's worker running (both boot at once)."""
    return live_server_process.wait_ready()


@pytest.fixture(scope="session")
def make_key(db: Any) -> Callable[..., Any]:
    """Like tests/conftest.py's `tenant_key`, for session- and module-scoped fixtures: `make_key("train")`
    is a new tenant with one key; `make_key("predict", tenant=other.tenant_id)` adds a key to a tenant."""
    from app.services import keys
    from tests.conftest import TenantKey

    def make(*scopes: str, tenant: Any = None) -> TenantKey:
        scopes = scopes or ("train",)
        with db.session() as session:
            tenant_id = tenant or keys.create_tenant(session, f"sdk-{secrets.token_hex(6)}").id
            row, plaintext = keys.create_key(session, tenant_id, "sdk-test", list(scopes))
            return TenantKey(tenant_id=tenant_id, key_id=row.id, key=plaintext, scopes=list(row.scopes))

    return make


@dataclass
class Trained:
    """A tenant whose task `sentiment` was trained through the SDK (upload, create, wait with progress)."""

    url: str
    key: Any  # tests.conftest.TenantKey
    job: Any
    train: Any
    validation: Any
    progress_output: str

    def client(self, **kw: Any) -> Any:
        from spafit_client import Client

        return Client(self.url, api_key=self.key.key, **kw)


@pytest.fixture(scope="session")
def trained(live_server_process: LiveServer, worker: Any, live_server: LiveServer,
            make_key: Callable[..., Any]) -> Trained:
    from tests.tiny import toy_csv

    key = make_key("train", "predict")
    out = io.StringIO()
    from spafit_client import Client

    with Client(live_server.url, api_key=key.key) as client:
        train = client.datasets.upload(toy_csv(64, 0), name="toy-train")
        validation = client.datasets.upload(toy_csv(24, 100), name="toy-validation")
        job = client.jobs.create(task="sentiment", train_dataset=train, validation_dataset=validation,
                                 method=JOB_METHOD, hyperparameters=JOB_HYPERPARAMETERS)
        try:
            done = client.jobs.wait(job.id, progress=True, timeout=180, file=out)
        except Exception:
            print(worker.tail(), live_server.tail(), sep="\n----\n")
            raise
    return Trained(live_server.url, key, done, train, validation, out.getvalue())
