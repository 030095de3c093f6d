"""Uploads are read and checked in the API process, next to every tenant's predictions: a 20 MB file of short rows
is five million rows, about 20 s of one core (holding the interpreter) and 1.2 GB, and one tenant could send
several at once. Now a file has at most SPAFIT_MAX_UPLOAD_ROWS rows (413), a tenant's uploads are read one at a
time (429 too-many-uploads), and a process reads at most SPAFIT_UPLOADS_IN_FLIGHT at once (the others wait their
turn, then 503). The turns are `app/services/work_slots.py`'s, shared with PEFT conversions (tests/api/
test_conversions.py tests them in depth)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import func, select

from .helpers import assert_problem, upload


def _rows(n: int) -> bytes:
    return b"text,label\n" + b"".join(b"row %d %s,%s\n" % (i, uuid.uuid4().hex.encode(), b"ab"[i % 2:i % 2 + 1])
                                      for i in range(n))


@pytest.fixture
def bounded(make_settings) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(make_settings(max_upload_rows=20, uploads_in_flight=1, upload_wait_s=0.3))) as c:
        yield c


@contextmanager
def _reading(client: Any, tenant_id: uuid.UUID) -> Iterator[None]:
    """An upload of `tenant_id` being read meanwhile: its slot held in another thread."""
    entered, release = threading.Event(), threading.Event()

    def run() -> None:
        with client.app.state.uploads.slot(tenant_id):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=run)
    t.start()
    assert entered.wait(5)
    try:
        yield
    finally:
        release.set()
        t.join()


def _datasets(db: Any, tenant_id: uuid.UUID) -> int:
    from app.models import Dataset

    with db.session() as s:
        return s.scalar(select(func.count()).select_from(Dataset).where(Dataset.tenant_id == tenant_id))


def test_a_file_past_the_row_limit_is_413_naming_it_and_stores_nothing(bounded, tenant_key, db):
    key = tenant_key("train")
    body = assert_problem(upload(bounded, _rows(21), "big.csv", key.headers), 413, "payload-too-large")
    assert body["field"] == "file" and "20 rows" in body["detail"] and "SPAFIT_MAX_UPLOAD_ROWS" in body["detail"]
    assert _datasets(db, key.tenant_id) == 0
    assert upload(bounded, _rows(20), "at.csv", key.headers).status_code == 201


def test_a_tenant_reads_one_upload_at_a_time_and_another_tenant_waits_its_turn(bounded, tenant_key, db):
    a, b = tenant_key("train"), tenant_key("train")
    with _reading(bounded, a.tenant_id):
        r = upload(bounded, _rows(12), "second.csv", a.headers)
        body = assert_problem(r, 429, "too-many-uploads")
        assert r.headers["Retry-After"] == "1" and "already running" in body["detail"]
        started = time.monotonic()  # the process reads one at a time (uploads_in_flight=1): b waits, then 503
        r = upload(bounded, _rows(12), "other.csv", b.headers)
        assert_problem(r, 503)
        assert r.headers["Retry-After"] == "5" and 0.25 <= time.monotonic() - started < 5
    assert _datasets(db, a.tenant_id) == _datasets(db, b.tenant_id) == 0
    assert upload(bounded, _rows(12), "again.csv", a.headers).status_code == 201  # the slot is back
    assert upload(bounded, _rows(12), "turn.csv", b.headers).status_code == 201


def test_a_failed_upload_gives_its_turn_back(bounded, tenant_key):
    key = tenant_key("train")
    assert_problem(upload(bounded, b"text,label\n\"unclosed,a\n", "bad.csv", key.headers), 422)
    assert_problem(upload(bounded, _rows(21), "big.csv", key.headers), 413)
    assert upload(bounded, _rows(12), "ok.csv", key.headers).status_code == 201


def test_the_upload_settings_are_checked(make_settings):
    from pydantic import ValidationError

    for bad in ({"max_upload_rows": 0}, {"uploads_in_flight": 0}, {"uploads_in_flight": 21}, {"upload_wait_s": -1}):
        with pytest.raises(ValidationError):
            make_settings(**bad)
