"""Races between two writers on the real Postgres, found by a stress hunt: each was a 500 or a lost write. Each race
is staged, not hoped for: one side holds a row lock and the test waits until Postgres shows the other blocked on
it (`pg_stat_activity`), so the interleaving happens on every run."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import text

from .adapters import SPAFIT, pack, random_adapter, register, served_on, tiny_backbone
from .helpers import assert_problem, csv_bytes, upload


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def api(pg_url, redis_client, redis_url, redis_prefix, tmp_path_factory, base):
    with served_on(base, pg_url, redis_url, redis_prefix, tmp_path_factory, preload_base_model=False) as client:
        yield client


def _blocked_on(db, needle: str, timeout: float = 10) -> bool:
    """Whether a statement containing `needle` comes to wait on a lock within `timeout`."""
    deadline = time.monotonic() + timeout
    with db.session() as s:
        while time.monotonic() < deadline:
            n = s.execute(text("select count(*) from pg_stat_activity where wait_event_type = 'Lock' "
                               "and query ilike :q"), {"q": f"%{needle}%"}).scalar()
            s.rollback()
            if n:
                return True
            time.sleep(0.05)
    return False


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(r=fn()))
    t.start()
    return t, out


def test_deleting_a_task_while_another_tenant_registers_the_same_bytes_keeps_the_blob_for_it(api, db, tenant_key,
                                                                                             base):
    """The delete's blob cleanup met the other tenant's new reference on the foreign key: a 500, the delete rolled
    back. Now the delete goes through and the blob stays for the other tenant."""
    from app.services import registry

    cfg, weights = random_adapter(base, SPAFIT, seed=77)
    a, b = tenant_key("train"), tenant_key("train")
    register(db, a.tenant_id, "t", cfg, weights)
    with db.session() as sb:  # b's registration of the same bytes, not committed yet
        registry.register_version(sb, b.tenant_id, "t", cfg, weights, activate=True)
        sb.flush()
        t, out = _in_thread(lambda: api.delete("/v1/tasks/t", headers=a.headers))
        assert _blocked_on(db, "DELETE FROM blobs"), "a's blob cleanup never waited on b's reference"
        sb.commit()
    t.join(30)
    assert out["r"].status_code == 204, out["r"].text
    assert_problem(api.get("/v1/tasks/t", headers=a.headers), 404)
    assert api.get("/v1/tasks/t/adapter", headers=b.headers).status_code == 200


def test_activating_a_version_while_its_task_is_deleted_is_404(api, db, tenant_key, base):
    from app.services import registry

    a = tenant_key("train")
    register(db, a.tenant_id, "t2", *random_adapter(base, SPAFIT, seed=78))
    register(db, a.tenant_id, "t2", *random_adapter(base, SPAFIT, seed=79))
    with db.session() as sd:  # the deleter holds the task's row; the activation waits on it, then it is gone
        task = registry.get_task(sd, a.tenant_id, "t2")
        sd.execute(text("select 1 from tasks where id = :i for update"), {"i": task.id})
        t, out = _in_thread(lambda: api.post("/v1/tasks/t2/versions/1/activate", headers=a.headers))
        assert _blocked_on(db, "FROM tasks"), "the activation never waited on the task's row"
        registry.delete_task(sd, a.tenant_id, "t2")
    t.join(30)
    assert_problem(out["r"], 404)  # once a 500 (an UPDATE of a row that was gone)


def test_importing_an_adapter_while_its_task_is_deleted_makes_the_task_again(api, db, tenant_key, base):
    from app.services import registry

    a = tenant_key("train")
    register(db, a.tenant_id, "t3", *random_adapter(base, SPAFIT, seed=80))
    archive = pack(*random_adapter(base, SPAFIT, seed=81))
    with db.session() as sd:
        task = registry.get_task(sd, a.tenant_id, "t3")
        sd.execute(text("select 1 from tasks where id = :i for update"), {"i": task.id})
        t, out = _in_thread(lambda: api.put("/v1/tasks/t3/adapter", content=archive,
                                            headers={**a.headers, "Content-Type": "application/zip"}))
        assert _blocked_on(db, "FROM tasks"), "the import never waited on the task's row"
        registry.delete_task(sd, a.tenant_id, "t3")
    t.join(30)
    assert out["r"].status_code == 201, out["r"].text  # once a 500 (a version of a task that was gone)
    assert out["r"].json()["version"] == 1  # a new task, numbered from 1
    assert api.get("/v1/tasks/t3", headers=a.headers).status_code == 200


def test_a_job_whose_dataset_is_deleted_while_it_is_created_is_404(api, db, tenant_key):
    k = tenant_key("train")
    ds = upload(api, csv_bytes(), headers=k.headers).json()["id"]
    with db.session() as lock:  # the job's creation waits on the tenant's row while the dataset goes
        lock.execute(text("select 1 from tenants where id = :i for update"), {"i": k.tenant_id})
        t, out = _in_thread(lambda: api.post("/v1/jobs", headers=k.headers, json={
            "task": "t", "train_dataset": ds, "method": {"name": "spafit", "n1": 2, "n2": 4}}))
        assert _blocked_on(db, "FROM tenants"), "the job's creation never reached the tenant's row"
        assert api.delete(f"/v1/datasets/{ds}", headers=k.headers).status_code == 204
        lock.commit()
    t.join(30)
    assert "deleted" in assert_problem(out["r"], 404)["detail"]  # once a 500 (the foreign key)


def test_two_webhook_secret_rotations_at_once_each_leave_their_secret_signing(api, db, tenant_key):
    from app.models import Tenant
    from app.services import webhooks

    k = tenant_key("admin")
    api.get("/v1/webhooks/secret", headers=k.headers)
    with db.session() as sa:
        first = webhooks.rotate_secret(sa, k.tenant_id).webhook_secret  # flushed, the row held
        t, out = _in_thread(lambda: api.post("/v1/webhooks/secret", headers=k.headers))
        assert _blocked_on(db, "tenants"), "the second rotation never waited on the first"
        sa.commit()
    t.join(30)
    second = out["r"].json()["secret"]
    with db.session() as s:
        row = s.get(Tenant, k.tenant_id)
        assert (row.webhook_secret, row.webhook_secret_previous) == (second, first)  # once (second, the original)


def test_an_import_a_worker_is_running_cannot_be_deleted_past_the_import_limit(make_settings, db, tenant_key):
    """Deleting an import a worker had started freed its slot while the worker went on downloading: with a limit
    of 1, five imports ran at once. Such an import is now 409 until it ends; one no worker took is still deleted."""
    from fastapi.testclient import TestClient
    from sqlalchemy import update

    from app.main import create_app
    from app.models import Dataset

    app = create_app(make_settings(max_concurrent_imports=1))
    with TestClient(app) as c:
        app.state.send_import = lambda dataset_id: None  # no worker: the test plays its part
        k = tenant_key("train")
        body = {"hf": {"name": "stanfordnlp/imdb", "split": "train"}}
        waiting = c.post("/v1/datasets", json=body, headers=k.headers).json()["id"]
        assert c.delete(f"/v1/datasets/{waiting}", headers=k.headers).status_code == 204  # not started: fine
        started = c.post("/v1/datasets", json=body, headers=k.headers).json()["id"]
        with db.transaction() as s:  # what run_import does when it takes the import
            s.execute(update(Dataset).where(Dataset.id == started).values(import_attempts=1))
        assert "being imported" in assert_problem(c.delete(f"/v1/datasets/{started}", headers=k.headers),
                                                  409)["detail"]
        assert_problem(c.post("/v1/datasets", json=body, headers=k.headers), 429)  # its slot still counts
