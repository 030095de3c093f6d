"""Shared fixtures for the service tests: a FRESH Postgres database per test session (created through the
`test` database, migrated with Alembic, dropped at the end) and a per-session Redis key prefix, so parallel
runs on one machine never see each other's data. Everything here is lazy: core tests that use none of these
fixtures never touch Postgres, Redis or the app.

Environment: SPAFIT_TEST_PG_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test, the maintenance
database used to create and drop the per-session one) and SPAFIT_TEST_REDIS_URL (default
redis://127.0.0.1:6379/0). Start both with /work/shared/services-up.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

# Set before anything imports torch or the Hugging Face libraries (this file is loaded first), and inherited by
# the processes the tests start unless they set their own:
# - one torch thread per process: the suite runs several processes on few cores, and two threads spinning
#   against each other made single tests 50-100x slower (a 0.6 s training test took 61 s next to its twin);
# - no Hugging Face Hub: this machine has no network, and a Hub call fails at once instead of retrying ~45 s.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PG_ADMIN_URL = os.environ.get("SPAFIT_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SPAFIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


# --------------------------------------------------------------------------------------------- Postgres


class PostgresDatabases:
    """Creates uniquely named databases next to the maintenance database and drops them again."""

    def __init__(self, admin_url: str):
        from sqlalchemy import create_engine, make_url
        from sqlalchemy.exc import OperationalError

        from app.settings import normalize_database_url

        self.base = make_url(normalize_database_url(admin_url))
        self.admin = create_engine(self.base, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
        self.created: list[str] = []
        try:
            with self.admin.connect():
                pass
        except OperationalError as e:
            pytest.fail(f"Postgres is not reachable at {self.base.render_as_string()} ({e.orig}); "
                        "start it with /work/shared/services-up or set SPAFIT_TEST_PG_URL", pytrace=False)

    def create(self, prefix: str = "spafit_test") -> str:
        from sqlalchemy import text

        name = f"{prefix}_{secrets.token_hex(6)}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return self.base.set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        from sqlalchemy import make_url, text

        name = make_url(url).database
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        if name in self.created:
            self.created.remove(name)

    def close(self) -> None:
        for name in list(self.created):
            self.drop(self.base.set(database=name).render_as_string(hide_password=False))
        self.admin.dispose()


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[PostgresDatabases]:
    dbs = PostgresDatabases(PG_ADMIN_URL)
    yield dbs
    dbs.close()


@pytest.fixture(scope="session")
def pg_url(pg_databases: PostgresDatabases) -> str:
    """A Postgres database for this test session, migrated to head. Tests share it; they isolate themselves
    by creating their own tenants (every query is tenant-scoped)."""
    from app.services import migrate

    url = pg_databases.create()
    migrate.upgrade(url)
    return url


@pytest.fixture
def empty_pg_url(pg_databases: PostgresDatabases) -> Iterator[str]:
    """A fresh, unmigrated Postgres database for one test (dropped afterwards)."""
    url = pg_databases.create("spafit_mig")
    yield url
    pg_databases.drop(url)


@pytest.fixture(scope="session")
def db(pg_url: str) -> Iterator[Any]:
    """An `app.db.Database` on the session database, for arranging and inspecting rows directly."""
    from app.db import Database

    database = Database.from_url(pg_url)
    yield database
    database.dispose()


# --------------------------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_prefix() -> str:
    """A key prefix unique to this test session; give it to everything that writes to Redis."""
    return f"spafit_test_{secrets.token_hex(6)}:"


@pytest.fixture(scope="session")
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture(scope="session")
def redis_client(redis_url: str, redis_prefix: str) -> Iterator[Any]:
    """A Redis client; every key under `redis_prefix` is deleted when the session ends."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.ConnectionError as e:
        pytest.fail(f"Redis is not reachable at {redis_url} ({e}); start it with /work/shared/services-up",
                    pytrace=False)
    yield client
    keys = list(client.scan_iter(match=f"{redis_prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


# --------------------------------------------------------------------------------------------- app


@pytest.fixture
def make_settings(pg_url: str, redis_client: Any, redis_url: str, redis_prefix: str, tmp_path: Any,
                  monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """Settings for a server-mode app on the session database and Redis; keyword overrides replace fields.
    SPAFIT_* variables of the calling shell and any .env file are ignored."""
    from app.settings import Settings

    for name in list(os.environ):
        if name.startswith("SPAFIT_") and not name.startswith("SPAFIT_TEST_"):
            monkeypatch.delenv(name)

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = dict(mode="server", database_url=pg_url, broker_url=redis_url,
                                      broker_key_prefix=redis_prefix, data_dir=tmp_path / "data",
                                      readiness_timeout=3.0,
                                      # jobs other tests hold queued on purpose are never re-sent mid-suite
                                      job_claim_timeout_s=3600.0,
                                      preload_base_model=False)  # serving tests opt in, with a tiny backbone
        values.update(overrides)
        return Settings(_env_file=None, **values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Any]) -> Any:
    return make_settings()


@pytest.fixture
def app(settings: Any) -> Any:
    from app.main import create_app

    return create_app(settings)


@pytest.fixture
def client(app: Any) -> Iterator[Any]:
    """A TestClient with the app's lifespan running."""
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        yield c


@dataclass
class TenantKey:
    tenant_id: uuid.UUID
    key_id: uuid.UUID
    key: str
    scopes: list[str] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture
def tenant_key(db: Any) -> Callable[..., TenantKey]:
    """`tenant_key("train")` -> a new tenant with one key of those scopes; `tenant_key("predict",
    tenant=other.tenant_id)` adds a key to an existing tenant."""
    from app.services import keys

    def make(*scopes: str, tenant: uuid.UUID | None = None, name: str = "test") -> TenantKey:
        scopes = scopes or ("train",)
        with db.session() as session:
            tenant_id = tenant or keys.create_tenant(session, f"t-{secrets.token_hex(6)}").id
            row, plaintext = keys.create_key(session, tenant_id, name, list(scopes))
            return TenantKey(tenant_id=tenant_id, key_id=row.id, key=plaintext, scopes=list(row.scopes))

    return make


# --------------------------------------------------------------------------------------------- parallel runs

# `make test` runs the suite on several pytest-xdist processes with `--dist loadfile`: each file runs whole on
# one process, so a module-scoped fixture is set up once. Each process is its own pytest session, with its own
# database and Redis prefix (above) and its own session fixtures: a process that runs a test on the live
# processes (tests/live.py's worker and API server) starts its own set, so live files run side by side instead
# of queueing for one worker. (Grouping them by `xdist_group` would share one set, but `--dist loadgroup`
# silently ignores groups on pytest 9.2: pytest-dev/pytest-xdist#1386.)
# Tests on the live processes are marked `live` here (`-m live`), and under xdist their files come first, so no
# long chain of jobs starts last (with `--no-loadscope-reorder` files are handed out in this order).
LIVE_FIXTURES = frozenset({"worker", "live_server_process", "embedded_server", "browser"})


@pytest.hookimpl(tryfirst=True)  # before `-m` selects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # `make test`'s serial phase collects only the files whose text says `mark.serial` (the Makefile's
    # SERIAL_TESTS): a test made serial some other way would run in neither phase, so it stops the run here.
    unseen = sorted({str(item.path) for item in items if item.get_closest_marker("serial")
                     and "mark.serial" not in item.path.read_text()})
    if unseen:
        raise pytest.UsageError(f"serial tests in files that do not say `mark.serial` (make test would skip them): "
                                f"{unseen}; mark them with @pytest.mark.serial or pytestmark")
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu and not _cuda_available():  # CUDA checks run on a GPU machine (`pytest -m gpu`); here they are
        config.hook.pytest_deselected(items=gpu)  # deselected, not skipped: a skip in CI would hide a failure
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
    live_files: set[str] = set()
    for item in items:
        if set(getattr(item, "fixturenames", ())) & LIVE_FIXTURES:
            item.add_marker(pytest.mark.live)
            live_files.add(item.nodeid.split("::")[0])
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the same order on every xdist process; files stay whole
        first = {}
        for i, item in enumerate(items):
            first.setdefault(item.nodeid.split("::")[0], i)

        def key(i: int) -> tuple[int, int, int]:
            f = items[i].nodeid.split("::")[0]
            return (f not in live_files, first[f], i)

        items[:] = [items[i] for i in sorted(range(len(items)), key=key)]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# A test may take over SLOW_TEST_S only with its reason in its docstring, on a line starting `Slow:`; the run's
# summary names the ones without (a warning, not a failure: durations depend on the machine's load).
SLOW_TEST_S = float(os.environ.get("SPAFIT_TEST_SLOW_S", "60"))
_slow_without_reason: list[tuple[str, float]] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.duration > SLOW_TEST_S:
        doc = getattr(getattr(item, "function", None), "__doc__", None) or ""
        if not any(line.strip().startswith("Slow:") for line in doc.splitlines()):
            report.user_properties.append(("slow_without_reason", round(report.duration, 1)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:  # on the xdist controller too
    for name, seconds in report.user_properties:
        if name == "slow_without_reason":
            _slow_without_reason.append((report.nodeid, seconds))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _slow_without_reason:
        terminalreporter.section(f"tests over {SLOW_TEST_S:.0f} s without a `Slow:` reason in their docstring")
        for nodeid, seconds in sorted(_slow_without_reason, key=lambda x: -x[1]):
            terminalreporter.line(f"{seconds:7.1f}s {nodeid}")


# The service as real processes (worker, live server, a trained job), shared by every test folder.
from tests.live import live_server, live_server_process, make_key, tiny_base, trained, worker, worker_env  # noqa: E402,F401
