"""Only sane jobs are accepted: every numeric knob bounded (422 naming the field), max_seq_length against the
base model's positions, epochs x steps, the job's own time limit, base models in server mode, sweeps need
validation data, and the per-tenant limit on queued + running jobs (429 + Retry-After) across two API
replicas. Real Postgres and Redis; no job here reaches a worker (messages are held back)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from app.main import create_app
from app.models import Job
from tests.api.helpers import assert_problem
from tests.worker.conftest import WORKER_SETTINGS
from tests.worker.test_jobs import datasets, job_body

LIMIT = 3


@pytest.fixture
def held_app_factory(make_settings: Callable[..., Any], tiny_base: str) -> Callable[..., Any]:
    """An API app whose job messages are recorded instead of sent (jobs stay queued)."""

    def make(**overrides: Any) -> Any:
        app = create_app(make_settings(allowed_base_models=[tiny_base], default_base_model=tiny_base,
                                       **{**WORKER_SETTINGS, "job_requeue_interval_s": 3600.0, **overrides}))
        app.state.sent = []
        return app

    return make


@pytest.fixture
def held(held_app_factory) -> Iterator[TestClient]:
    app = held_app_factory(max_active_jobs_per_tenant=LIMIT, job_max_steps=500, job_time_limit_s=3600)
    with TestClient(app) as c:
        app.state.send_job = app.state.sent.append
        yield c


def _problem_names(problem: dict, field: str) -> bool:
    return problem.get("field") == field or any(e.get("field", "").endswith(field) for e in problem.get("errors") or [])


@pytest.mark.parametrize("hp_or_method,field", [
    ({"method": {"rank": 2**31}}, "method.rank"),
    ({"method": {"rank": 0}}, "method.rank"),
    ({"method": {"alpha": 1e9}}, "method.alpha"),
    ({"method": {"alpha": 0}}, "method.alpha"),
    ({"method": {"sweep": {"n1": [1], "n2": [2], "rank": [4, 100000]}}}, "method.sweep.rank.1"),
    ({"method": {"sweep": {"n1": [True], "n2": [2]}}}, "method.sweep.n1.0"),  # a bool is not a layer
    ({"method": {"sweep": {"n1": [1], "n2": []}}}, "method.sweep.n2"),
    ({"hyperparameters": {"seed": 2**40}}, "hyperparameters.seed"),
    ({"hyperparameters": {"weight_decay": 1e308}}, "hyperparameters.weight_decay"),
    ({"hyperparameters": {"learning_rate": 0.9}}, "hyperparameters.learning_rate"),
    ({"hyperparameters": {"checkpoint_every_steps": 10**9}}, "hyperparameters.checkpoint_every_steps"),
    ({"hyperparameters": {"batch_size": 100000}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"max_grad_norm": 1e300}}, "hyperparameters.max_grad_norm"),
    ({"hyperparameters": {"epochs": 100, "batch_size": 1}}, "hyperparameters.epochs"),  # 100 x 16 > 500 steps
    ({"hyperparameters": {"max_seq_length": 1024}}, "hyperparameters.max_seq_length"),  # the tiny model has 64
    ({"time_limit_s": 7200}, "time_limit_s"),  # above this service's 3600
    ({"time_limit_s": 5}, "time_limit_s"),
    ({"base_model": "bert-base-uncased"}, "base_model"),  # a hub id this deployment does not offer
    ({"base_model": "/etc"}, "base_model"),
])
def test_every_knob_has_a_bound_a_422_names(held, tenant_key, hp_or_method, field):
    key = tenant_key("train")
    train, val = datasets(held, key.headers, n=16)
    body = job_body(train, val)
    for part, value in hp_or_method.items():
        body[part] = {**body[part], **value} if isinstance(value, dict) else value
    r = held.post("/v1/jobs", json=body, headers=key.headers)
    problem = assert_problem(r, 422)
    assert _problem_names(problem, field), problem
    assert held.app.state.sent == []


def test_non_finite_numbers_are_422(held, tenant_key):
    key = tenant_key("train")
    train, val = datasets(held, key.headers, n=16)
    raw = (b'{"task": "t", "train_dataset": "%s", "validation_dataset": "%s", '
           b'"hyperparameters": {"weight_decay": NaN}}' % (train.encode(), val.encode()))
    r = held.post("/v1/jobs", content=raw, headers={**key.headers, "Content-Type": "application/json"})
    assert_problem(r, 422)


def test_max_seq_length_defaults_to_what_the_model_takes(held, tenant_key):
    """Not given: the default 128 is shortened to the tiny model's 64 positions instead of refused."""
    key = tenant_key("train")
    train, val = datasets(held, key.headers, n=16)
    r = held.post("/v1/jobs", json=job_body(train, val), headers=key.headers)
    assert r.status_code == 202, r.text
    assert r.json()["hyperparameters"]["max_seq_length"] == 64
    ok = held.post("/v1/jobs", json=job_body(train, val, max_seq_length=64), headers=key.headers)
    assert ok.status_code == 202, ok.text


