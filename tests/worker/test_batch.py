"""Batch prediction and evaluation jobs over HTTP, run by the session's real Celery worker on Postgres and Redis:
results equal the engine's own predictions, row for row; a worker child SIGKILLed mid-job resumes after its last
stored chunk and the result has every row exactly once; evaluation metrics, the versions list and comparison;
the per-tenant limits and the errors."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.api.adapters import SPAFIT, random_adapter, register
from tests.api.helpers import assert_problem, upload
from tests.live import WORKER_SETTINGS
from tests.tiny import toy_csv

pytestmark = pytest.mark.slow

LABELS = ("negative", "positive")
FINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture
def batch_client(make_settings, tiny_base, worker) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from app.main import create_app

    app = create_app(make_settings(allowed_base_models=[tiny_base], default_base_model=tiny_base,
                                   batch_chunk_rows=16, batch_max_rows_per_job=5000, **WORKER_SETTINGS))
    with TestClient(app) as c:
        yield c


def _version(db, tenant_id, tiny_base, task="sentiment", seed=0):
    cfg, weights = random_adapter(tiny_base, SPAFIT, labels=LABELS, seed=seed)
    return register(db, tenant_id, task, cfg, weights), cfg, weights


def _dataset(client, headers, n, seed=0, with_id=False) -> str:
    data = toy_csv(n, seed)
    if with_id:
        rows = list(csv.reader(io.StringIO(data.decode())))
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["id", *rows[0]])
        for i, r in enumerate(rows[1:]):
            w.writerow([f"row-{i}", *r])
        data = buf.getvalue().encode()
    r = upload(client, data, "rows.csv", headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _wait(client, job_id, headers, timeout=120, worker=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in FINAL:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never ended: {job}\n{worker.tail() if worker else ''}")


def _engine_predictions(tiny_base, cfg, weights, texts) -> list[dict]:
    from spafit_core.engine import Engine

    engine = Engine(device="cpu", default_base_model=tiny_base)
    engine.load("v", cfg, weights)
    return engine.predict("v", texts)


def _texts(n, seed=0) -> list[str]:
    return [r["text"] for r in csv.DictReader(io.StringIO(toy_csv(n, seed).decode()))]


def test_batch_prediction_matches_the_engine_row_for_row(batch_client, tenant_key, db, tiny_base, worker):
    key = tenant_key("train")
    _, cfg, weights = _version(db, key.tenant_id, tiny_base)
    ds = _dataset(batch_client, key.headers, 70, with_id=True)
    r = batch_client.post("/v1/batch-predictions", json={"task": "sentiment", "dataset": ds, "all_scores": True},
                          headers=key.headers)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "predict" and job["status"] == "queued" and job["adapter_version"] == 1
    done = _wait(batch_client, job["id"], key.headers, worker=worker)
    assert done["status"] == "succeeded", (done, worker.tail())
    assert done["progress"]["step"] == done["progress"]["total_steps"] == 70
    assert done["metrics"]["rows"] == 70

    with batch_client.stream("GET", f"/v1/batch-predictions/{job['id']}/results", headers=key.headers) as res:
        assert res.status_code == 200
        assert res.headers["content-type"].startswith("application/x-ndjson")
        body = b"".join(res.iter_bytes())
    rows = [json.loads(line) for line in body.decode().splitlines()]
    assert [r["id"] for r in rows] == [f"row-{i}" for i in range(70)]  # every row once, in order
    want = _engine_predictions(tiny_base, cfg, weights, _texts(70))
    for got, exp in zip(rows, want, strict=True):
        assert got["label"] == exp["label"]
        assert got["score"] == pytest.approx(exp["score"], abs=1e-5)
        assert {s["label"] for s in got["scores"]} == set(LABELS)

    events = batch_client.get(f"/v1/jobs/{job['id']}/events", headers=key.headers).json()
    kinds = [(e["type"], e["data"].get("status")) for e in events]
    assert kinds[0] == ("status", "queued") and kinds[-1] == ("status", "succeeded")
    assert sum(1 for k, _ in kinds if k == "progress") == 5  # ceil(70 / 16) chunks

    listed = batch_client.get("/v1/batch-predictions", headers=key.headers).json()["items"]
    assert [j["id"] for j in listed] == [job["id"]]


def test_csv_results_with_row_index_ids(batch_client, tenant_key, db, tiny_base, worker):
    from sqlalchemy import func, select

    from app.models import BatchChunk
    key = tenant_key("train")
    _version(db, key.tenant_id, tiny_base)
    ds = _dataset(batch_client, key.headers, 20)
    r = batch_client.post("/v1/batch-predictions", json={"task": "sentiment", "version": 1, "dataset": ds,
                                                         "format": "csv"}, headers=key.headers)
    assert r.status_code == 202, r.text
    assert _wait(batch_client, r.json()["id"], key.headers, worker=worker)["status"] == "succeeded"
    res = batch_client.get(f"/v1/batch-predictions/{r.json()['id']}/results", headers=key.headers)
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/csv")
    r_id = r.json()["id"]
    rows = list(csv.DictReader(io.StringIO(res.text)))
    assert [int(r["id"]) for r in rows] == list(range(20))
    assert all(r["label"] in LABELS and 0 < float(r["score"]) <= 1 and r["scores"] == "" for r in rows)
    # a finished batch job deletes like any job, its stored chunks with it; then its dataset can go
    assert batch_client.delete(f"/v1/jobs/{r_id}", headers=key.headers).status_code == 204
    assert_problem(batch_client.get(f"/v1/batch-predictions/{r_id}/results", headers=key.headers), 404)
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(BatchChunk).where(BatchChunk.job_id == uuid.UUID(r_id))) == 0
    assert batch_client.delete(f"/v1/datasets/{ds}", headers=key.headers).status_code == 204


def test_bad_requests_limits_and_other_tenants(batch_client, tenant_key, db, tiny_base):
    key, other = tenant_key("train"), tenant_key("train")
    _version(db, key.tenant_id, tiny_base)
    ds = _dataset(batch_client, key.headers, 20)
    post = batch_client.post
    assert_problem(post("/v1/batch-predictions", json={"task": "nope", "dataset": ds}, headers=key.headers), 404)
    assert_problem(post("/v1/batch-predictions", json={"task": "sentiment", "version": 9, "dataset": ds},
                        headers=key.headers), 404)
    assert_problem(post("/v1/batch-predictions", json={"task": "sentiment", "dataset": ds},
                        headers=other.headers), 404)  # another tenant's task and dataset do not exist for it
    _version(db, other.tenant_id, tiny_base)
    assert_problem(post("/v1/batch-predictions", json={"task": "sentiment", "dataset": ds},
                        headers=other.headers), 404, "not-found")  # ... nor its dataset
    assert_problem(post("/v1/batch-predictions", json={"task": "sentiment", "dataset": ds, "text_fields": ["x"]},
                        headers=key.headers), 422)
    assert_problem(post("/v1/batch-predictions", json={"task": "sentiment", "dataset": ds, "format": "xml"},
                        headers=key.headers), 422)
    assert_problem(post("/v1/batch-predictions", json={"task": "sentiment", "dataset": ds, "top_k": 0},
                        headers=key.headers), 422)
    big = _dataset(batch_client, key.headers, 5001)
    assert_problem(post("/v1/batch-predictions", json={"task": "sentiment", "dataset": big}, headers=key.headers),
                   422, "too-many-rows")
    assert_problem(post("/v1/batch-predictions", json={"task": "sentiment", "dataset": ds}, headers=tenant_key(
        "predict", tenant=key.tenant_id).headers), 403)

    batch_client.app.state.send_job = lambda job_id: None  # held queued: no worker takes it
    r = post("/v1/batch-predictions", json={"task": "sentiment", "dataset": ds}, headers=key.headers)
    assert r.status_code == 202
    job_id = r.json()["id"]
    assert_problem(batch_client.get(f"/v1/batch-predictions/{job_id}/results", headers=key.headers), 409,
                   "results-not-ready")
    assert_problem(batch_client.get(f"/v1/batch-predictions/{job_id}/results", headers=other.headers), 404)
    assert_problem(batch_client.get(f"/v1/batch-predictions/{uuid.uuid4()}", headers=key.headers), 404)
    again = post("/v1/batch-predictions", json={"task": "sentiment", "dataset": ds}, headers={
        **key.headers, "Idempotency-Key": "k1"})
    replay = post("/v1/batch-predictions", json={"task": "sentiment", "dataset": ds}, headers={
        **key.headers, "Idempotency-Key": "k1"})
    assert replay.json()["id"] == again.json()["id"] and replay.headers["Idempotent-Replayed"] == "true"
    assert_problem(post("/v1/batch-predictions", json={"task": "sentiment", "dataset": ds, "format": "csv"},
                        headers={**key.headers, "Idempotency-Key": "k1"}), 409)
    cancelled = batch_client.post(f"/v1/jobs/{job_id}/cancel", headers=key.headers).json()
    assert cancelled["status"] == "cancelled"
    # the dataset a batch job names cannot be deleted under it
    assert_problem(batch_client.delete(f"/v1/datasets/{ds}", headers=key.headers), 409)


def test_active_jobs_limit_counts_batch_jobs(make_settings, tenant_key, db, tiny_base):
    from fastapi.testclient import TestClient

    from app.main import create_app

    app = create_app(make_settings(allowed_base_models=[tiny_base], default_base_model=tiny_base,
                                   max_active_jobs_per_tenant=1, **WORKER_SETTINGS))
    with TestClient(app) as c:
        c.app.state.send_job = lambda job_id: None
        key = tenant_key("train")
        _version(db, key.tenant_id, tiny_base)
        ds = _dataset(c, key.headers, 20)
        assert c.post("/v1/batch-predictions", json={"task": "sentiment", "dataset": ds},
                      headers=key.headers).status_code == 202
        r = c.post("/v1/tasks/sentiment/versions/1/evaluate", json={"dataset": ds}, headers=key.headers)
        assert_problem(r, 429, "too-many-jobs")


@pytest.mark.parametrize("tasks", [1, 2], ids=["one-task", "two-tasks-fan-out"])
def test_worker_killed_mid_batch_prediction_resumes_and_writes_every_row_once(batch_client, tenant_key, db,
                                                                               tiny_base, worker, tasks):
    from tests.reliability.conftest import job_row

    key = tenant_key("train")
    _version(db, key.tenant_id, tiny_base)
    body: dict[str, Any] = {"task": "sentiment"}
    if tasks == 2:
        _version(db, key.tenant_id, tiny_base, task="topic", seed=1)
        body = {"tasks": ["sentiment", "topic"]}
    n = 4000 if tasks == 1 else 2400  # rows x tasks within the fixture's per-job limit (5000)
    ds = _dataset(batch_client, key.headers, n, seed=3, with_id=True)
    r = batch_client.post("/v1/batch-predictions", json={**body, "dataset": ds}, headers=key.headers)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    killed = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and killed is None:
        job = job_row(db, job_id)
        step = (job.progress or {}).get("step") or 0
        assert job.status not in FINAL, f"the job ended before it could be killed: {job.status}, step {step}"
        if job.status == "running" and 16 * 3 <= step < n - 16 * 10:
            killed = (int(job.claimed_by.rpartition(":")[2]), step)
            os.kill(killed[0], signal.SIGKILL)  # the worker child running the job, mid-stream
        time.sleep(0.02)
    assert killed is not None, worker.tail()
    done = _wait(batch_client, job_id, key.headers, timeout=180, worker=worker)
    assert done["status"] == "succeeded", (done, worker.tail())
    assert done["attempts"] == 2
    events = batch_client.get(f"/v1/jobs/{job_id}/events?limit=10000", headers=key.headers).json()
    starts = [e["data"] for e in events if e["type"] == "status" and e["data"].get("status") == "running"]
    assert len(starts) == 2
    chunks = [e["data"]["chunk"] for e in events if e["type"] == "progress"]
    assert chunks == list(range(len(chunks))) and len(chunks) == -(-n // 16)  # each chunk stored once
    text = batch_client.get(f"/v1/batch-predictions/{job_id}/results", headers=key.headers).text
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["id"] for r in rows] == [f"row-{i}" for i in range(n)]  # every row exactly once, in order
    if tasks == 2:
        assert all(set(r["results"]) == {"sentiment", "topic"} for r in rows)


def test_evaluate_versions_list_and_compare(batch_client, tenant_key, db, tiny_base, worker):
    key = tenant_key("train")
    _version(db, key.tenant_id, tiny_base, seed=0)
    _version(db, key.tenant_id, tiny_base, seed=1)
    ds = _dataset(batch_client, key.headers, 40, seed=5)
    ids = []
    for v in (1, 2):
        r = batch_client.post(f"/v1/tasks/sentiment/versions/{v}/evaluate", json={"dataset": ds}, headers=key.headers)
        assert r.status_code == 202, r.text
        assert r.json()["kind"] == "evaluate"
        ids.append(r.json()["id"])
    for job_id in ids:
        done = _wait(batch_client, job_id, key.headers, worker=worker)
        assert done["status"] == "succeeded", (done, worker.tail())
    m = done["metrics"]
    assert set(m) >= {"accuracy", "macro_f1", "f1", "per_class", "confusion_matrix"}
    assert sum(map(sum, m["confusion_matrix"])) == 40
    cm = m["confusion_matrix"]
    assert m["accuracy"] == pytest.approx((cm[0][0] + cm[1][1]) / 40)
    assert set(m["per_class"]) == set(LABELS)

    versions = batch_client.get("/v1/tasks/sentiment/versions", headers=key.headers).json()["items"]
    by = {v["version"]: v for v in versions}
    assert len(by[1]["evaluations"]) == len(by[2]["evaluations"]) == 1
    assert by[2]["evaluations"][0]["metrics"] == m and by[2]["evaluations"][0]["dataset"] == ds

    cmp = batch_client.get("/v1/tasks/sentiment/versions?compare=1,2", headers=key.headers)
    assert cmp.status_code == 200, cmp.text
    row = cmp.json()["compare"]["datasets"][0]
    assert row["dataset"] == ds and row["delta"]["accuracy"] == pytest.approx(
        row["b"]["metrics"]["accuracy"] - row["a"]["metrics"]["accuracy"])
    assert_problem(batch_client.get("/v1/tasks/sentiment/versions?compare=1", headers=key.headers), 422)
    assert_problem(batch_client.get("/v1/tasks/sentiment/versions?compare=1,7", headers=key.headers), 404)
    # no such label column; another tenant's version; another tenant's dataset
    assert_problem(batch_client.post("/v1/tasks/sentiment/versions/1/evaluate",
                                     json={"dataset": ds, "label_field": "nope"}, headers=key.headers), 422)
    other = tenant_key("train")
    assert_problem(batch_client.post("/v1/tasks/sentiment/versions/1/evaluate", json={"dataset": ds},
                                     headers=other.headers), 404)
    _version(db, other.tenant_id, tiny_base)
    assert_problem(batch_client.post("/v1/tasks/sentiment/versions/1/evaluate", json={"dataset": ds},
                                     headers=other.headers), 404)
    assert other and batch_client.get("/v1/tasks/sentiment/versions", headers=other.headers).json()[
        "items"][0]["evaluations"] == []


def _cancel_while_paused(client, db, job_id: str, claimed_by: str, headers: dict) -> Any:
    """POST the cancel of a running job while the worker child running it is paused (SIGSTOP), and keep it paused
    until its next heartbeat is overdue. The worker reads the cancel flag only at a heartbeat (every 0.5 s here):
    sent to a running child, the cancel raced the rest of the job, and a machine that predicts the remaining rows
    within one beat would see it succeed (the shape of CI's delete-during-evaluation failure). Paused, the child
    cannot finish before the flag is set, and on waking its overdue beat runs at once and reads it, with nearly all
    rows still to go. Each pause stays well under the 4 s heartbeat staleness (tests/live.py WORKER_SETTINGS)."""
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as FutureTimeout
    from datetime import timedelta

    from app.models import utcnow
    from tests.live import wait_until
    from tests.reliability.conftest import job_row

    pid = int(claimed_by.rpartition(":")[2])
    os.kill(pid, signal.SIGSTOP)
    try:
        paused = job_row(db, job_id)
        assert paused.status == "running" and paused.claimed_by == claimed_by, (paused.status, paused.progress)
        with ThreadPoolExecutor(1) as pool:
            asked = pool.submit(client.post, f"/v1/jobs/{job_id}/cancel", headers=headers)
            try:
                r = asked.result(timeout=1.5)
            except FutureTimeout:  # paused inside a write holding the job's row: let it commit, then pause again
                os.kill(pid, signal.SIGCONT)
                r = asked.result(timeout=30)
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:  # woken, it read the flag set meanwhile and its child ended: cancelled
                    return r
        overdue = timedelta(seconds=2 * WORKER_SETTINGS["job_heartbeat_interval_s"])
        wait_until(lambda: utcnow() - job_row(db, job_id).heartbeat_at > overdue, 5,
                   "the paused worker's next heartbeat to be due")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    return r


def test_cancel_a_running_batch_prediction(batch_client, tenant_key, db, tiny_base, worker):
    from tests.reliability.conftest import job_row

    key = tenant_key("train")
    _version(db, key.tenant_id, tiny_base)
    ds = _dataset(batch_client, key.headers, 4000, seed=4)
    job_id = batch_client.post("/v1/batch-predictions", json={"task": "sentiment", "dataset": ds},
                               headers=key.headers).json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = job_row(db, job_id)
        if job.status == "running" and ((job.progress or {}).get("step") or 0) >= 32:
            break
        assert job.status not in FINAL, job.status
        time.sleep(0.02)
    r = _cancel_while_paused(batch_client, db, job_id, job.claimed_by, key.headers)
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    done = _wait(batch_client, job_id, key.headers, worker=worker)
    assert done["status"] == "cancelled", (done, worker.tail())
    assert done["progress"]["step"] < 4000
    assert_problem(batch_client.get(f"/v1/batch-predictions/{job_id}/results", headers=key.headers), 409,
                   "results-not-ready")


def test_a_dataset_whose_stored_bytes_were_altered_fails_the_job(batch_client, tenant_key, db, tiny_base, worker):
    from sqlalchemy import update

    from app.models import Blob

    key = tenant_key("train")
    _version(db, key.tenant_id, tiny_base)
    r = upload(batch_client, toy_csv(30, 911) + b"unique row 911 xyz,positive\n", "rows.csv", headers=key.headers)
    assert r.status_code == 201, r.text
    ds, sha = r.json()["id"], r.json()["sha256"]
    with db.transaction() as s:  # storage rot: same length, one letter changed
        data = bytes(s.get(Blob, sha).data)
        s.execute(update(Blob).where(Blob.sha256 == sha).values(data=data.replace(b"xyz", b"xYz")))
    job_id = batch_client.post("/v1/batch-predictions", json={"task": "sentiment", "dataset": ds},
                               headers=key.headers).json()["id"]
    done = _wait(batch_client, job_id, key.headers, worker=worker)
    assert done["status"] == "failed" and done["error"]["type"] == "blob-corrupted", (done, worker.tail())
    assert_problem(batch_client.get(f"/v1/batch-predictions/{job_id}/results", headers=key.headers), 409)


# ------------------------------------------------------------------------------------- several tasks (fan-out)
def test_several_tasks_in_one_job_match_each_tasks_own_predictions(batch_client, tenant_key, db, tiny_base, worker):
    key = tenant_key("train")
    _, cfg_a, w_a = _version(db, key.tenant_id, tiny_base, task="sentiment", seed=0)
    _version(db, key.tenant_id, tiny_base, task="topic", seed=1)
    _, cfg_b, w_b = _version(db, key.tenant_id, tiny_base, task="topic", seed=2)  # v2, not the active one
    _version(db, key.tenant_id, tiny_base, task="topic", seed=3)  # v3: the active one
    ds = _dataset(batch_client, key.headers, 40, seed=6, with_id=True)
    tasks = ["sentiment", {"task": "topic", "version": 2}]
    r = batch_client.post("/v1/batch-predictions", json={"tasks": tasks, "dataset": ds, "all_scores": True},
                          headers=key.headers)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["task"] == "sentiment" and [(t["task"], t["version"]) for t in job["hyperparameters"]["tasks"]] == [
        ("sentiment", 1), ("topic", 2)]
    csv_job = batch_client.post("/v1/batch-predictions", json={"tasks": tasks, "dataset": ds, "format": "csv"},
                                headers=key.headers).json()
    for j in (job, csv_job):
        done = _wait(batch_client, j["id"], key.headers, worker=worker)
        assert done["status"] == "succeeded" and done["progress"]["step"] == 40, (done, worker.tail())

    body = batch_client.get(f"/v1/batch-predictions/{job['id']}/results", headers=key.headers).text
    rows = [json.loads(line) for line in body.splitlines()]
    assert [r["id"] for r in rows] == [f"row-{i}" for i in range(40)]
    texts = _texts(40, 6)
    for name, cfg, weights in (("sentiment", cfg_a, w_a), ("topic", cfg_b, w_b)):
        want = _engine_predictions(tiny_base, cfg, weights, texts)
        for got, exp in zip(rows, want, strict=True):
            assert got["results"][name]["label"] == exp["label"]
            assert got["results"][name]["score"] == pytest.approx(exp["score"], abs=1e-5)
            assert {s["label"] for s in got["results"][name]["scores"]} == set(LABELS)

    res = batch_client.get(f"/v1/batch-predictions/{csv_job['id']}/results", headers=key.headers)
    table = list(csv.DictReader(io.StringIO(res.text)))
    assert list(table[0]) == ["id", "sentiment.label", "sentiment.score", "sentiment.scores", "topic.label",
                              "topic.score", "topic.scores"]
    assert [(t["id"], t["sentiment.label"], t["topic.label"]) for t in table] == [
        (r["id"], r["results"]["sentiment"]["label"], r["results"]["topic"]["label"]) for r in rows]


def test_several_tasks_bad_requests_name_the_task(batch_client, tenant_key, db, tiny_base, tmp_path):
    from tests.api.adapters import tiny_backbone

    key = tenant_key("train")
    _version(db, key.tenant_id, tiny_base, task="sentiment")
    _version(db, key.tenant_id, tiny_base, task="topic", seed=1)
    other_base = tiny_backbone(tmp_path, seed=7)
    cfg, weights = random_adapter(other_base, SPAFIT, labels=LABELS, seed=0)
    register(db, key.tenant_id, "elsewhere", cfg, weights)
    ds = _dataset(batch_client, key.headers, 30)
    batch_client.app.state.send_job = lambda job_id: None  # nothing here needs the worker

    def post(body: dict):
        return batch_client.post("/v1/batch-predictions", json={"dataset": ds, **body}, headers=key.headers)

    p = assert_problem(post({"tasks": ["sentiment", "nope"]}), 404, "not-found")
    assert p["field"] == "tasks[1]" and "nope" in p["detail"]
    p = assert_problem(post({"tasks": ["sentiment", {"task": "topic", "version": 5}]}), 404)
    assert p["field"] == "tasks[1]" and "topic" in p["detail"] and "5" in p["detail"]
    p = assert_problem(post({"tasks": ["sentiment", "elsewhere"]}), 422, "invalid-config")
    assert p["field"] == "tasks" and "elsewhere" in p["detail"] and "base model" in p["detail"]
    p = assert_problem(post({"tasks": ["sentiment", "topic", "sentiment"]}), 422)
    assert p["field"] == "tasks[2]" and "twice" in p["detail"]
    p = assert_problem(post({"tasks": ["sentiment", "Bad Name"]}), 422)
    assert p["field"] == "tasks[1]"
    assert_problem(post({"task": "sentiment", "tasks": ["topic"]}), 422)
    assert_problem(post({}), 422)
    assert_problem(post({"tasks": []}), 422)
    assert_problem(post({"tasks": ["sentiment"], "version": 1}), 422)
    # the per-job row limit (5000 here) counts rows x tasks: 2,000 rows pass for one task, not for three
    big = _dataset(batch_client, key.headers, 2000)
    assert post({"tasks": ["sentiment"], "dataset": big}).status_code == 202
    _version(db, key.tenant_id, tiny_base, task="third", seed=2)
    p = assert_problem(post({"tasks": ["sentiment", "topic", "third"], "dataset": big}), 422, "too-many-rows")
    assert "2000 rows x 3 tasks = 6000" in p["detail"]


# --------------------------------------------------------------------------------------------- GLUE metrics
def _as_glue_import(db, dataset_id: str, config: str) -> None:
    """Mark an uploaded dataset as imported from the Hub's `glue` (config `config`): the import itself needs the
    network, and what the evaluation reads is this record of where the rows came from."""
    from sqlalchemy import update

    from app.models import Dataset

    with db.transaction() as s:
        s.execute(update(Dataset).where(Dataset.id == uuid.UUID(dataset_id)).values(
            source="hf", source_detail={"name": "glue", "split": "validation", "config_name": config}))


def test_evaluation_reports_the_glue_presets_metric(batch_client, tenant_key, db, tiny_base, worker):
    from spafit_core import metrics as m

    key = tenant_key("train")
    cola = ("unacceptable", "acceptable")
    cfg, weights = random_adapter(tiny_base, SPAFIT, labels=cola, seed=4)
    register(db, key.tenant_id, "cola", cfg, weights)
    data = toy_csv(40, 12).replace(b",negative", b",unacceptable").replace(b",positive", b",acceptable")
    r = upload(batch_client, data, "cola.csv", headers=key.headers)
    assert r.status_code == 201, r.text
    glue_ds = r.json()["id"]
    _as_glue_import(db, glue_ds, "cola")
    # the same rows, uploaded: no preset there, and version 1 was not trained on one
    plain = upload(batch_client, data + b"one more row,acceptable\n", "plain.csv", headers=key.headers).json()["id"]
    ids = [batch_client.post("/v1/tasks/cola/versions/1/evaluate", json={"dataset": d}, headers=key.headers).json()
           for d in (glue_ds, plain)]
    assert ids[0]["hyperparameters"]["glue_preset"] == "cola" and "glue_preset" not in ids[1]["hyperparameters"]
    glue, generic = (_wait(batch_client, j["id"], key.headers, worker=worker) for j in ids)
    assert glue["status"] == generic["status"] == "succeeded", (glue, generic, worker.tail())
    mg = glue["metrics"]
    assert mg["glue_preset"] == "cola" and mg["glue_metrics"] == ["matthews_corrcoef"]
    assert mg["main_metric"] == "matthews_corrcoef"
    assert {"accuracy", "macro_f1", "f1", "confusion_matrix"} <= set(mg)  # the generic ones as well
    (tn, fp), (fn, tp) = mg["confusion_matrix"]
    preds = [0] * tn + [1] * fp + [0] * fn + [1] * tp
    gold = [0] * (tn + fp) + [1] * (fn + tp)
    assert mg["matthews_corrcoef"] == pytest.approx(m.matthews_corrcoef(preds, gold))
    assert "matthews_corrcoef" not in generic["metrics"] and generic["metrics"]["main_metric"] == "f1"
    shown = batch_client.get("/v1/tasks/cola/versions", headers=key.headers).json()["items"][0]["evaluations"]
    assert {e["dataset"]: e["metrics"].get("glue_preset") for e in shown} == {glue_ds: "cola", plain: None}

    # a version trained on a GLUE import (its job's dataset) reports the preset on any dataset: MRPC, F1 of
    # `equivalent` wherever that label sits, and accuracy
    mrpc = upload(batch_client, toy_csv(30, 13), "mrpc-train.csv", headers=key.headers).json()["id"]
    _as_glue_import(db, mrpc, "mrpc")
    batch_client.app.state.send_job = lambda job_id: None
    _version(db, key.tenant_id, tiny_base, task="para")
    trained_by = batch_client.post("/v1/batch-predictions", json={"task": "para", "dataset": mrpc},
                                   headers=key.headers).json()["id"]  # a job whose dataset is the GLUE import
    batch_client.post(f"/v1/jobs/{trained_by}/cancel", headers=key.headers)
    cfg, weights = random_adapter(tiny_base, SPAFIT, labels=("equivalent", "not_equivalent"), seed=5)
    with db.session() as s:
        from app.services import registry

        registry.register_version(s, key.tenant_id, "para", cfg, weights, job_id=uuid.UUID(trained_by))
        s.commit()
    data = toy_csv(30, 14).replace(b",negative", b",equivalent").replace(b",positive", b",not_equivalent")
    eval_ds = upload(batch_client, data, "mrpc-dev.csv", headers=key.headers).json()["id"]
    r = batch_client.post("/v1/tasks/para/versions/2/evaluate", json={"dataset": eval_ds}, headers=key.headers)
    assert r.status_code == 202 and r.json()["hyperparameters"]["glue_preset"] == "mrpc", r.text
    batch_client.post(f"/v1/jobs/{r.json()['id']}/cancel", headers=key.headers)


def test_glue_metrics_follow_the_presets_definitions():
    from spafit_core import metrics as m
    from worker.batch import evaluation_metrics

    preds, gold = [0, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]
    # MRPC with the version's labels in the other order: F1 is of `equivalent` (index 0 here)
    out = evaluation_metrics("single_label_classification", preds, gold, ["equivalent", "not_equivalent"], "mrpc")
    assert out["glue_metrics"] == ["f1", "accuracy"] and out["main_metric"] == "f1"
    assert out["f1"] == pytest.approx(m.f1(preds, gold, positive=0)) != pytest.approx(m.f1(preds, gold))
    assert out["accuracy"] == pytest.approx(0.5)
    out = evaluation_metrics("regression", [0.1, 0.5, 0.9, 0.3], [0.0, 1.0, 2.0, 0.2], [], "stsb")
    assert out["glue_preset"] == "stsb" and out["glue_metrics"] == ["pearson", "spearman"]
    assert out["spearman"] == pytest.approx(1.0) and out["main_metric"] == "pearson"
    assert "glue_preset" not in evaluation_metrics("single_label_classification", preds, gold, ["a", "b"])


def test_an_evaluation_keeps_its_confusion_matrix_up_to_100_labels_and_per_class_figures_always():
    """k x k cells stored three times: a 10,000-label version's evaluation held gigabytes in the shared database
    (and an 800 MB array in the worker). Past CONFUSION_MAX_LABELS the matrix is left out, said so; the per-class
    precision, recall and support stay, counted without it."""
    from worker.batch import CONFUSION_MAX_LABELS, evaluation_metrics

    preds, gold = [0, 2, 1, 1, 0, 2, 2], [0, 1, 1, 2, 0, 2, 2]
    small = evaluation_metrics("single_label_classification", preds, gold, ["a", "b", "c"])
    assert small["confusion_matrix"] == [[2, 0, 0], [0, 1, 1], [0, 1, 2]]
    assert small["per_class"]["c"] == {"precision": 2 / 3, "recall": 2 / 3, "support": 3}
    many = [f"l{i}" for i in range(CONFUSION_MAX_LABELS + 1)]
    big = evaluation_metrics("single_label_classification", preds, gold, many)
    assert "confusion_matrix" not in big and str(CONFUSION_MAX_LABELS) in big["confusion_matrix_omitted"]
    assert [big["per_class"][k] for k in ("l0", "l1", "l2")] == list(small["per_class"].values())
    assert big["per_class"]["l50"] == {"precision": 0.0, "recall": 0.0, "support": 0}
    assert big["accuracy"] == small["accuracy"] and len(big["per_class"]) == CONFUSION_MAX_LABELS + 1
