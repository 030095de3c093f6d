"""Shared fixtures for the tests that run the service as real processes: a Celery worker (training queue,
prefork, one fresh child per job) on the session's Postgres and Redis with a tiny random backbone, a live
API server (`spafit serve --no-worker`), keys, and one job trained through the SDK. Session-scoped and
loaded once for the whole suite by tests/conftest.py, so every folder shares one worker and one server."""

from __future__ import annotations

import contextlib
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
    # Many tests hold their jobs' messages back on purpose (jobs stay queued): never re-send those mid-suite.
    "job_claim_timeout_s": 3600.0,
    "checkpoint_every_steps": 5,
    "job_log_every_steps": 1,
    "preload_base_model": False,
    # Webhook tests receive on loopback, and retry within a second instead of minutes.
    "webhook_allow_private_urls": True,
    "webhook_retry_base_s": 0.5,
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
        "HF_HUB_OFFLINE": "1",  # no Hub here: a Hub dataset import fails at once instead of retrying for a minute
    })
    env.update({f"SPAFIT_{k.upper()}": str(v) for k, v in WORKER_SETTINGS.items()})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll `pred` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


@contextlib.contextmanager
def uvicorn_in_thread(app: Any) -> Iterator[str]:
    """`app` behind a real uvicorn server on a free port, in a thread of this process (so that a test can reach
    into the app: raise from a route, slow a load down); yields its URL."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def wait_ready(url: str, timeout: float = 60) -> None:
    """Until the service at `url` answers /readyz with 200 (its backbone loaded)."""
    import httpx

    deadline = time.monotonic() + timeout
    while httpx.get(url + "/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the service did not get ready (the backbone did not load)"
        time.sleep(0.1)


class ChildProcess:
    """A `python -m app.cli ...` command as deployments run it, in a child process, its output in a log file."""

    what = "the process"

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.args, self.env, self.log_path = args, env, log_path
        self.proc: subprocess.Popen | None = None

    def launch(self) -> Any:
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", *self.args], cwd=ROOT, env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def wait_for(self, ready: Callable[[], bool], timeout: float) -> Any:
        """Return self once `ready()`; raise with the log's tail if the process exits or `timeout` passes."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.what} exited early:\n{self.tail()}")
            if ready():
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.what} was not ready in {timeout}s:\n{self.tail()}")
            time.sleep(0.2)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and not self.log.closed:
            self.log.close()

    def tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]


class ApiProcess(ChildProcess):
    """`spafit serve --no-worker` on a free port (or `port`): a real uvicorn process that can be SIGKILLed."""

    what = "the API"

    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(["serve", "--no-worker", "--host", "127.0.0.1", "--port", str(self.port)], env, log_path)

    def wait_ready(self, timeout: float = 60, path: str = "/readyz") -> ApiProcess:
        """Wait for `path` to answer 200: /healthz once it listens, /readyz once its dependencies are up."""
        import httpx

        def up() -> bool:
            try:
                return httpx.get(self.url + path, timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        return self.wait_for(up, timeout)

    def start(self, timeout: float = 60) -> ApiProcess:
        """Launch and wait until it listens (/healthz)."""
        return self.launch().wait_ready(timeout, "/healthz")


class WorkerProcess(ChildProcess):
    """`celery worker` as the deployment runs it (same CLI entry point), its log in a file."""

    what = "the worker"

    def __init__(self, env: dict[str, str], log_path: Path):
        super().__init__(["worker", "--queues", "training,light", "--concurrency", "1", "--loglevel", "INFO"],
                         env, log_path)

    def start(self, timeout: float = 60) -> WorkerProcess:
        self.launch()
        return self.wait_for(lambda: b" ready." in self.log_path.read_bytes(), timeout)


@pytest.fixture(scope="session")
def worker(worker_env: dict[str, str], tmp_path_factory) -> Iterator[WorkerProcess]:
    w = WorkerProcess(worker_env, tmp_path_factory.mktemp("worker-log") / "worker.log").start()
    yield w
    w.stop()



JOB_METHOD = {"name": "spafit", "n1": 1, "n2": 2, "rank": 4}
JOB_HYPERPARAMETERS = {"epochs": 2, "batch_size": 8, "learning_rate": 5e-3, "seed": 1}


def subprocess_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """An environment for child processes that import the repo and the SDK from this checkout."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(CLIENT_DIR)])
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def live_server_process(worker_env: dict[str, str], tmp_path_factory) -> Iterator[ApiProcess]:
    """The API as deployed: `python -m app.cli serve --no-worker` (server mode, auth on) on a free port,
    started but not waited for (so that it boots while the worker does)."""
    # Preloading the backbone makes /readyz wait for it, while the worker boots: no slow first predict.
    server = ApiProcess(subprocess_env(worker_env, SPAFIT_PRELOAD_BASE_MODEL="true"),
                        tmp_path_factory.mktemp("live-server") / "server.log").launch()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def live_server(live_server_process: ApiProcess, worker: WorkerProcess) -> ApiProcess:
    """The live server, ready (`/readyz` answers 200), with the session's worker running (both boot at once). It
    takes 5-15 s here; a clean-clone CI run with other test runs on the machine once saw the backbone's preload
    pass 60 s (every test of the worker that started it then failed at setup), so the bound is generous."""
    return live_server_process.wait_ready(timeout=180)


@pytest.fixture(scope="session")
def make_key(db: Any) -> Callable[..., Any]:
    """Like tests/conftest.py's `tenant_key`, for session- and module-scoped fixtures: `make_key("train")`
    is a new tenant with one key; `make_key("predict", tenant=other.tenant_id)` adds a key to a tenant."""
    return key_maker(db)


def key_maker(db: Any) -> Callable[..., Any]:
    """`make_key` on the database `db` (a module with a database of its own overrides `make_key` with it)."""
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
def trained(live_server_process: ApiProcess, worker: Any, live_server: ApiProcess,
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
