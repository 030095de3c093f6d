"""The database taken away and given back, for real, through a TCP proxy between the app and Postgres (the
shared Postgres itself is never touched): /readyz fails, every write answers 503 + Retry-After as
problem+json, a connection lost in the middle of a write leaves nothing half written, and the service
recovers on its own, without a restart, when the database returns."""

from __future__ import annotations

import secrets
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.main import create_app
from app.models import Blob, Dataset, Job
from tests.api.helpers import assert_problem, csv_bytes, sha256, unique_csv, upload

from .conftest import job_body, via_proxy, wait_until

OUTAGE_ANSWER_S = 5.0  # a write during the outage must be answered (503) within this, never hang


def _unique_rows() -> bytes:
    return csv_bytes([("a great film", "pos"), ("boring and slow", "neg"), ("fun plot", "pos"),
                      ("awful acting", "neg"), (f"unique {secrets.token_hex(8)}", "pos")])


def _rows(db, model, *where) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


def _assert_unavailable(r) -> dict:
    body = assert_problem(r, 503)
    assert body["type"].endswith(("/database-unavailable", "/not-ready")), body
    assert r.headers["retry-after"].isdigit() and int(r.headers["retry-after"]) > 0
    assert "Traceback" not in r.text and "psycopg" not in r.text
    return body


@pytest.fixture
def outage(make_settings, pg_url, pg_proxy):
    """An app whose only way to the database is the proxy; jobs are recorded, not sent to a broker."""
    settings = make_settings(database_url=via_proxy(pg_url, pg_proxy), database_connect_timeout=2,
                             readiness_timeout=3.0)
    app = create_app(settings)
    sent: list[uuid.UUID] = []
    app.state.send_job = sent.append
    with TestClient(app) as client:
        client.sent = sent
        yield client


def test_database_outage_fails_readiness_and_writes_with_503_then_recovers_by_itself(outage, pg_proxy, db,
                                                                                      tenant_key, measure):
    key = tenant_key("train")
    assert outage.get("/readyz").status_code == 200
    train = upload(outage, unique_csv(), headers=key.headers)
    assert train.status_code == 201, train.text
    train_id = train.json()["id"]

    pg_proxy.cut()
    r = outage.get("/readyz")
    body = _assert_unavailable(r)
    assert body["checks"]["database"]["ok"] is False and body["checks"]["broker"]["ok"] is True
    assert outage.get("/healthz").status_code == 200  # alive, only not ready

    content = _unique_rows()
    writes = {
        "upload": lambda: upload(outage, content, "outage.csv", headers=key.headers),
        "job": lambda: outage.post("/v1/jobs", json=job_body(train_id, None, task="outage"), headers=key.headers),
        "delete": lambda: outage.delete(f"/v1/datasets/{train_id}", headers=key.headers),
        "read": lambda: outage.get("/v1/datasets", headers=key.headers),
    }
    answered = {}
    for name, call in writes.items():
        start = time.monotonic()
        r = call()
        elapsed = time.monotonic() - start
        _assert_unavailable(r)
        assert elapsed < OUTAGE_ANSWER_S, f"{name} took {elapsed:.1f}s to fail"
        answered[name] = round(elapsed * 1000, 1)

    # Nothing half written: no blob and no dataset of the upload, no job, the dataset not deleted.
    assert _rows(db, Blob, Blob.sha256 == sha256(content)) == 0
    assert _rows(db, Dataset, Dataset.sha256 == sha256(content)) == 0
    assert _rows(db, Job, Job.tenant_id == key.tenant_id) == 0
    assert _rows(db, Dataset, Dataset.id == uuid.UUID(train_id)) == 1
    assert outage.sent == []

    pg_proxy.restore()  # the database is back: no restart of the app
    restored = time.monotonic()
    wait_until(lambda: outage.get("/readyz").status_code == 200, 15, "/readyz to recover")
    measure(answer_503_ms=answered, ready_again_s=round(time.monotonic() - restored, 2))
    r = upload(outage, content, "outage.csv", headers=key.headers)
    assert r.status_code == 201, r.text
    r = outage.post("/v1/jobs", json=job_body(train_id, None, task="outage"), headers=key.headers)
    assert r.status_code == 202, r.text
    assert outage.sent == [uuid.UUID(r.json()["id"])]


@pytest.mark.parametrize("done, statement, write", [
    # the blob row is inserted, then the connection dies before the dataset row reaches the server
    (b"INSERT INTO blobs", b"INSERT INTO datasets", "upload"),
    # the job row is inserted, then the connection dies before its first event reaches the server
    (b"INSERT INTO jobs", b"INSERT INTO job_events", "job"),
])
def test_connection_lost_in_the_middle_of_a_write_leaves_nothing_behind(outage, pg_proxy, db, tenant_key,
                                                                         done, statement, write):
    key = tenant_key("train")
    train_id = upload(outage, unique_csv(), headers=key.headers).json()["id"]
    content = _unique_rows()
    pg_proxy.forwarded.clear()
    pg_proxy.cut_on(statement)
    if write == "upload":
        r = upload(outage, content, "half.csv", headers=key.headers)
    else:
        r = outage.post("/v1/jobs", json=job_body(train_id, None, task="half"), headers=key.headers)
    assert pg_proxy.tripped.is_set(), "the statement never went through the proxy"
    assert any(done in chunk for chunk in pg_proxy.forwarded), "the first statement should have reached the server"
    _assert_unavailable(r)
    # The transaction died with its connection: not even the statements before the cut are visible.
    assert _rows(db, Blob, Blob.sha256 == sha256(content)) == 0
    assert _rows(db, Dataset, Dataset.tenant_id == key.tenant_id) == 1  # only the first upload
    assert _rows(db, Job, Job.tenant_id == key.tenant_id) == 0
    assert outage.sent == []
    # The next request gets a fresh connection and succeeds: the pool dropped the dead one.
    again = upload(outage, content, "half.csv", headers=key.headers)
    assert again.status_code == 201, again.text
