"""Attacks on the data lifecycle across tenants: what one tenant's requests may make the shared database store.

A batch prediction's result is stored in the database (`batch_chunks`) until its job is deleted. Its rows were
bounded (SPAFIT_BATCH_MAX_ROWS_PER_JOB) but not its bytes: with `all_scores` each row carries one score per label
(with the label's name), and a multi-label version's row names every predicted label, so a row grew with the
adapter's labels. An imported adapter may have 10,000 labels of 200 characters: a 1,000-row upload of a few KB
then stored gigabytes (2.3 MB per row measured), and 64 such jobs per tenant filled the database every tenant
shares. The result is now bounded by SPAFIT_BATCH_MAX_ROWS_PER_JOB x RESULT_BYTES_PER_PREDICTION: refused at
creation from the labels (422 `result-too-large`), and held by the worker on the bytes it stores.
"""

from __future__ import annotations

import types
import uuid

import pytest

from .adapters import SPAFIT, random_adapter, register
from .helpers import assert_problem, upload

MANY_LABELS = tuple(f"label-{'x' * 40}-{i}" for i in range(2000))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from .adapters import tiny_backbone

    return tiny_backbone(tmp_path_factory.mktemp("lifecycle-model"))


@pytest.fixture
def small_client(make_settings):
    """A server-mode app whose batch jobs may take 1000 rows: a result budget of about 2 MB."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(make_settings(batch_max_rows_per_job=1000))) as c:
        yield c


def _dataset(client, key, n: int = 40) -> str:
    rows = "".join(f"row {i},{MANY_LABELS[i % 3]}\n" for i in range(n))
    r = upload(client, f"text,label\n{rows}".encode(), "rows.csv", headers=key.headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_a_batch_result_that_grows_with_the_labels_is_refused_at_creation(small_client, tenant_key, db, base):
    """40 rows x 2000 scored labels: about 4 MB of result from a 1 KB upload (gigabytes at the row limit); was 202."""
    key = tenant_key("train")
    cfg, weights = random_adapter(base, SPAFIT, labels=MANY_LABELS)
    register(db, key.tenant_id, "wide", cfg, weights)
    cfg, weights = random_adapter(base, SPAFIT, labels=MANY_LABELS, task_type="multi_label_classification")
    register(db, key.tenant_id, "tags", cfg, weights)
    ds = _dataset(small_client, key)
    for body in ({"task": "wide", "all_scores": True}, {"task": "tags"},
                 {"tasks": ["wide", "tags"], "all_scores": True}):
        r = small_client.post("/v1/batch-predictions", json={"dataset": ds, **body}, headers=key.headers)
        p = assert_problem(r, 422, "result-too-large")
        assert p["limit_bytes"] == 1000 * 2048 and "top_k" in p["detail"], p
    # what fits is still taken: the label alone, or a few of the scores
    created = []
    for body in ({"task": "wide"}, {"task": "wide", "top_k": 3}):
        r = small_client.post("/v1/batch-predictions", json={"dataset": ds, **body}, headers=key.headers)
        assert r.status_code == 202, r.text
        created.append(r.json()["id"])
    for job in created:  # no worker runs here: cancelled while queued
        assert small_client.post(f"/v1/jobs/{job}/cancel", headers=key.headers).status_code == 200


class _Lease:
    """Enough of worker.lease.Lease for `_predict`: nothing stored yet, chunks recorded instead of written."""

    def __init__(self):
        self.chunks: list[int] = []
        self.ended = False

    def write(self, fn, what):
        if what == "find the stored chunks":
            class _Session:
                def execute(self, stmt):
                    return types.SimpleNamespace(one=lambda: (0, None, 0)[:len(stmt.selected_columns)])
            return fn(_Session())
        assert what.startswith("store chunk"), what
        self.chunks.append(len(fn.__defaults__[2]))  # the payload's bytes
        return None

    def hold(self, *a, **k):
        return None

    def end(self, *a, **k):
        self.ended = True


def test_the_worker_stops_a_result_that_passes_its_budget(make_settings):
    """Whatever the estimate at creation missed (ids, escapes), the worker holds the budget on the stored bytes:
    the job fails `result-too-large` instead of storing on (the collector drops a failed job's chunks)."""
    from app.errors import ResultTooLarge
    from worker import batch as worker_batch

    settings = make_settings(batch_max_rows_per_job=10)  # a 20 KB budget
    big = {"label": "a", "score": 0.5, "scores": [{"label": f"l{i}", "score": 0.001} for i in range(100)]}

    class _Engine:
        def predict(self, name, inputs, k):
            return [dict(big) for _ in inputs]

    job = types.SimpleNamespace(id=uuid.uuid4(), text_fields=["text"], hyperparameters={
        "format": "jsonl", "all_scores": True, "top_k": None, "id_field": None, "chunk_rows": 4})
    hb = types.SimpleNamespace(should_stop=lambda: False)
    lease = _Lease()
    rows = iter([{"text": f"row {i}"} for i in range(400)])
    with pytest.raises(ResultTooLarge):
        worker_batch._predict(job, lease, hb, _Engine(), ["v"], rows, 400, settings, lambda: None)
    assert not lease.ended
    assert sum(lease.chunks) <= 10 * 2048, lease.chunks


# ------------------------------------------------------------------------ a sweep's results vs another tenant's bytes
def test_settling_a_sweep_while_another_tenant_stores_a_trial_result_s_bytes_settles_it(held, tenant_key, db,
                                                                                         tiny_base):
    """Training is deterministic: two tenants sweeping the same data with the same seed store the same trial
    archives (one content-addressed blob). Settling tenant A's sweep drops its trial results; the drop of a blob
    tenant B was referencing at that moment failed its foreign key and, outside a savepoint, rolled A's whole
    settling back (no version, the sweep left running until a requeuer retried it). Now only that drop is skipped."""
    import threading
    import time

    from sqlalchemy import text, update

    from app.models import Job
    from app.services import blobs, sweeps
    from spafit_core.adapter import pack
    from tests.api.adapters import random_adapter
    from tests.api.test_dataset_sweep_attacks import _finish_trials, _sweep
    from tests.worker.test_jobs import datasets, job_body

    a, b = tenant_key("train"), tenant_key("train")
    sweep = uuid.UUID(_sweep(held, a, {"n1": [1], "n2": [2, 3]})["id"])
    results = [random_adapter(tiny_base, seed=1), random_adapter(tiny_base, seed=2)]
    # Out of other processes' requeue loops: the live servers on the session's database settle running sweeps every
    # 2 s, and one settled this sweep before the test did (a clean-clone CI run). The test settles it itself.
    with db.session() as s:
        s.execute(update(Job).where(Job.id == sweep).values(status="queued"))
        s.commit()
    _finish_trials(db, sweep, results)
    shared = pack(*results[1])  # tenant B's identical trial archive
    train, val = datasets(held, b.headers, n=16)
    r = held.post("/v1/jobs", json=job_body(train, val, task="other"), headers=b.headers)
    assert r.status_code == 202, r.text
    b_job = uuid.UUID(r.json()["id"])
    errors: list[BaseException] = []
    with db.session() as s_b:  # B stores the bytes and points at them; not committed yet (its row is locked)
        sha = blobs.put(s_b, shared)
        s_b.execute(update(Job).where(Job.id == b_job).values(checkpoint_sha256=sha))

        def settle():
            try:
                sweeps.settle(db, sweep)
            except BaseException as e:  # noqa: BLE001 (reported below)
                errors.append(e)

        t = threading.Thread(target=settle)
        t.start()
        deadline = time.monotonic() + 20
        with db.session() as probe:  # A's drop of that blob waits for B's lock
            while not probe.scalar(text("select count(*) from pg_stat_activity where wait_event_type = 'Lock' "
                                        "and datname = current_database()")):
                assert time.monotonic() < deadline and t.is_alive(), "the settling never waited for the lock"
                time.sleep(0.05)
                probe.rollback()
        s_b.commit()
        t.join(30)
    assert not errors, errors
    done = held.get(f"/v1/jobs/{sweep}", headers=a.headers).json()
    assert done["status"] == "succeeded", done
    with db.session() as s:
        assert blobs.get(s, sha) == shared  # B's copy intact
    assert held.post(f"/v1/jobs/{b_job}/cancel", headers=b.headers).status_code == 200
