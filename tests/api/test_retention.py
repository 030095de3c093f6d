"""Retention on the real Postgres: DELETE /v1/jobs/{id} for finished jobs (then their dataset can go), and the
collector (`retention.collect`, `spafit db gc`), which frees what nothing uses and never what is in use: a
running job's checkpoint, a dataset's bytes, an adapter version's archive, bytes stored a moment ago."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, text, update

from tests.api.helpers import assert_problem, unique_csv, upload


def _job(client, key, *, cancel: bool = True) -> tuple[str, str]:
    """(job id, dataset id): a job that never reaches a broker; cancelled (so finished) unless `cancel=False`."""
    client.app.state.send_job = lambda job_id: None
    ds = upload(client, unique_csv(), headers=key.headers)
    assert ds.status_code == 201, ds.text
    r = client.post("/v1/jobs", json={"task": f"ret-{uuid.uuid4().hex[:8]}", "train_dataset": ds.json()["id"]},
                    headers=key.headers)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    if cancel:
        assert client.post(f"/v1/jobs/{job_id}/cancel", headers=key.headers).json()["status"] == "cancelled"
    return job_id, ds.json()["id"]


def _put(db, data: bytes, *, age_s: float = 0) -> str:
    from app.models import Blob, utcnow
    from app.services import blobs

    with db.transaction() as s:
        sha = blobs.put(s, data)
        if age_s:
            s.execute(update(Blob).where(Blob.sha256 == sha).values(created_at=utcnow() - timedelta(seconds=age_s)))
    return sha


def _version_of(db, tenant_id, job_id: str, data: bytes) -> tuple[uuid.UUID, str]:
    """An adapter version row produced by `job_id`, active for its task (its archive: `data`)."""
    from app.models import AdapterVersion, Job, Task

    sha = _put(db, data, age_s=7200)
    with db.transaction() as s:
        job = s.get(Job, uuid.UUID(job_id))
        task = Task(tenant_id=tenant_id, name=job.task_name)
        s.add(task)
        s.flush()
        v = AdapterVersion(task_id=task.id, version=1, blob_sha256=sha, config={}, size_bytes=len(data), method={},
                           base_model="m", base_fingerprint="f", job_id=job.id)
        s.add(v)
        s.flush()
        task.active_version_id = v.id
        job.adapter_version_id = v.id
        return v.id, sha


def _wait_for_a_lock_wait(db, what: str) -> None:
    """Until some session of the database waits for a lock (a new transaction per look: pg_stat_activity is
    a snapshot taken once per transaction)."""
    deadline = time.monotonic() + 20
    while True:
        with db.engine.connect() as conn:
            if conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                 "AND wait_event_type = 'Lock'")).scalar():
                return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ DELETE


def test_delete_a_finished_job_then_its_dataset(client, db, tenant_key):
    from app.models import AdapterVersion, Blob, Job, JobEvent

    key = tenant_key("train")
    job_id, ds_id = _job(client, key)
    version_id, version_sha = _version_of(db, key.tenant_id, job_id, secrets.token_bytes(64))
    checkpoint = _put(db, secrets.token_bytes(100))
    with db.transaction() as s:
        s.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(checkpoint_sha256=checkpoint))

    assert_problem(client.delete(f"/v1/datasets/{ds_id}", headers=key.headers), 409)  # the job still names it
    r = client.delete(f"/v1/jobs/{job_id}", headers=key.headers)
    assert r.status_code == 204, r.text
    assert_problem(client.get(f"/v1/jobs/{job_id}", headers=key.headers), 404)
    assert_problem(client.get(f"/v1/jobs/{job_id}/events", headers=key.headers), 404)
    assert_problem(client.delete(f"/v1/jobs/{job_id}", headers=key.headers), 404)
    with db.session() as s:
        assert s.scalar(select(JobEvent.seq).where(JobEvent.job_id == uuid.UUID(job_id)).limit(1)) is None
        assert s.get(Blob, checkpoint) is None  # only the job used it
        version = s.get(AdapterVersion, version_id)  # the version it produced stays, servable, naming no job
        assert version is not None and version.job_id is None and s.get(Blob, version_sha) is not None
    assert client.delete(f"/v1/datasets/{ds_id}", headers=key.headers).status_code == 204


@pytest.mark.parametrize("status", ["queued", "running"])
def test_a_queued_or_running_job_cannot_be_deleted(client, db, tenant_key, status):
    from app.models import Job

    key = tenant_key("train")
    job_id, _ = _job(client, key, cancel=False)
    with db.transaction() as s:
        s.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(status=status))
    body = assert_problem(client.delete(f"/v1/jobs/{job_id}", headers=key.headers), 409, "conflict")
    assert status in body["detail"] and "cancel it first" in body["detail"]
    assert client.get(f"/v1/jobs/{job_id}", headers=key.headers).status_code == 200


def test_another_tenants_job_is_404_to_delete(client, tenant_key):
    owner, other = tenant_key("train"), tenant_key("train")
    job_id, _ = _job(client, owner)
    assert_problem(client.delete(f"/v1/jobs/{job_id}", headers=other.headers), 404, "not-found")
    assert client.get(f"/v1/jobs/{job_id}", headers=owner.headers).status_code == 200


def test_deleting_needs_the_train_scope(client, tenant_key):
    owner = tenant_key("train")
    job_id, _ = _job(client, owner)
    reader = tenant_key("predict", tenant=owner.tenant_id)
    assert_problem(client.delete(f"/v1/jobs/{job_id}", headers=reader.headers), 403)


def test_a_sweep_is_deleted_with_its_trials_and_a_trial_alone_is_409(client, db, tenant_key):
    from app.models import Job

    key = tenant_key("train")
    sweep_id, _ = _job(client, key)
    with db.transaction() as s:
        sweep = s.get(Job, uuid.UUID(sweep_id))
        sweep.kind = "sweep"
        trial = Job(tenant_id=sweep.tenant_id, kind="trial", task_name=sweep.task_name, base_model=sweep.base_model,
                    train_dataset_id=sweep.train_dataset_id, text_fields=[], method={}, hyperparameters={},
                    status="running", parent_job_id=sweep.id, result_sha256=_put(db, secrets.token_bytes(32)))
        s.add(trial)
        s.flush()
        trial_id = trial.id
    assert "trial" in assert_problem(client.delete(f"/v1/jobs/{trial_id}", headers=key.headers), 409)["detail"]
    assert "trial" in assert_problem(client.delete(f"/v1/jobs/{sweep_id}", headers=key.headers), 409)["detail"]
    with db.transaction() as s:
        s.execute(update(Job).where(Job.id == trial_id).values(status="succeeded"))
    assert client.delete(f"/v1/jobs/{sweep_id}", headers=key.headers).status_code == 204
    with db.session() as s:
        assert s.get(Job, trial_id) is None


def test_the_sdk_deletes_a_job(client, tenant_key):
    from spafit_client import Client
    from spafit_client.errors import ConflictError, NotFoundError

    key = tenant_key("train")
    done, _ = _job(client, key)
    queued, _ = _job(client, key, cancel=False)
    with Client("http://testserver", api_key=key.key, http_client=client) as sdk:
        with pytest.raises(ConflictError):
            sdk.jobs.delete(queued)
        sdk.jobs.delete(done)
        with pytest.raises(NotFoundError):
            sdk.jobs.get(done)


# ----------------------------------------------------------------------------------------------- collect


@pytest.fixture
def gc_db(empty_pg_url) -> Any:
    """A database of its own (migrated), so the collector's counts are exactly what this test arranged."""
    from app.db import Database
    from app.services import migrate

    migrate.upgrade(empty_pg_url)
    database = Database.from_url(empty_pg_url)
    yield database
    database.dispose()


