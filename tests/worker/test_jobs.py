"""Fine-tuning jobs over HTTP with a real Celery worker process, Postgres and Redis: the lifecycle, live
events, idempotency, cancellation, and a worker killed mid-job."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest

from tests.api.helpers import assert_problem, upload
from tests.live import wait_until
from tests.tiny import toy_csv

pytestmark = pytest.mark.slow


def datasets(client, headers, n=64, seed=0):
    train = upload(client, toy_csv(n, seed), "train.csv", headers=headers)
    val = upload(client, toy_csv(24, seed + 100), "val.csv", headers=headers)
    assert train.status_code == 201, train.text
    assert val.status_code == 201, val.text
    return train.json()["id"], val.json()["id"]


def job_body(train, val, task="sentiment", **hp):
    return {"task": task, "train_dataset": train, "validation_dataset": val,
            "method": {"name": "spafit", "n1": 1, "n2": 2, "rank": 4},
            "hyperparameters": {"epochs": 2, "batch_size": 8, "learning_rate": 5e-3, "seed": 1, **hp}}


def wait_for(client, job_id, headers, pred, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if pred(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"timed out; last state: {job}")


def final(job):
    return job["status"] in ("succeeded", "failed", "cancelled")


def test_upload_train_stream_events_and_register_an_adapter(job_client, tenant_key, worker):
    key = tenant_key("train", "predict")
    train, val = datasets(job_client, key.headers)
    r = job_client.post("/v1/jobs", json=job_body(train, val), headers=key.headers)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["adapter_version"] is None

    # Live events over SSE until the job ends.
    seen = []
    with job_client.stream("GET", f"/v1/jobs/{job['id']}/events",
                           headers={**key.headers, "Accept": "text/event-stream"}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data: ") and line != "data: {}":
                seen.append(json.loads(line[6:]))
            if line.startswith("event: end"):
                break
    seqs = [e["seq"] for e in seen]
    assert seqs == list(range(1, len(seqs) + 1))  # ordered, none missing
    kinds = [e["type"] for e in seen]
    assert kinds[0] == "status" and seen[0]["data"]["status"] == "queued"
    assert {"progress", "eval", "checkpoint"} <= set(kinds)
    progress = [e["data"] for e in seen if e["type"] == "progress"]
    assert progress[-1]["step"] == progress[-1]["total_steps"] == 16
    assert all("loss" in p and "lr" in p and "eta_seconds" in p for p in progress)
    assert seen[-1]["type"] == "status" and seen[-1]["data"]["status"] == "succeeded", worker.tail()

    done = job_client.get(f"/v1/jobs/{job['id']}", headers=key.headers).json()
    assert done["status"] == "succeeded" and done["adapter_version"] == 1 and done["error"] is None
    assert set(done["metrics"]) >= {"accuracy", "f1"}
    assert done["progress"]["step"] == 16 and done["attempts"] == 1

    # The plain JSON listing of events matches the stream.
    listed = job_client.get(f"/v1/jobs/{job['id']}/events", headers=key.headers).json()
    assert [e["seq"] for e in listed] == seqs
    # The job list filters by status and task.
    page = job_client.get("/v1/jobs", params={"status": "succeeded", "task": "sentiment"}, headers=key.headers)
    assert [j["id"] for j in page.json()["items"]] == [job["id"]]
    assert job_client.get("/v1/jobs", params={"status": "failed"}, headers=key.headers).json()["items"] == []


def test_idempotency_key_returns_the_same_job(job_client, tenant_key):
    key = tenant_key("train")
    train, val = datasets(job_client, key.headers, n=16)
    headers = {**key.headers, "Idempotency-Key": f"create-{uuid.uuid4()}"}
    body = job_body(train, val, task="idem", epochs=1)
    first = job_client.post("/v1/jobs", json=body, headers=headers)
    again = job_client.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    other = job_client.post("/v1/jobs", json={**body, "task": "idem2"}, headers=headers)
    assert_problem(other, 409)
    listed = job_client.get("/v1/jobs", params={"task": "idem"}, headers=key.headers).json()["items"]
    assert len(listed) == 1


def test_cancel_a_queued_job_at_once(job_client, job_app, tenant_key):
    key = tenant_key("train")
    train, val = datasets(job_client, key.headers, n=16)
    sent = []
    job_app.state.send_job = sent.append  # hold the message back: the job stays queued
    job = job_client.post("/v1/jobs", json=job_body(train, val, task="queued-cancel"), headers=key.headers).json()
    assert sent == [uuid.UUID(job["id"])]
    r = job_client.post(f"/v1/jobs/{job['id']}/cancel", headers=key.headers)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    # A late delivery of its message is a no-op.
    from worker.celery_app import TRAINING_QUEUE, make_celery

    make_celery(job_app.state.settings).send_task("spafit.train_adapter", args=[job["id"]], queue=TRAINING_QUEUE)
    time.sleep(2)
    again = job_client.get(f"/v1/jobs/{job['id']}", headers=key.headers).json()
    assert again["status"] == "cancelled" and again["attempts"] == 0
    assert_problem(job_client.post(f"/v1/jobs/{job['id']}/cancel", headers=key.headers), 409)


def test_cancel_a_running_job_stops_it_and_leaves_no_adapter(job_client, tenant_key, db):
    """...nor a checkpoint: the job's pointer and the blob it pointed at go with its final status."""
    from app.models import Blob, Job

    key = tenant_key("train", "predict")
    train, val = datasets(job_client, key.headers, n=400)
    job = job_client.post("/v1/jobs", json=job_body(train, val, task="run-cancel", epochs=20, batch_size=4),
                          headers=key.headers).json()

    def checkpoint() -> str | None:
        with db.session() as s:
            return s.get(Job, uuid.UUID(job["id"])).checkpoint_sha256

    sha = wait_until(checkpoint, 120, "the job's first checkpoint")
    r = job_client.post(f"/v1/jobs/{job['id']}/cancel", headers=key.headers)
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    done = wait_for(job_client, job["id"], key.headers, final)
    assert done["status"] == "cancelled" and done["adapter_version"] is None
    assert done["progress"]["step"] < done["progress"]["total_steps"]
    assert_problem(job_client.get("/v1/tasks/run-cancel", headers=key.headers), 404)
    assert checkpoint() is None
    with db.session() as s:
        assert s.get(Blob, sha) is None


