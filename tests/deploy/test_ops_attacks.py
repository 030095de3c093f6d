"""Operator-side attacks: migrations over real data, two processes migrating one fresh database, bad settings.

Each test here failed on the code it was written against, for the reason its docstring gives
(report: /work/notes/hunt_ops.md). They need no Postgres or Redis: SQLite and subprocesses only.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from app.db import make_engine
from app.services import migrate

ROOT = Path(__file__).resolve().parents[2]
SPAFIT = [sys.executable, "-m", "app.cli"]
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SHA = "a" * 64


# ------------------------------------------------------------------------------- migrations over data
def _seed(url: str) -> dict[str, str]:
    """One row in each of the core tables, written with plain SQL at whatever revision `url` is at."""
    ids = {t: uuid.uuid4().hex for t in ("tenants", "datasets", "jobs", "tasks", "adapter_versions", "api_keys")}
    engine = make_engine(url)
    cols = {t: {c["name"] for c in inspect(engine).get_columns(t)} for t in inspect(engine).get_table_names()}
    rows = {
        "tenants": {"id": ids["tenants"], "name": "acme", "created_at": NOW},
        "blobs": {"sha256": SHA, "size": 1, "data": b"x", "created_at": NOW},
        "datasets": {"id": ids["datasets"], "tenant_id": ids["tenants"], "name": "d", "format": "csv",
                     "source": "upload", "rows": 1, "sha256": SHA, "size_bytes": 1, "created_at": NOW},
        "jobs": {"id": ids["jobs"], "tenant_id": ids["tenants"], "task_name": "t", "kind": "train",
                 "status": "succeeded", "train_dataset_id": ids["datasets"], "created_at": NOW},
        "job_events": {"job_id": ids["jobs"], "seq": 1, "type": "status", "created_at": NOW},
        "tasks": {"id": ids["tasks"], "tenant_id": ids["tenants"], "name": "t", "created_at": NOW},
        "adapter_versions": {"id": ids["adapter_versions"], "task_id": ids["tasks"], "version": 1,
                             "blob_sha256": SHA, "job_id": ids["jobs"], "created_at": NOW},
    }
    with engine.begin() as conn:
        for table, values in rows.items():
            # every other NOT NULL column without a default gets a harmless value of its type
            for c in inspect(conn).get_columns(table):
                if c["name"] in values or c["nullable"] or c.get("default") is not None:
                    continue
                t = str(c["type"]).upper()
                values[c["name"]] = (NOW if "DATE" in t or "TIME" in t else 0 if "INT" in t else False if "BOOL" in t
                                     else "{}" if "JSON" in t else 0.0 if "FLOAT" in t else c["name"][:8])
            values = {k: v for k, v in values.items() if k in cols[table]}
            conn.execute(text(f"INSERT INTO {table} ({', '.join(values)}) VALUES ({', '.join(':' + k for k in values)})"),
                         values)
    engine.dispose()
    return ids


def _count(url: str, sql: str) -> object:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql)).scalar()
    finally:
        engine.dispose()


def test_sqlite_upgrade_from_0005_keeps_job_events_and_the_version_job_link(tmp_path):
    """0006 rebuilds `jobs` on SQLite (batch mode: copy, DROP TABLE jobs, rename) with `PRAGMA foreign_keys=ON`
    (app/db.py), so the DROP cascades: every job event (and webhook delivery) is deleted and every
    adapter_versions.job_id is set to NULL. An embedded install auto-migrates at startup, so upgrading the
    package silently wipes the history of every job."""
    url = f"sqlite:///{tmp_path / 'spafit.db'}"
    migrate.upgrade(url, "0005")
    ids = _seed(url)
    assert _count(url, "SELECT count(*) FROM job_events") == 1
    migrate.upgrade(url)
    assert _count(url, "SELECT count(*) FROM jobs") == 1
    assert _count(url, "SELECT count(*) FROM job_events") == 1, "upgrading to 0006 deleted the job's events"
    assert _count(url, "SELECT job_id FROM adapter_versions") == ids["jobs"], \
        "upgrading to 0006 unlinked the adapter version from the job that produced it"


def test_sqlite_upgrade_from_0001_with_a_job_succeeds(tmp_path):
    """0002 rebuilds `datasets` on SQLite with foreign keys on: DROP TABLE datasets violates jobs'
    train_dataset_id foreign key, so an embedded database at 0001 that holds any job can never be upgraded
    (IntegrityError: FOREIGN KEY constraint failed; the service refuses to start)."""
    url = f"sqlite:///{tmp_path / 'spafit.db'}"
    migrate.upgrade(url, "0001")
    _seed(url)
    migrate.upgrade(url)
    assert migrate.is_current(url)
    assert _count(url, "SELECT count(*) FROM job_events") == 1


# --------------------------------------------------------------------- two processes, one fresh database
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPAFIT_")}
    env.update(SPAFIT_DATA_DIR=str(tmp_path / "data"), SPAFIT_PRELOAD_BASE_MODEL="false", OMP_NUM_THREADS="1",
               **extra)
    return env


def test_serve_with_several_api_processes_starts_on_a_fresh_embedded_data_dir(tmp_path):
    """`spafit serve --no-worker --workers 3` on a fresh data dir: app/cli/running.py migrates up front only
    when it also starts a worker, so each uvicorn process runs `migrate.upgrade` in its startup at the same
    time on one SQLite file (only Postgres takes a lock, migrations/env.py). One fails with `table blobs already
    exists` / `duplicate column name`, and uvicorn then stops the whole service ("Child process failed to
    start, stopping the parent process")."""
    port = _free_port()
    proc = subprocess.Popen([*SPAFIT, "serve", "--no-worker", "--workers", "3", "--port", str(port)],
                            cwd=tmp_path, env=_clean_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline, ready = time.monotonic() + 90, False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as r:
                    ready = r.status == 200
            except (urllib.error.URLError, OSError):
                pass
            if ready:
                time.sleep(3)  # a process that lost the race takes the parent down a moment later
                ready = proc.poll() is None
                break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        out = proc.stdout.read()
    assert ready, f"the service did not come up:\n{out[-3000:]}"
    assert "already exists" not in out and "duplicate column" not in out, out[-3000:]


# ------------------------------------------------------------------------------------------ bad settings
def _run(tmp_path: Path, args: list[str], timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SPAFIT, *args], cwd=tmp_path, env=_clean_env(tmp_path, **env), capture_output=True,
                          text=True, timeout=timeout)


def test_an_invalid_log_level_is_a_settings_error_naming_it(tmp_path):
    """SPAFIT_LOG_LEVEL is a free string (app/settings.py): `spafit db upgrade` accepts LOUD, and `spafit serve`
    dies with a bare traceback (`ValueError: Unknown level: 'LOUD'` from logging.setLevel in
    app/main.py _configure_logging) instead of exit 2 naming the setting, as every other bad SPAFIT_* value does."""
    r = _run(tmp_path, ["serve", "--no-worker", "--port", str(_free_port())], timeout=90, SPAFIT_LOG_LEVEL="LOUD")
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out[-2000:]
    assert r.returncode == 2 and "log_level" in out.lower(), out[-2000:]


@pytest.mark.parametrize("url", ["notaurl", "foo://x"])
def test_a_malformed_database_url_is_a_settings_error_naming_it(tmp_path, url):
    """A SPAFIT_DATABASE_URL that is not a SQLAlchemy URL (or names no installed dialect) passes the settings and
    reaches create_engine: `spafit db upgrade` and `spafit serve` end in a traceback (ArgumentError /
    NoSuchModuleError), which SpafitGroup (app/cli/common.py exit_code_for) does not map to an exit code."""
    r = _run(tmp_path, ["db", "upgrade"], SPAFIT_DATABASE_URL=url)
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out[-2000:]
    assert r.returncode == 2 and "database_url" in out.lower(), out[-2000:]


def test_an_invalid_engine_device_is_a_settings_error():
    """SPAFIT_ENGINE_DEVICE is documented as `auto, cpu, cuda, cuda:N` but accepts anything: with `tpu` the API
    starts, /healthz says ok, and every predict / /readyz fails with torch's "Expected one of cpu, cuda, ...
    device type" message, which never names the setting."""
    from pydantic import ValidationError

    from app.settings import Settings

    with pytest.raises(ValidationError, match="engine_device"):
        Settings(engine_device="tpu", data_dir=Path("/nonexistent/spafit-ops"))


def test_a_broker_url_with_an_unknown_transport_is_a_settings_error(tmp_path):
    """SPAFIT_BROKER_URL=nope://x passes the settings: `spafit serve` starts with /readyz failing on
    "KeyError (details in the server log)" while jobs are accepted (202) and never sent, and `spafit worker`
    dies with a traceback (`KeyError: 'No such transport: nope'` from kombu). Neither names the setting."""
    from pydantic import ValidationError

    from app.settings import Settings

    with pytest.raises(ValidationError, match="broker_url"):
        Settings(broker_url="nope://x", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------ admin CLI
def test_keys_against_an_unmigrated_database_says_to_migrate(tmp_path):
    """`spafit keys create/list` against a database that `spafit db upgrade` never ran on (a first deploy, or a
    package upgrade in server mode where auto-migrate is off) prints the raw SQL error ("no such table:
    tenants" / "no such column: tenants.webhook_secret") and exits 5, which the CLI documents as
    *unreachable* (app/cli/common.py maps every OperationalError to EXIT_UNREACHABLE); the database is
    reachable, and the API in the same situation says "run `spafit db upgrade`" (migrate.check_current)."""
    r = _run(tmp_path, ["keys", "list", "--tenant", "acme"])
    out = r.stdout + r.stderr
    assert r.returncode != 5, f"exit 5 (unreachable) for a reachable database that is not migrated:\n{out}"
    assert "spafit db upgrade" in out, out[-2000:]


def test_keys_against_a_database_at_an_older_revision_says_to_migrate(tmp_path):
    """The same at an older revision (the package was upgraded, `spafit db upgrade` not run yet): `spafit keys
    create` prints `(sqlite3.OperationalError) no such column: tenants.webhook_secret` and the whole SELECT,
    exit 5 (unreachable)."""
    migrate.upgrade(f"sqlite:///{tmp_path / 'data' / 'spafit.db'}", "0004")
    r = _run(tmp_path, ["keys", "create", "--tenant", "acme", "--scope", "admin"])
    out = r.stdout + r.stderr
    assert r.returncode != 5, f"exit 5 (unreachable) for a reachable database that is not migrated:\n{out}"
    assert "spafit db upgrade" in out and "SELECT" not in out, out[-2000:]


def test_serve_refuses_a_port_out_of_range(monkeypatch, tmp_path):
    """`spafit serve --port 99999` is accepted (click's plain int, app/cli/running.py); uvicorn logs
    "running on http://127.0.0.1:99999" while the socket is bound to 99999 mod 65536 = 34463, so the service
    answers on a port nobody asked for and the log line lies."""
    import uvicorn
    from click.testing import CliRunner

    from app.cli import main
    from app.settings import get_settings

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: started.append(kw.get("port")))
    for k in [k for k in os.environ if k.startswith("SPAFIT_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("SPAFIT_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    try:
        r = CliRunner().invoke(main, ["serve", "--no-worker", "--port", "99999"])
    finally:
        get_settings.cache_clear()
    assert started == [] and r.exit_code == 2, f"uvicorn started on port {started} (exit {r.exit_code})"


# ------------------------------------------------------------------------------------------ retention
@pytest.mark.parametrize("setting", [{"event_retention_days": float("inf")}, {"event_retention_days": 1e9},
                                     {"gc_blob_grace_s": float("inf")}])
def test_keeping_events_forever_does_not_stop_blob_collection(tmp_path, setting):
    """SPAFIT_EVENT_RETENTION_DAYS=inf (the natural "keep events forever"), or any value past timedelta's range,
    passes the settings (only gt=0) and then `retention.collect` raises OverflowError building the cutoff
    (app/services/retention.py collect: `now - timedelta(days=...)`) before it reaches the blobs: `spafit db gc`
    is a traceback, and the API's collector (_gc_loop) fails every round with a warning, so no unreferenced blob
    or finished job's checkpoint is ever freed again."""
    from pydantic import ValidationError

    from app.db import Database
    from app.services import retention
    from app.settings import Settings

    url = f"sqlite:///{tmp_path / 'spafit.db'}"
    try:
        settings = Settings(data_dir=tmp_path, database_url=url, **setting)
    except ValidationError:
        return  # refused up front, naming the setting: fine too
    migrate.upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO blobs (sha256, size, data, created_at) VALUES (:s, 1, :d, :t)"),
                     {"s": SHA, "d": b"x", "t": NOW - dt.timedelta(days=400)})
    engine.dispose()
    db = Database.from_url(url)
    try:
        report = retention.collect(db, settings, now=NOW)
    finally:
        db.dispose()
    if setting.get("gc_blob_grace_s") == float("inf"):
        assert report.blobs_deleted == 0  # an infinite grace keeps blobs: it must just not crash
    else:
        assert report.blobs_deleted == 1, report


@pytest.mark.parametrize("setting", [{"job_heartbeat_stale_s": float("inf")}, {"job_claim_timeout_s": float("inf")}])
def test_an_infinite_timeout_does_not_stop_the_requeuer(tmp_path, setting):
    """The same for the requeuer: SPAFIT_JOB_HEARTBEAT_STALE_S=inf or SPAFIT_JOB_CLAIM_TIMEOUT_S=inf ("never
    time out") is accepted, and `jobs.requeue_orphans` (app/services/jobs.py: `now - timedelta(seconds=...)`)
    raises OverflowError on every round, so a queued job whose broker message was lost is never re-sent."""
    from pydantic import ValidationError

    from app.db import Database
    from app.services import jobs
    from app.settings import Settings

    url = f"sqlite:///{tmp_path / 'spafit.db'}"
    try:
        settings = Settings(data_dir=tmp_path, database_url=url, **setting)
    except ValidationError:
        return  # refused up front, naming the setting: fine too
    migrate.upgrade(url)
    db = Database.from_url(url)
    try:
        jobs.requeue_orphans(db, lambda *a, **kw: None, settings)
    finally:
        db.dispose()


@pytest.mark.parametrize("status", ["cancelled", "failed"])
def test_the_partial_output_of_an_ended_batch_prediction_is_collected(tmp_path, status):
    """A batch prediction stores its output as `batch_chunks` rows while it runs (worker/batch.py). If it is
    cancelled or fails, the chunks already stored are unreachable: results are served only for a job that
    succeeded (app/services/batch.py check_results: 409 `results-not-ready`) and a final job never resumes. But
    nothing removes them: the worker leaves them, and the collector (app/services/retention.py collect) drops
    checkpoints, trial results, events and blobs, never chunks. Up to SPAFIT_BATCH_MAX_ROWS_PER_JOB rows of output
    per cancelled job stay in the database until someone deletes the job by hand."""
    from app.db import Database
    from app.services import retention
    from app.settings import Settings

    url = f"sqlite:///{tmp_path / 'spafit.db'}"
    migrate.upgrade(url)
    ids = _seed(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET kind = 'predict', status = :st, finished_at = :t"),
                     {"st": status, "t": NOW - dt.timedelta(days=400)})
        conn.execute(text("INSERT INTO batch_chunks (job_id, chunk, rows, data, created_at) VALUES (:j, 0, 512, :d, :t)"),
                     {"j": ids["jobs"], "d": b"x" * 4096, "t": NOW - dt.timedelta(days=400)})
    engine.dispose()
    db = Database.from_url(url)
    try:
        retention.collect(db, Settings(data_dir=tmp_path, database_url=url), now=NOW)
    finally:
        db.dispose()
    assert _count(url, "SELECT count(*) FROM batch_chunks") == 0, \
        f"the output chunks of a {status} batch prediction (never downloadable) outlived the collector"