def _arrange(db) -> dict[str, Any]:
    """One of everything the collector must keep, and of everything it must free."""
    from app.models import Dataset, Job, JobEvent, Tenant, utcnow
    from app.services import events

    old, now = utcnow() - timedelta(days=40), utcnow()
    b = {name: secrets.token_bytes(size) for name, size in
         [("dataset", 300), ("running_ckpt", 500), ("failed_ckpt", 700), ("version", 900), ("orphan", 1100),
          ("fresh_orphan", 1300), ("trial_result", 150), ("live_trial_result", 170)]}
    sha = {name: _put(db, data, age_s=0 if name == "fresh_orphan" else 7200) for name, data in b.items()}
    with db.transaction() as s:
        tenant = Tenant(name=f"gc-{secrets.token_hex(4)}")
        s.add(tenant)
        s.flush()
        ds = Dataset(tenant_id=tenant.id, name="d", format="csv", rows=1, columns=["text", "label"],
                     text_fields=["text"], label_field="label", sha256=sha["dataset"], size_bytes=300, report={})
        s.add(ds)
        s.flush()

        def job(status, ckpt=None, finished=None, **kw):
            j = Job(tenant_id=tenant.id, task_name="t", base_model="m", train_dataset_id=ds.id, text_fields=["text"],
                    method={}, hyperparameters={}, status=status, checkpoint_sha256=ckpt, finished_at=finished, **kw)
            s.add(j)
            s.flush()
            return j.id

        ids = {"running": job("running", sha["running_ckpt"]), "failed": job("failed", sha["failed_ckpt"], old),
               "recent": job("succeeded", None, now)}
        # A finished sweep's trial still pointing at its result (garbage), and a running sweep's (needed to pick
        # the best trial when the sweep settles).
        done_sweep, live_sweep = job("succeeded", None, now, kind="sweep"), job("running", kind="sweep")
        trials = {"done": job("succeeded", None, now, kind="trial", parent_job_id=done_sweep,
                              result_sha256=sha["trial_result"]),
                  "live": job("succeeded", None, now, kind="trial", parent_job_id=live_sweep,
                              result_sha256=sha["live_trial_result"])}
    for job_id in ids.values():
        for i in range(3):
            events.append(db, job_id, "progress", {"i": i})
    with db.transaction() as s:  # the running job's and the failed job's events are 40 days old
        s.execute(update(JobEvent).where(JobEvent.job_id.in_([ids["running"], ids["failed"]]))
                  .values(created_at=old))
    _, sha["version"] = _version_of(db, tenant.id, str(ids["recent"]), b["version"])
    return {"sha": sha, "bytes": b, "jobs": ids, "trials": trials}