def test_allowed_base_models_are_the_only_ones_in_server_mode(held, tenant_key, tiny_base):
    key = tenant_key("train")
    train, val = datasets(held, key.headers, n=16)
    ok = held.post("/v1/jobs", json={**job_body(train, val), "base_model": tiny_base}, headers=key.headers)
    assert ok.status_code == 202, ok.text
    for name in ("sentence-transformers/all-MiniLM-L6-v2", "someone/their-model", "../../etc"):
        r = held.post("/v1/jobs", json={**job_body(train, val), "base_model": name}, headers=key.headers)
        problem = assert_problem(r, 422)
        assert problem["field"] == "base_model" and "not offered" in problem["detail"], problem


def test_a_sweep_without_validation_data_is_422(held, tenant_key):
    key = tenant_key("train")
    train, _ = datasets(held, key.headers, n=16)
    body = {**job_body(train, None), "method": {"name": "spafit", "rank": 2, "sweep": {"n1": [1], "n2": [2, 3]}}}
    problem = assert_problem(held.post("/v1/jobs", json=body, headers=key.headers), 422)
    assert problem["field"] == "validation_dataset", problem


def test_a_job_of_its_own_time_limit_is_shown(held, tenant_key):
    key = tenant_key("train")
    train, val = datasets(held, key.headers, n=16)
    r = held.post("/v1/jobs", json={**job_body(train, val), "time_limit_s": 600}, headers=key.headers)
    assert r.status_code == 202 and r.json()["time_limit_s"] == 600, r.text


def test_a_tenant_over_its_active_job_limit_gets_429_and_others_do_not(held, tenant_key):
    key, other = tenant_key("train"), tenant_key("train")
    train, val = datasets(held, key.headers, n=16)
    idem = {**key.headers, "Idempotency-Key": f"k-{uuid.uuid4()}"}
    created = [held.post("/v1/jobs", json=job_body(train, val, task=f"t{i}"), headers=idem if i == 0 else key.headers)
               for i in range(LIMIT)]
    assert [r.status_code for r in created] == [202] * LIMIT
    r = held.post("/v1/jobs", json=job_body(train, val, task="one-more"), headers=key.headers)
    problem = assert_problem(r, 429)
    assert problem["type"].endswith("/too-many-jobs") and problem["limit"] == LIMIT
    assert int(r.headers["Retry-After"]) > 0
    # Another tenant is not affected.
    o_train, o_val = datasets(held, other.headers, n=16)
    assert held.post("/v1/jobs", json=job_body(o_train, o_val), headers=other.headers).status_code == 202
    # A replayed Idempotency-Key is not a new job: it is answered, not refused.
    first = created[0].json()
    replay = held.post("/v1/jobs", json=job_body(train, val, task="t0"), headers=idem)
    assert replay.status_code == 202 and replay.json()["id"] == first["id"], replay.text
    # A job that ends frees its place.
    assert held.post(f"/v1/jobs/{first['id']}/cancel", headers=key.headers).status_code == 200
    assert held.post("/v1/jobs", json=job_body(train, val, task="now-fits"), headers=key.headers).status_code == 202
    assert_problem(held.post("/v1/jobs", json=job_body(train, val, task="full-again"), headers=key.headers), 429)


def test_each_sweep_trial_counts_toward_the_active_job_limit(held, tenant_key):
    key = tenant_key("train")
    train, val = datasets(held, key.headers, n=16)

    def sweep(n2: list[int]) -> dict:
        return {**job_body(train, val, task="swept"),
                "method": {"name": "spafit", "rank": 2, "sweep": {"n1": [1], "n2": n2}}}

    problem = assert_problem(held.post("/v1/jobs", json=sweep([1, 2, 3, 4]), headers=key.headers), 422)
    assert problem["field"] == "method.sweep" and "more than the 3" in problem["detail"], problem  # 4 > 3, ever
    assert held.post("/v1/jobs", json=job_body(train, val), headers=key.headers).status_code == 202
    r = held.post("/v1/jobs", json=sweep([2, 3, 4]), headers=key.headers)  # 1 active + 3 trials > 3
    assert assert_problem(r, 429)["active"] == 1
    r = held.post("/v1/jobs", json={**sweep([2, 3]), "time_limit_s": 900}, headers=key.headers)  # 1 + 2: fits
    assert r.status_code == 202 and r.json()["kind"] == "sweep", r.text
    trials = held.app.state.sent[-2:]
    assert [held.get(f"/v1/jobs/{t}", headers=key.headers).json()["time_limit_s"] for t in trials] == [900, 900]
    assert_problem(held.post("/v1/jobs", json=job_body(train, val), headers=key.headers), 429)


