"""Fault-injection tools for the reliability tests: a private Redis that can be SIGKILLed and restarted, a TCP
proxy in front of Postgres that can be cut (whole, or at the first packet carrying a given statement), and the
API as a real process. The session's worker, tiny backbone and keys come from tests/live.py and tests/conftest.py.

Everything here touches only what it started itself: the shared Postgres and Redis of the machine are never
stopped or cut, and the API processes started here use a broker key prefix of their own.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.live import WORKER_SETTINGS, ApiProcess, WorkerProcess, free_port, key_maker, wait_until  # noqa: F401  (re-exported to the tests here)

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------- measurements

_MEASURED: dict[str, dict[str, Any]] = {}


@pytest.fixture
def measure(request: pytest.FixtureRequest) -> Callable[..., None]:
    """`measure(name=value, ...)`: figures a test measured. With SPAFIT_RELIABILITY_OUT=<file.json> they are
    written there at the end of the session (benchmarks/RELIABILITY.md quotes benchmarks/results/reliability.json)."""

    def record(**values: Any) -> None:
        _MEASURED.setdefault(request.node.nodeid, {}).update(values)

    return record


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    out = os.environ.get("SPAFIT_RELIABILITY_OUT")
    if out and _MEASURED:
        import json
        import platform

        data = {"command": "SPAFIT_RELIABILITY_OUT=" + out + " python -m pytest tests/reliability",
                "exit_status": int(exitstatus), "cores": os.cpu_count(), "python": platform.python_version(),
                "loadavg_at_end": [round(x, 2) for x in os.getloadavg()], "tests": _MEASURED}
        Path(out).write_text(json.dumps(data, indent=2) + "\n")


# ------------------------------------------------------------------------------------------- Redis


class RedisServer:
    """A private `redis-server` on its own port that keeps nothing on disk, as production Redis without
    persistence: SIGKILL loses every message it held, and a restart on the same port is a new incarnation
    (a new run_id)."""

    def __init__(self, port: int, workdir: Path):
        self.port, self.workdir = port, workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("these tests start a private Redis: install the `redis-server` binary (Debian: redis-server)",
                        pytrace=False)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._pings, 10, f"redis-server on port {self.port}")
        return self

    def _pings(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def run_id(self) -> str:
        import redis

        return str(redis.Redis(port=self.port).info("server")["run_id"])

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path).start()
    yield server
    server.stop()


# ------------------------------------------------------------------------------------------- TCP proxy


class TcpProxy:
    """A TCP proxy (threads) from 127.0.0.1:<port> to `upstream`, to take a database away without touching it.

    - `cut()`: stop listening and close every open connection: the database is unreachable;
    - `restore()`: listen again on the same port;
    - `cut_on(pattern)`: drop the next connection that sends a chunk containing `pattern` (say b"INSERT INTO
      datasets"), before that chunk reaches the server: a connection lost in the middle of a transaction.
    """

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.port = free_port()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._pattern: bytes | None = None
        self.tripped = threading.Event()  # set when `cut_on` dropped a connection
        self.accepted = 0
        self.forwarded: list[bytes] = []  # the head of each chunk sent on to the server

    def start(self) -> TcpProxy:
        self.restore()
        return self

    def restore(self) -> None:
        self._pattern = None
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True, name="proxy-accept").start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            _close(listener)  # shutdown() first: a bare close() does not wake the thread blocked in accept()
        with self._lock:
            conns, self._conns = set(self._conns), set()
        for c in conns:
            _close(c)

    def cut_on(self, pattern: bytes) -> None:
        self.tripped.clear()
        self._pattern = pattern

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by cut()
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _close(client)
                continue
            server.settimeout(None)
            with self._lock:
                self._conns.update((client, server))
                self.accepted += 1
            threading.Thread(target=self._pump, args=(client, server), daemon=True, name="proxy-pump").start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        peers = {client: server, server: client}
        try:
            while True:
                ready, _, _ = select.select(list(peers), [], [], 0.5)
                if self._listener is None and client not in self._conns:
                    return
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    pattern = self._pattern
                    if src is client and pattern is not None and pattern in data:
                        self._pattern = None
                        self.tripped.set()
                        return  # the statement never reaches the server
                    if src is client:
                        self.forwarded.append(data[:300])
                    peers[src].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for s in (client, server):
                _close(s)
                with self._lock:
                    self._conns.discard(s)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


@pytest.fixture
def pg_proxy(pg_url: str) -> Iterator[TcpProxy]:
    from sqlalchemy import make_url

    url = make_url(pg_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432)).start()
    yield proxy
    proxy.cut()


def via_proxy(pg_url: str, proxy: TcpProxy) -> str:
    from sqlalchemy import make_url

    return make_url(pg_url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


# ------------------------------------------------------------------------------------------- processes


@pytest.fixture(scope="session")
def rel_prefix(redis_prefix: str) -> str:
    """A broker key prefix for the API processes started here: nothing they send reaches the session's worker."""
    return f"{redis_prefix}rel:"


def own_database(pg_databases: Any, name: str) -> Iterator[str]:
    """A migrated database for one module's deployment, dropped after it (use as a module-scoped `pg_url`
    override, with `db` and `make_key` overridden on it too). A deployment on a broker prefix of its own must
    not share the session's database: the requeue loop of another deployment on that database (the session's
    live server, say) takes the jobs this one sent as sent to a broker it lost, and re-sends them to its own
    worker (seen in CI: a job meant to stay queued was trained, and the stream following it ended early)."""
    from app.services import migrate

    url = pg_databases.create(name)
    migrate.upgrade(url)
    yield url
    pg_databases.drop(url)


def database_on(url: str) -> Iterator[Any]:
    """An `app.db.Database` on `url` (a module's `db` override), disposed after it."""
    from app.db import Database

    database = Database.from_url(url)
    yield database
    database.dispose()


def own_database_fixtures(name: str) -> tuple[Any, Any]:
    """Module-scoped `pg_url` and `db` overrides on a database of the module's own (see `own_database`):
    `pg_url, db = own_database_fixtures("spafit_x")` at the top of a test module."""

    @pytest.fixture(scope="module")
    def pg_url(pg_databases: Any) -> Iterator[str]:
        yield from own_database(pg_databases, name)

    @pytest.fixture(scope="module")
    def db(pg_url: str) -> Iterator[Any]:
        yield from database_on(pg_url)

    return pg_url, db


def service_env(database_url: str, broker_url: str, prefix: str, base: str, data_dir: Path,
                **settings: Any) -> dict[str, str]:
    """The environment of a server-mode API or worker process (the shell's SPAFIT_* variables dropped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPAFIT_") or k.startswith("SPAFIT_TEST_")}
    env.update({
        "SPAFIT_MODE": "server", "SPAFIT_DATABASE_URL": database_url, "SPAFIT_BROKER_URL": broker_url,
        "SPAFIT_BROKER_KEY_PREFIX": prefix, "SPAFIT_ALLOWED_BASE_MODELS": base, "SPAFIT_DEFAULT_BASE_MODEL": base,
        "SPAFIT_DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
    })
    env.update({f"SPAFIT_{k.upper()}": str(v) for k, v in {**WORKER_SETTINGS, **settings}.items()})
    return env


# ------------------------------------------------------------------------------------------- jobs


def job_row(db: Any, job_id: str | uuid.UUID) -> Any:
    from app.models import Job

    with db.session() as s:
        return s.get(Job, uuid.UUID(str(job_id)))


def job_body(train: str, val: str | None, task: str, **hp: Any) -> dict[str, Any]:
    return {"task": task, "train_dataset": train, "validation_dataset": val,
            "method": {"name": "spafit", "n1": 1, "n2": 2, "rank": 4},
            "hyperparameters": {"epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "seed": 1, **hp}}


# ------------------------------------------------------------------------------------- a deployment of its own
@dataclass
class Deployment:
    client: Any  # the API in this process (TestClient: its requeue loop runs)
    headers: dict[str, str]  # a key of a tenant of its own, scope train
    db: Any
    env: dict[str, str]  # the worker's environment (to start another worker on the same deployment)
    worker: WorkerProcess


@contextlib.contextmanager
def own_deployment(make_settings: Callable[..., Any], pg_databases: Any, broker_url: str, prefix: str, base: str,
                   tmp_path: Path, name: str, **settings: Any) -> Iterator[Deployment]:
    """A deployment that faults may hit without touching the session's: a migrated database of its own, a worker
    process on `broker_url` under `prefix`, the API in this process and a tenant with a train key; `settings`
    (SPAFIT_* names in lower case) apply to the worker and the API alike. Everything is stopped and dropped after."""
    from fastapi.testclient import TestClient

    from app.db import Database
    from app.main import create_app
    from app.services import keys, migrate

    db_url = pg_databases.create(f"spafit_{name}")
    migrate.upgrade(db_url)
    db = Database.from_url(db_url)
    env = service_env(db_url, broker_url, prefix, base, tmp_path / "data", **settings)
    worker = WorkerProcess(env, tmp_path / f"{name}-worker.log").start()
    try:
        app = create_app(make_settings(database_url=db_url, broker_url=broker_url, broker_key_prefix=prefix,
                                       allowed_base_models=[base], default_base_model=base,
                                       **{**WORKER_SETTINGS, **settings}))
        with db.session() as s:
            tenant = keys.create_tenant(s, name)
            _, plaintext = keys.create_key(s, tenant.id, "test", ["train"])
        with TestClient(app) as client:
            yield Deployment(client, {"Authorization": f"Bearer {plaintext}"}, db, env, worker)
    finally:
        worker.stop()
        db.dispose()
        pg_databases.drop(db_url)