def test_gc_frees_what_it_should_and_nothing_in_use(gc_db, make_settings):
    from app.models import Blob, Job, JobEvent
    from app.services import retention

    arranged = _arrange(gc_db)
    sha, b, ids = arranged["sha"], arranged["bytes"], arranged["jobs"]
    report = retention.collect(gc_db, make_settings(event_retention_days=30, gc_blob_grace_s=3600))
    assert (report.checkpoints_dropped, report.trial_results_dropped, report.events_pruned,
            report.blobs_deleted) == (1, 1, 3, 3), report
    assert report.bytes_freed == len(b["failed_ckpt"]) + len(b["orphan"]) + len(b["trial_result"])
    with gc_db.session() as s:
        left = set(s.scalars(select(Blob.sha256)))
        assert left == {sha["dataset"], sha["running_ckpt"], sha["version"], sha["fresh_orphan"],
                        sha["live_trial_result"]}
        assert s.get(Job, arranged["trials"]["live"]).result_sha256 == sha["live_trial_result"]
        assert s.get(Job, ids["running"]).checkpoint_sha256 == sha["running_ckpt"]  # still resumable
        assert s.get(Job, ids["failed"]).checkpoint_sha256 is None
        counts = {name: len(list(s.scalars(select(JobEvent.seq).where(JobEvent.job_id == job_id))))
                  for name, job_id in ids.items()}
        assert counts == {"running": 3, "failed": 0, "recent": 3}  # only a long-finished job's log goes
    again = retention.collect(gc_db, make_settings(gc_blob_grace_s=3600))  # nothing more to free
    assert (again.checkpoints_dropped, again.events_pruned, again.blobs_deleted) == (0, 0, 0)
    assert retention.collect(gc_db, make_settings(gc_blob_grace_s=0)).blobs_deleted == 1  # the fresh orphan, now