def test_the_active_job_limit_holds_across_two_api_replicas(held_app_factory, tenant_key, db):
    """Two app instances (replicas) on one database, 16 concurrent creates: never more than the limit."""
    key = tenant_key("train")
    apps = [held_app_factory(max_active_jobs_per_tenant=LIMIT) for _ in range(2)]
    with TestClient(apps[0]) as a, TestClient(apps[1]) as b:
        for app in apps:
            app.state.send_job = app.state.sent.append
        train, val = datasets(a, key.headers, n=16)
        statuses: list[int] = []
        lock = threading.Lock()

        def create(client: TestClient, i: int) -> None:
            r = client.post("/v1/jobs", json=job_body(train, val, task=f"race{i}"), headers=key.headers)
            with lock:
                statuses.append(r.status_code)

        threads = [threading.Thread(target=create, args=((a, b)[i % 2], i)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    with db.session() as s:
        stored = s.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == key.tenant_id))
    assert sorted(statuses) == [202] * LIMIT + [429] * (16 - LIMIT), statuses
    assert stored == LIMIT


def test_registration_refuses_an_adapter_with_non_finite_tensors(db, tenant_key, tiny_base):
    """The registry (which the worker, sweeps and adapter imports all go through) stores no NaN adapter."""
    from safetensors.torch import load, save

    from app.models import AdapterVersion, Task
    from app.services import registry
    from spafit_core.adapter import sha256_hex
    from spafit_core.errors import NonFiniteError
    from tests.api.adapters import random_adapter

    key = tenant_key("train")
    cfg, weights = random_adapter(tiny_base, {"name": "spafit", "n1": 1, "n2": 2, "rank": 4})
    tensors = load(weights)
    name = sorted(tensors)[-1]
    tensors[name][0] = float("nan")
    bad = save(tensors)
    cfg = {**cfg, "weights": {**cfg["weights"], "sha256": sha256_hex(bad)}}
    with db.session() as s, pytest.raises(NonFiniteError, match=name):
        registry.register_version(s, key.tenant_id, "nan-task", cfg, bad)
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Task).where(Task.tenant_id == key.tenant_id)) == 0
        assert s.scalar(select(func.count()).select_from(AdapterVersion).where(AdapterVersion.blob_sha256 == sha256_hex(bad))) == 0


def test_an_unclaimed_job_is_resent_only_while_no_message_waits(make_settings, tiny_base, tenant_key, db,
                                                                redis_client, redis_prefix):
    """The claim timeout re-sends a queued job nobody claimed, unless the training queue still holds messages
    (the job then waits its turn; re-sending it every timeout would pile up duplicates). A broker prefix no
    worker reads: what is sent stays in the queue."""
    from app.models import utcnow
    from app.services import jobs

    prefix = f"{redis_prefix}idle-{uuid.uuid4().hex[:6]}:"
    settings = make_settings(broker_key_prefix=prefix, allowed_base_models=[tiny_base], default_base_model=tiny_base,
                             job_claim_timeout_s=1.0, job_requeue_interval_s=3600.0)
    app = create_app(settings)
    key = tenant_key("train")
    with TestClient(app) as client:
        broker = app.state.send_job
        train, val = datasets(client, key.headers, n=16)
        job_id = uuid.UUID(client.post("/v1/jobs", json=job_body(train, val), headers=key.headers).json()["id"])
        assert broker.waiting() == 1
        with db.transaction() as s:  # sent long ago and never claimed
            s.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow() - timedelta(minutes=5)))
        # (Other tests' jobs in the session's database may be re-sent too: only this job is looked at.)
        assert job_id not in jobs.requeue_orphans(app.state.db, broker, settings)  # its message may still wait
        redis_client.delete(f"{prefix}training")  # taken by a worker that died before claiming
        assert broker.waiting() == 0
        assert job_id in jobs.requeue_orphans(app.state.db, broker, settings)
        assert broker.waiting() >= 1 and job_row_enqueued_recently(db, job_id)


def job_row_enqueued_recently(db, job_id) -> bool:
    from app.models import utcnow

    with db.session() as s:
        return s.get(Job, job_id).enqueued_at > utcnow() - timedelta(seconds=30)