def test_worker_killed_mid_job_resumes_from_its_checkpoint(job_client, tenant_key, worker):
    """SIGKILL the child running the job: the message is re-delivered, a new child claims the job (attempt
    2), resumes from the last checkpoint (its first step is past zero) and registers exactly one version."""
    key = tenant_key("train")
    train, val = datasets(job_client, key.headers, n=400)
    job = job_client.post("/v1/jobs", json=job_body(train, val, task="killed", epochs=3, batch_size=4),
                          headers=key.headers).json()
    running = wait_for(job_client, job["id"], key.headers,
                       lambda j: j["status"] == "running" and (j["progress"] or {}).get("step", 0) >= 12)
    events = job_client.get(f"/v1/jobs/{job['id']}/events", headers=key.headers).json()
    assert any(e["type"] == "checkpoint" for e in events)
    pid = _claimer_pid(job_client, job["id"], key.headers)
    os.kill(pid, signal.SIGKILL)
    done = wait_for(job_client, job["id"], key.headers, final, timeout=180)
    assert done["status"] == "succeeded", (done, worker.tail())
    assert done["attempts"] == 2 and done["adapter_version"] == 1
    events = job_client.get(f"/v1/jobs/{job['id']}/events", headers=key.headers).json()
    starts = [e for e in events if e["type"] == "status" and e["data"].get("status") == "running"]
    assert [s["data"]["attempt"] for s in starts] == [1, 2] and starts[1]["data"]["resume"] is True
    resumed = [e for e in events if e["type"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["data"]["step"] >= 5  # not from zero
    after = [e["data"]["step"] for e in events if e["type"] == "progress" and e["seq"] > resumed[0]["seq"]]
    assert after[0] == resumed[0]["data"]["step"] + 1
    assert running["progress"]["step"] >= 12
    versions = job_client.get("/v1/tasks/killed/versions", headers=key.headers)
    assert versions.status_code == 200 and len(versions.json()["items"]) == 1


def _claimer_pid(client, job_id, headers) -> int:
    """The pid of the worker child holding the job (from the job row's claimed_by)."""
    from sqlalchemy import select

    from app.models import Job

    db = client.app.state.db
    with db.session() as s:
        claimed_by = s.scalar(select(Job.claimed_by).where(Job.id == uuid.UUID(job_id)))
    return int(claimed_by.rpartition(":")[2])


@pytest.mark.parametrize("body_change,field", [
    ({"method": {"name": "spafit", "n1": 3, "n2": 1}}, "method.n1"),
    ({"method": {"name": "spafit", "rank": 0}}, "method.rank"),
    ({"method": {"name": "spafit", "targets": ["query", "nope"]}}, "method.targets"),
    ({"method": {"name": "spafit", "n2": 9}}, "method.n2"),
    ({"task": "../etc"}, "task"),
    ({"label_field": "missing"}, "label_field"),
])
def test_invalid_job_requests_are_422_naming_the_field(job_client, tenant_key, body_change, field):
    key = tenant_key("train")
    train, val = datasets(job_client, key.headers, n=16)
    body = {**job_body(train, val), **body_change}
    r = job_client.post("/v1/jobs", json=body, headers=key.headers)
    problem = assert_problem(r, 422)
    assert problem.get("field") == field or field in json.dumps(problem), problem


def test_job_routes_are_tenant_scoped_and_need_scopes(job_client, tenant_key):
    owner, other = tenant_key("train"), tenant_key("train", "predict")
    train, val = datasets(job_client, owner.headers, n=16)
    assert_problem(job_client.post("/v1/jobs", json=job_body(train, val), headers=other.headers), 404)
    job = job_client.post("/v1/jobs", json=job_body(train, val, task="mine", epochs=1), headers=owner.headers)
    jid = job.json()["id"]
    for method, path in [("GET", f"/v1/jobs/{jid}"), ("GET", f"/v1/jobs/{jid}/events"),
                         ("POST", f"/v1/jobs/{jid}/cancel")]:
        assert_problem(job_client.request(method, path, headers=other.headers), 404)
    reader = tenant_key("predict", tenant=owner.tenant_id)
    assert_problem(job_client.post("/v1/jobs", json=job_body(train, val), headers=reader.headers), 403)
    assert_problem(job_client.post(f"/v1/jobs/{jid}/cancel", headers=reader.headers), 403)
    assert_problem(job_client.get(f"/v1/jobs/{jid}", headers={"Authorization": "Bearer spafit_bad_key"}), 401)
