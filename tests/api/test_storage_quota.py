"""The per-tenant storage quota (SPAFIT_TENANT_MAX_STORED_BYTES, app/services/quota.py): every tenant's datasets,
adapter versions and batch results live in the one database all tenants share. Before it, each item was bounded
(rows per upload, bytes per import, bytes per batch result) but not their sum: one tenant could fill the database
for every other. Each way bytes come in is refused past the quota with 403 `storage-quota-exceeded`, another
tenant is not, and deleting makes room again.
"""

from __future__ import annotations

import types

import pytest
from sqlalchemy import func, select

from .adapters import SPAFIT, pack, random_adapter, register
from .conftest import QUOTA
from .helpers import (
    assert_problem,
    csv_of,
    dataset_row,
    queued_batch_prediction,
    race_reservations,
    stored_usage,
    upload,
)


def test_uploads_past_the_quota_are_refused_another_tenant_is_not_and_a_delete_makes_room(quota_client, tenant_key):
    a, b = tenant_key("train"), tenant_key("train")
    first = upload(quota_client, csv_of(1500, "a1"), headers=a.headers)
    second = upload(quota_client, csv_of(1500, "a2"), headers=a.headers)
    assert first.status_code == second.status_code == 201, (first.text, second.text)
    assert stored_usage(quota_client, a) == {"stored_bytes": 3000, "limit_bytes": QUOTA, "available_bytes": 1000,
                                      "by_kind": {"datasets": 3000, "adapters": 0, "batch_results": 0}}
    p = assert_problem(upload(quota_client, csv_of(1500, "a3"), headers=a.headers), 403, "storage-quota-exceeded")
    assert (p["limit_bytes"], p["used_bytes"], p["adding_bytes"], p["field"]) == (QUOTA, 3000, 1500, "file")
    assert "SPAFIT_TENANT_MAX_STORED_BYTES" in p["detail"] and "datasets 3000 bytes" in p["detail"], p
    assert upload(quota_client, csv_of(1000, "a4"), headers=a.headers).status_code == 201  # what fits still does
    # another tenant is served as if a were not there
    assert upload(quota_client, csv_of(3500, "b"), headers=b.headers).status_code == 201
    assert stored_usage(quota_client, b)["stored_bytes"] == 3500
    # a delete frees what the dataset was charged
    assert quota_client.delete(f"/v1/datasets/{first.json()['id']}", headers=a.headers).status_code == 204
    assert upload(quota_client, csv_of(1500, "a5"), headers=a.headers).status_code == 201
    assert stored_usage(quota_client, a)["stored_bytes"] == 4000


def test_a_tenant_at_its_quota_starts_no_job_import_or_adapter_that_would_store_more(quota_client, tenant_key,
                                                                                    db, tiny_base):
    a, b = tenant_key("train"), tenant_key("train")
    ds = {k.tenant_id: upload(quota_client, csv_of(1500, str(i)), headers=k.headers).json()["id"]
          for i, k in enumerate((a, b))}
    cfg, weights = random_adapter(tiny_base, SPAFIT)
    register(db, a.tenant_id, "served", cfg, weights)  # a trained adapter is registered whatever the quota
    assert len(weights) > QUOTA  # a is past its quota now: only by what its jobs registered
    assert stored_usage(quota_client, a)["available_bytes"] == 0
    refused = [
        quota_client.post("/v1/jobs", json={"task": "t", "train_dataset": ds[a.tenant_id]}, headers=a.headers),
        quota_client.post("/v1/batch-predictions", json={"task": "served", "dataset": ds[a.tenant_id]},
                          headers=a.headers),
        quota_client.post("/v1/datasets", json={"hf": {"name": "owner/set"}}, headers=a.headers),
        quota_client.put("/v1/tasks/other/adapter", content=pack(cfg, weights),
                          headers={**a.headers, "Content-Type": "application/zip"}),
        upload(quota_client, b"text,label\nx,pos\ny,neg\n", headers=a.headers),
    ]
    for r in refused:
        p = assert_problem(r, 403, "storage-quota-exceeded")
        assert p["used_bytes"] == 1500 + len(weights) and p["used_by_kind"]["adapters"] == len(weights), p
    assert quota_client.app.state.sent == []  # nothing was queued for a
    with db.session() as s:
        from app.models import Dataset, Job

        assert s.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == a.tenant_id)) == 0
        assert s.scalar(select(func.count()).select_from(Dataset).where(Dataset.tenant_id == a.tenant_id)) == 1
    # b stores only its dataset: served as if a were not there
    jobs = [quota_client.post("/v1/jobs", json={"task": "t", "train_dataset": ds[k.tenant_id]}, headers=k.headers)
            for k in (b,)]
    # deleting a's task frees what its version was charged: a starts a job again
    assert quota_client.delete("/v1/tasks/served", headers=a.headers).status_code == 204
    assert stored_usage(quota_client, a)["stored_bytes"] == 1500
    jobs.append(quota_client.post("/v1/jobs", json={"task": "t", "train_dataset": ds[a.tenant_id]}, headers=a.headers))
    for r, k in zip(jobs, (b, a), strict=True):
        assert r.status_code == 202, r.text
        assert quota_client.post(f"/v1/jobs/{r.json()['id']}/cancel", headers=k.headers).status_code == 200


