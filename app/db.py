"""Engine and session factory. Postgres in server mode; SQLite (WAL, foreign keys on) when embedded.

Everything that talks to the registry goes through a `Database`: the API keeps one on `app.state.db`,
workers and the CLI build their own with `Database.from_settings(get_settings())`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, make_url, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from .settings import Settings, normalize_database_url


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the one writer
    cur.execute("PRAGMA foreign_keys=ON")  # off by default in SQLite
    cur.close()


def make_engine(url: str, *, connect_timeout: int = 5, echo: bool = False) -> Engine:
    """An engine for `url`. SQLite files get their folder created and the pragmas above; Postgres
    connections time out after `connect_timeout` seconds and are checked before use."""
    url = normalize_database_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30})  # wait up to 30 s for a writer
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    connect_args = {"connect_timeout": connect_timeout} if parsed.get_backend_name() == "postgresql" else {}
    return create_engine(url, echo=echo, pool_pre_ping=True, connect_args=connect_args)


class Database:
    """One engine and its session factory. Sessions do not expire on commit, so rows stay readable."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.sessionmaker = sessionmaker(bind=engine, expire_on_commit=False)

    @classmethod
    def from_url(cls, url: str, *, connect_timeout: int = 5) -> Database:
        return cls(make_engine(url, connect_timeout=connect_timeout))

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        return cls.from_url(settings.database_url, connect_timeout=settings.database_connect_timeout)

    def session(self) -> Session:
        """A new session; the caller commits and closes it (or use `transaction()`)."""
        return self.sessionmaker()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session that commits when the block ends normally and rolls back if it raises."""
        with self.sessionmaker() as session, session.begin():
            yield session

    def ping(self) -> None:
        """A real round trip to the database; raises if it is unreachable."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1")).scalar_one()

    def dispose(self) -> None:
        self.engine.dispose()


def lock_tenant(session: Session, tenant_id: object) -> None:
    """Take tenant `tenant_id`'s row lock for the rest of the transaction: writers that read the tenant's state and
    then write by it (its storage quota, its webhook turn) take turns. Postgres: FOR NO KEY UPDATE (rows that merely
    reference the tenant, e.g. a job's new webhook delivery, do not wait for it). SQLite has no row locks and begins
    a transaction only at its first write, so every writer would read first: a no-op write takes the database's
    write lock instead."""
    from .models import Tenant  # the models import this module's neighbours, not the other way round

    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(Tenant).where(Tenant.id == tenant_id).values(name=Tenant.name))
    else:
        session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True))