def test_gc_never_takes_a_blob_that_is_being_referenced_meanwhile(gc_db, make_settings):
    """A writer stores bytes that already exist unreferenced (put locks the row) and points a row at them
    while the collector runs: the collector waits, then keeps the blob."""
    from app.models import Blob, Dataset, Tenant
    from app.services import blobs, retention

    data = secrets.token_bytes(400)
    sha = _put(gc_db, data, age_s=7200)  # garbage, for now
    result: dict[str, Any] = {}
    with gc_db.session() as writer:
        tenant = Tenant(name=f"gc-{secrets.token_hex(4)}")
        writer.add(tenant)
        writer.flush()
        assert blobs.put(writer, data) == sha  # the upload of the same bytes: row now locked by this transaction
        collector = threading.Thread(target=lambda: result.update(r=retention.collect(gc_db, make_settings())))
        collector.start()
        _wait_for_a_lock_wait(gc_db, "the collector to wait for the writer's row lock")
        writer.add(Dataset(tenant_id=tenant.id, name="d", format="csv", rows=1, columns=["text"], text_fields=["text"],
                           sha256=sha, size_bytes=len(data), report={}))
        writer.commit()
    collector.join(20)
    assert result["r"].blobs_deleted == 0 and result["r"].blobs_kept_busy == 1, result
    with gc_db.session() as s:
        assert s.get(Blob, sha) is not None


def test_spafit_db_gc_prints_what_it_freed(gc_db, tmp_path):
    from app.models import Blob

    sha = _put(gc_db, secrets.token_bytes(2048), age_s=7200)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPAFIT_") or k.startswith("SPAFIT_TEST_")}
    env.update(SPAFIT_MODE="embedded", SPAFIT_DATABASE_URL=gc_db.engine.url.render_as_string(hide_password=False),
               SPAFIT_AUTO_MIGRATE="false", SPAFIT_DATA_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "app.cli", "db", "gc", "--json"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["blobs_deleted"] == 1 and report["bytes_freed"] == 2048, report
    text_out = subprocess.run([sys.executable, "-m", "app.cli", "db", "gc"], env=env, capture_output=True, text=True,
                              timeout=120)
    assert text_out.returncode == 0 and "deleted 0 blob(s)" in text_out.stdout, text_out
    with gc_db.session() as s:
        assert s.get(Blob, sha) is None


def test_two_deletes_of_one_job_at_once_give_204_and_404(client, db, tenant_key):
    """The second waits for the first one's row lock and then finds nothing: a 404, never a 500."""
    from sqlalchemy import delete

    from app.models import Job

    key = tenant_key("train")
    job_id, _ = _job(client, key)
    answers: list[int] = []
    with db.session() as first:  # the first delete, holding the row lock
        first.execute(select(Job.id).where(Job.id == uuid.UUID(job_id)).with_for_update())
        second = threading.Thread(target=lambda: answers.append(
            client.delete(f"/v1/jobs/{job_id}", headers=key.headers).status_code))
        second.start()
        _wait_for_a_lock_wait(db, "the second delete to wait for the row lock")
        first.execute(delete(Job).where(Job.id == uuid.UUID(job_id)))
        first.commit()
    second.join(20)
    assert answers == [404]


def test_gc_runs_on_the_embedded_sqlite_database(tmp_path, make_settings):
    """Embedded mode runs the same collector on SQLite (the API schedules it there too)."""
    from app.db import Database
    from app.models import Blob
    from app.services import migrate, retention

    url = f"sqlite:///{tmp_path / 'spafit.db'}"
    migrate.upgrade(url)
    database = Database.from_url(url)
    try:
        keep_none = _put(database, b"orphan bytes", age_s=7200)
        report = retention.collect(database, make_settings())
        assert (report.blobs_deleted, report.bytes_freed) == (1, len(b"orphan bytes"))
        with database.session() as s:
            assert s.get(Blob, keep_none) is None
    finally:
        database.dispose()


def test_the_api_runs_the_collector_every_gc_interval(make_settings, db):
    """The API schedules the collector itself (as it does the requeuer), so embedded mode needs no Celery beat."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.models import Blob
    from tests.live import wait_until

    sha = _put(db, secrets.token_bytes(256), age_s=7200)  # an orphan, long past the grace period

    def gone() -> bool:
        with db.session() as s:
            return s.get(Blob, sha) is None

    assert not gone()
    app = create_app(make_settings(gc_interval_s=0.2))
    with TestClient(app):
        wait_until(gone, 15, "the API's periodic collection to delete the orphan blob", interval=0.1)
        freed = lambda what: app.state.metrics.registry.get_sample_value("spafit_gc_freed_total", {"what": what})  # noqa: E731
        wait_until(lambda: freed("blobs") >= 1 and freed("bytes") >= 256, 5, "spafit_gc_freed to count it")