def test_concurrent_writers_of_one_tenant_take_turns_on_the_room_left(db, tenant_key):
    """Several API replicas storing for one tenant at once: each checks and stores under the tenant's row lock, so
    together they never pass the quota (without the lock all eight saw the same room and stored)."""
    from app.services import quota

    a = tenant_key("train")
    stored, refused, errors = race_reservations(db, a.tenant_id, QUOTA, lambda i: dataset_row(a.tenant_id, i))
    assert not errors, errors
    assert (len(stored), len(refused)) == (4, 4)
    with db.session() as s:
        assert quota.usage(s, a.tenant_id)["datasets"] == 4000


class _DbLease:
    """Enough of worker.lease.Lease for `_predict`, writing for real: each write is one transaction."""

    def __init__(self, db):
        self.db = db

    def write(self, fn, what):
        with self.db.transaction() as s:
            return fn(s)

    def hold(self, *a, **k):
        return None

    def end(self, *a, **k):
        raise AssertionError("the job must not succeed")


def test_the_worker_stops_a_batch_result_at_the_tenants_quota(held, tenant_key, db, tiny_base, make_settings):
    """The result's chunks count as they are stored: the chunk that would pass the quota is not stored and the job
    fails `storage-quota-exceeded` (its stored chunks go with the collector, as a failed job's do)."""
    from app.errors import StorageQuotaExceeded
    from app.models import BatchChunk
    from app.services import quota
    from worker import batch as worker_batch

    a = tenant_key("train")
    _, _, job_id = queued_batch_prediction(held, a, db, tiny_base)
    with db.session() as s:
        used = sum(quota.usage(s, a.tenant_id).values())
    limit = used + 3000  # room for a few chunks of the result

    class _Engine:
        def predict(self, name, inputs, k):
            return [{"label": "pos", "score": 0.5} for _ in inputs]

    job = types.SimpleNamespace(id=job_id, tenant_id=a.tenant_id, text_fields=["text"], hyperparameters={
        "format": "jsonl", "all_scores": False, "top_k": None, "id_field": None, "chunk_rows": 4})
    hb = types.SimpleNamespace(should_stop=lambda: False)
    rows = iter([{"text": f"row {i}"} for i in range(2000)])
    with pytest.raises(StorageQuotaExceeded) as e:
        worker_batch._predict(job, _DbLease(db), hb, _Engine(), ["v"], rows, 2000,
                              make_settings(tenant_max_stored_bytes=limit), lambda: None)
    assert e.value.type == "storage-quota-exceeded" and f"batch prediction {job_id}" in e.value.message
    with db.session() as s:
        chunks = s.scalars(select(func.length(BatchChunk.data)).where(BatchChunk.job_id == job_id)).all()
        after = sum(quota.usage(s, a.tenant_id).values())
    assert chunks and after <= limit < after + max(chunks), (chunks, after, limit)  # stopped at the chunk that
    assert held.post(f"/v1/jobs/{job_id}/cancel", headers=a.headers).status_code == 200  # did not fit, not before


