"""Operations attacks: migrations stepped down over data, and the `spafit` commands an operator runs (`serve`,
`worker`, `db`) given bad settings or an unreachable database.

Each test failed on the code it was written against, for the reason its docstring gives. They start only
short-lived `spafit` processes that exit at once (a settings error) and use SQLite or a port nothing listens on;
the shared Postgres and Redis are never touched.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from app.db import make_engine
from app.services import migrate
from tests.live import free_port

ROOT = Path(__file__).resolve().parents[2]
SPAFIT = [sys.executable, "-m", "app.cli"]
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SHA = "b" * 64
SERVER = {"SPAFIT_MODE": "server", "SPAFIT_DATABASE_URL": "postgresql://127.0.0.1:5432/test",
          "SPAFIT_BROKER_URL": "redis://127.0.0.1:6379/9", "SPAFIT_PRELOAD_BASE_MODEL": "false"}


def _run(args: list[str], tmp_path: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPAFIT_")}
    clean.update(SPAFIT_DATA_DIR=str(tmp_path / "data"), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env)
    return subprocess.run([*SPAFIT, *args], cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=timeout)


def _one_clear_line(r: subprocess.CompletedProcess[str], *words: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for word in words:
        assert word in lines[0], r.stderr


# ------------------------------------------------------------------------------- migrations stepped down
def _insert_copy(conn, table: str, **changes: object) -> None:
    """A copy of the one row of `table`, with `changes` (every other column as it is)."""
    cols = [c["name"] for c in inspect(conn).get_columns(table) if c["name"] not in changes]
    conn.execute(text(f"INSERT INTO {table} ({', '.join([*changes, *cols])}) "
                      f"SELECT {', '.join([':' + k for k in changes] + cols)} FROM {table}"), changes)


def test_sqlite_downgrade_below_batch_jobs_keeps_the_database_migratable(tmp_path):
    """Stepping an embedded database back below 0006 deletes the batch prediction / evaluation jobs, but SQLite
    migrates with foreign keys off (migrations/env.py), so their events (and webhook deliveries) stayed behind
    pointing at no job: the downgrade raised "the migration left rows whose foreign keys point nowhere" after it
    had committed, and every later `spafit db upgrade` (and the embedded server's start, which auto-migrates)
    failed the same way for good. The training job and its events must survive; the batch job's go with it."""
    from tests.deploy.test_ops_attacks import _seed  # one row per core table at any revision

    url = f"sqlite:///{tmp_path / 'spafit.db'}"
    migrate.upgrade(url)
    ids = _seed(url)
    batch = uuid.uuid4().hex
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            _insert_copy(conn, "jobs", id=batch, kind="predict")
            conn.execute(text("INSERT INTO job_events (job_id, seq, type, created_at, data) "
                              "VALUES (:j, 1, 'status', :n, '{}')"), {"j": batch, "n": NOW})
        migrate.downgrade(url, "0005")
        migrate.upgrade(url)
        assert migrate.is_current(url)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT id FROM jobs")).scalars().all() == [ids["jobs"]]
            assert conn.execute(text("SELECT job_id FROM job_events")).scalars().all() == [ids["jobs"]]
            assert conn.execute(text("PRAGMA foreign_key_check")).all() == []
    finally:
        engine.dispose()


# ------------------------------------------------------------------------------------ settings at start
def test_the_worker_names_a_bad_setting_in_one_line(tmp_path):
    """`spafit worker` handed Celery the app's import path, so a bad SPAFIT_* value surfaced as Celery's "Unable to
    load celery application" with a 30-line traceback through importlib; `serve` and `db` said it in one line."""
    r = _run(["worker"], tmp_path, **SERVER, SPAFIT_JOB_HEARTBEAT_INTERVAL_S="-1")
    assert r.returncode == 2, r.stderr[-3000:]
    _one_clear_line(r, "SPAFIT_JOB_HEARTBEAT_INTERVAL_S")


def test_a_bad_setting_is_one_line_naming_the_variable(tmp_path):
    """Settings errors printed pydantic's text: several lines per error, a docs link, and (for the checks across
    settings) the input dict of every setting. One line, with the variable's SPAFIT_ name."""
    r = _run(["serve", "--no-worker", "--port", str(free_port())], tmp_path, **SERVER, SPAFIT_MAX_UPLOAD_BYTES="abc")
    assert r.returncode == 2
    _one_clear_line(r, "SPAFIT_MAX_UPLOAD_BYTES", "'abc'")
    r = _run(["db", "upgrade"], tmp_path, **{**SERVER, "SPAFIT_DATABASE_URL": "sqlite:///x.db"})
    assert r.returncode == 2
    _one_clear_line(r, "SQLite")
    assert "input_value" not in r.stderr


@pytest.mark.parametrize(("name", "value"), [
    ("SPAFIT_REDIS_URL", "nonsense"),
    ("SPAFIT_REDIS_URL", "redis://:notaport/0"),
    ("SPAFIT_BROKER_URL", "redis://:notaport/0"),
    ("SPAFIT_BROKER_URL", "redis://127.0.0.1:99999/0"),
])
def test_a_malformed_redis_or_broker_url_is_refused_at_start(tmp_path, name, value):
    """Only the broker URL's scheme was checked: a Redis URL with another scheme or a port that is not a number
    passed the settings and `spafit serve` died while building the app (ValueError from redis-py or urllib, a
    60-line traceback, exit 1); the worker likewise."""
    for command in (["serve", "--no-worker", "--port", str(free_port())], ["worker"]):
        r = _run(command, tmp_path, **{**SERVER, name: value})
        assert r.returncode == 2, (command, r.stderr[-3000:])
        _one_clear_line(r, name)


# ---------------------------------------------------------------------------------- database unreachable
def test_db_upgrade_against_an_unreachable_database_is_one_line(tmp_path):
    """The driver's error came with SQLAlchemy's "(Background on this error at: https://sqlalche.me/...)" and
    psycopg's hint on lines of their own."""
    port = free_port()  # nothing listens there
    r = _run(["db", "upgrade"], tmp_path, **{**SERVER, "SPAFIT_DATABASE_URL": f"postgresql://127.0.0.1:{port}/x"})
    assert r.returncode == 5
    _one_clear_line(r, str(port))
    assert "sqlalche.me" not in r.stderr


# ------------------------------------------------------------------------------- a database out of step
def _sqlite_at(tmp_path: Path, revision: str) -> str:
    url = f"sqlite:///{tmp_path / 'spafit.db'}"
    migrate.upgrade(url, revision)
    return url


def test_db_upgrade_on_a_database_ahead_of_the_code_says_so(tmp_path):
    """A database a newer release migrated: `spafit db upgrade` said only "Can't locate revision identified by
    '0099'" (exit 2, a usage error), and `spafit keys` told the operator to run `spafit db upgrade`, which cannot
    help. Both now say the database is ahead of this code."""
    url = _sqlite_at(tmp_path, "head")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    for command in (["db", "upgrade"], ["keys", "list", "--tenant", "acme"]):
        r = _run(command, tmp_path, SPAFIT_DATABASE_URL=url)
        assert r.returncode == 1, (command, r.stderr)
        _one_clear_line(r, "0099", "does not know")


def test_a_migration_that_fails_is_one_line_and_leaves_the_revision(tmp_path):
    """A migration whose statement fails (here a table made by hand under the name 0006 creates) printed, on
    Postgres, a 90-line traceback ending in the CREATE TABLE statement and, on SQLite, the statement over three
    lines with exit 5 (unreachable). One line: what failed and the revision the database is left at."""
    url = _sqlite_at(tmp_path, "0005")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE batch_chunks (x INTEGER)"))
    engine.dispose()
    r = _run(["db", "upgrade"], tmp_path, SPAFIT_DATABASE_URL=url)
    assert r.returncode == 1, r.stderr[-3000:]
    _one_clear_line(r, "batch_chunks", "0005")
    assert migrate.current(url) == "0005"
    engine = make_engine(url)
    with engine.connect() as conn:  # and nothing of 0006 stayed (SQLite ran its DDL outside any transaction)
        jobs_sql = conn.execute(text("SELECT sql FROM sqlite_master WHERE name = 'jobs'")).scalar()
    engine.dispose()
    assert "'predict'" not in jobs_sql, "0006 was half applied: jobs was rebuilt for the new kinds"


def test_several_db_upgrades_at_once_on_a_fresh_sqlite_file_all_succeed(tmp_path):
    """Postgres migrations take an advisory lock; SQLite ones took none, ran every DDL outside a transaction and
    committed after each revision, so processes migrating one file at once read the same revision and ran the
    same ALTERs: all but one failed ("duplicate column name: time_limit_s", "expected to match one row when
    updating '0001' to '0002'"). Now the write lock is taken before the revision is read and held to the end."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPAFIT_")}
    clean.update(SPAFIT_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([*SPAFIT, "db", "upgrade"], cwd=tmp_path, env=clean, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert all(rc == 0 for rc, _, _ in outs), outs
    assert migrate.is_current(f"sqlite:///{tmp_path / 'data' / 'spafit.db'}")


def test_a_sqlite_migration_that_would_leave_dangling_rows_changes_nothing(tmp_path):
    """The foreign-key check of a SQLite migration ran after its commit: the schema was already changed (and the
    revision moved) when `spafit db upgrade` failed with a traceback. Now it runs before the commit, and the
    whole migration is rolled back with one line saying why."""
    import sqlite3

    url = _sqlite_at(tmp_path, "0005")
    conn = sqlite3.connect(tmp_path / "spafit.db")
    conn.execute("PRAGMA foreign_keys=OFF")  # a row pointing at no job, as a crash or a hand edit leaves
    conn.execute("INSERT INTO job_events (job_id, seq, type, created_at, data) VALUES ('ffff', 1, 'x', '2026-01-01', "
                 "'{}')")
    conn.commit()
    conn.close()
    r = _run(["db", "upgrade"], tmp_path, SPAFIT_DATABASE_URL=url)
    assert r.returncode == 1, r.stderr[-3000:]
    _one_clear_line(r, "job_events", "nothing was changed")
    assert migrate.current(url) == "0005"
    engine = make_engine(url)
    try:
        assert "batch_chunks" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()