def test_an_import_that_would_pass_the_quota_fails_with_that_error_and_stores_nothing(db, tenant_key, make_settings,
                                                                                     tmp_path):
    """Its size is known only once the worker has read it: the import fails `storage-quota-exceeded` then."""
    from app.models import Dataset
    from app.services import datasets as service
    from tests.api.test_imports import dataset_folder, start

    a = tenant_key("train")
    settings = make_settings(mode="embedded", auth_enabled=False, tenant_max_stored_bytes=200)  # local paths allowed
    dataset_id = start(db, a.tenant_id, settings, str(dataset_folder(tmp_path)))  # room left: 200 bytes
    assert service.run_import(db, dataset_id, settings) == "failed"
    with db.session() as s:
        ds = s.get(Dataset, dataset_id)
        assert (ds.state, ds.error_type, ds.sha256, ds.size_bytes) == ("failed", "storage-quota-exceeded", None, None)
        assert "this import adds" in ds.error_message and "200 bytes" in ds.error_message, ds.error_message
    ok = make_settings(mode="embedded", auth_enabled=False, tenant_max_stored_bytes=QUOTA)
    assert service.run_import(db, start(db, a.tenant_id, ok, str(dataset_folder(tmp_path, "again"))), ok) == "ready"


def test_the_sdk_and_cli_show_usage_and_type_the_refusal(make_settings, tenant_key, tmp_path):
    """Over HTTP as users reach it: `Client.usage()` / `spafit usage --json`, and a refused upload raises the SDK's
    StorageQuotaExceededError (a PermissionDeniedError) with the numbers; the CLI exits 4 naming the quota."""
    import io
    import json

    from click.testing import CliRunner
    from spafit_client import Client, PermissionDeniedError, StorageQuotaExceededError

    from app.cli import main
    from app.main import create_app
    from tests.live import uvicorn_in_thread

    a = tenant_key("train")
    big = tmp_path / "big.csv"
    big.write_bytes(csv_of(QUOTA - 500))
    with uvicorn_in_thread(create_app(make_settings(tenant_max_stored_bytes=QUOTA))) as url:
        with Client(url, api_key=a.key) as client:
            client.datasets.upload(big)
            u = client.usage()
            assert (u.stored_bytes, u.by_kind.datasets, u.limit_bytes, u.available_bytes) == (QUOTA - 500, QUOTA - 500,
                                                                                             QUOTA, 500)
            with pytest.raises(StorageQuotaExceededError) as info:
                client.datasets.upload(big)
            assert isinstance(info.value, PermissionDeniedError) and info.value.slug == "storage-quota-exceeded"
            assert info.value.body["adding_bytes"] == QUOTA - 500 and info.value.body["used_bytes"] == QUOTA - 500
        env = {"SPAFIT_URL": url, "SPAFIT_API_KEY": a.key}
        r = CliRunner().invoke(main, ["usage", "--json"], env=env)
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["available_bytes"] == 500
        r = CliRunner().invoke(main, ["usage"], env=env)
        assert r.exit_code == 0 and r.stdout.splitlines()[-1].split() == ["available", "500"], r.output
        with Client(url, api_key=a.key) as client:
            client.datasets.upload(io.BytesIO(csv_of(500)))  # exactly at the quota: no room for an import's data
        r = CliRunner().invoke(main, ["datasets", "import", "owner/set"], env=env)
        assert r.exit_code == 4 and "SPAFIT_TENANT_MAX_STORED_BYTES" in r.output, r.output


def test_an_upload_that_cannot_fit_is_refused_before_it_is_parsed(quota_client, tenant_key):
    """Its size is known from the request: no room, no parsing (a file of a million rows holds a core for seconds).
    A file with errors that does not fit is 403, not the 422 its parsing would give."""
    a = tenant_key("train")
    broken = b"text,label\n" + b"only one column\n" * (QUOTA // 16 + 1)
    assert len(broken) > QUOTA
    assert_problem(upload(quota_client, broken, headers=a.headers), 403, "storage-quota-exceeded")
    assert_problem(upload(quota_client, broken[:QUOTA], headers=a.headers), 422)  # it fits: parsed, and wrong
