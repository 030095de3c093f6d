"""Worker and broker faults with real processes, killed for real.

- A poison job, run by the session's worker: its worker process is SIGKILLed every time it claims the job. After `job_max_attempts`
  claims the job fails with type `worker-lost` instead of looping, and the worker serves the next job.
- Redis SIGKILLed (it keeps nothing on disk) while one job runs and three wait in its queue, then started
  again on the same port: the queued messages are gone, the API re-sends them to the new incarnation, and
  every job ends succeeded with exactly one adapter version.

(A worker SIGKILLed once mid-training, re-delivered and resumed from its checkpoint, is
tests/worker/test_jobs.py::test_worker_killed_mid_job_resumes_from_its_checkpoint.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.api.helpers import upload
from tests.live import WORKER_SETTINGS, WorkerProcess
from tests.tiny import toy_csv

from .conftest import job_body, job_row, own_deployment, wait_until

pytestmark = pytest.mark.slow

FINAL = ("succeeded", "failed", "cancelled")


def _datasets(client: TestClient, headers: dict, n: int, seed: int = 0) -> tuple[str, str]:
    train = upload(client, toy_csv(n, seed), "train.csv", headers=headers)
    val = upload(client, toy_csv(24, seed + 100), "val.csv", headers=headers)
    assert train.status_code == val.status_code == 201, (train.text, val.text)
    return train.json()["id"], val.json()["id"]


def _submit(client: TestClient, headers: dict, body: dict) -> str:
    r = client.post("/v1/jobs", json=body, headers=headers)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _job(client: TestClient, job_id: str, headers: dict) -> dict:
    return client.get(f"/v1/jobs/{job_id}", headers=headers).json()


def _wait_final(client: TestClient, job_id: str, headers: dict, timeout: float, tail: Any) -> dict:
    return wait_until(lambda: (j := _job(client, job_id, headers))["status"] in FINAL and j, timeout,
                      f"job {job_id} to end ({tail()})", interval=0.3)


def _started_attempts(db: Any, job_id: str) -> int:
    """How many "running" status events the job has: one per claim, written just after it."""
    from sqlalchemy import func, select

    from app.models import JobEvent

    with db.session() as s:
        return s.scalar(select(func.count()).select_from(JobEvent).where(
            JobEvent.job_id == uuid.UUID(job_id), JobEvent.type == "status",
            JobEvent.data["status"].as_string() == "running"))


@pytest.fixture
def rel_client(make_settings, tiny_base, worker) -> Iterator[TestClient]:
    """The API in-process (its requeue loop running), sending to the session worker's queue."""
    app = create_app(make_settings(allowed_base_models=[tiny_base], default_base_model=tiny_base,
                                   **WORKER_SETTINGS))
    with TestClient(app) as client:
        yield client


def test_a_job_that_kills_its_worker_every_time_fails_after_the_attempt_limit(rel_client, worker, tenant_key,
                                                                              db, measure):
    key = tenant_key("train")
    train, val = _datasets(rel_client, key.headers, n=400)
    poison = _submit(rel_client, key.headers, job_body(train, val, task="poison", epochs=20, batch_size=4))

    killed: list[int] = []
    started = time.monotonic()
    deadline = started + 180
    while time.monotonic() < deadline:
        job = job_row(db, poison)
        if job.status in FINAL:
            break
        pid = int(job.claimed_by.rpartition(":")[2]) if job.status == "running" and job.claimed_by else None
        # The "crash": once a process has claimed the job and announced its attempt, it is SIGKILLed.
        if pid is not None and pid not in killed and _started_attempts(db, poison) == job.attempts:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        time.sleep(0.05)
    else:
        raise AssertionError(f"the poison job never ended; killed {killed}\n{worker.tail()}")

    limit = rel_client.app.state.settings.job_max_attempts
    measure(kills=len(killed), seconds_to_failed=round(time.monotonic() - started, 1))
    assert len(killed) == limit == 3
    out = _job(rel_client, poison, key.headers)
    assert out["status"] == "failed" and out["attempts"] == limit and out["adapter_version"] is None, out
    assert out["error"]["type"] == "worker-lost" and f"after {limit} attempts" in out["error"]["message"]
    events = rel_client.get(f"/v1/jobs/{poison}/events", headers=key.headers).json()
    starts = [e["data"]["attempt"] for e in events if e["type"] == "status" and e["data"]["status"] == "running"]
    assert starts == [1, 2, 3]
    assert events[-1]["data"]["status"] == "failed"

    # Not looping: the job stays failed and nobody claims it again.
    time.sleep(3)
    again = job_row(db, poison)
    assert (again.status, again.attempts) == ("failed", limit)

    # The worker is alive and serves the next job.
    ok = _submit(rel_client, key.headers, job_body(*_datasets(rel_client, key.headers, n=32, seed=3), task="after"))
    done = _wait_final(rel_client, ok, key.headers, 120, worker.tail)
    assert done["status"] == "succeeded" and done["attempts"] == 1, (done, worker.tail())
    measure(poison_attempts=again.attempts, poison_error=out["error"]["type"], next_job=done["status"])


def test_a_worker_shut_down_mid_job_hands_it_back_and_the_next_worker_resumes_it(
        make_settings, pg_databases, redis_url, rel_prefix, tiny_base, tmp_path, measure):
    """SIGTERM (a deploy) to a worker training a job whose attempt limit is 1, given what `docker stop` gives it
    (10 s): the run stops at its next step and hands the job back to the queue (its attempt not counted), the worker
    exits at once, and the next worker resumes the job from its checkpoint. Before, the worker trained on until it
    was killed, and the re-delivered job failed `worker-lost`: every restart of the workers cost each running job
    an attempt."""
    with own_deployment(make_settings, pg_databases, redis_url, f"{rel_prefix}shutdown:", tiny_base, tmp_path,
                        "shutdown", job_max_attempts=1) as d:
        client, headers, db, first = d.client, d.headers, d.db, d.worker
        second = None
        try:
            train, val = _datasets(client, headers, n=800)
            job_id = _submit(client, headers, job_body(train, val, task="deployed", epochs=3, batch_size=4))
            wait_until(lambda: (_job(client, job_id, headers)["progress"] or {}).get("step", 0) >= 12, 120,
                       f"the job to train ({first.tail(1500)})")
            sent = time.monotonic()
            first.proc.send_signal(signal.SIGTERM)
            try:
                exit_code = first.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                exit_code = None
                first.kill9()  # what docker stop does then
            exited_s = round(time.monotonic() - sent, 1)
            row = job_row(db, job_id)
            assert exit_code == 0 and row.status == "queued", (exit_code, row.status, first.tail(2000))
            assert row.claimed_by is None and row.attempts == 1 and row.max_attempts == 2, (row.attempts,
                                                                                           row.max_attempts)
            back = _job(client, job_id, headers)
            assert back["status"] == "queued" and back["attempts"] == 1, back

            second = WorkerProcess(d.env, tmp_path / "second.log").start()
            wait_until(lambda: (_job(client, job_id, headers)["progress"] or {}).get("step", 0) > row.progress["step"],
                       120, f"the next worker to resume the job ({second.tail(1500)})")
            events = client.get(f"/v1/jobs/{job_id}/events", headers=headers).json()
            statuses = [e["data"] for e in events if e["type"] == "status"]
            assert [(e.get("status"), e.get("attempt")) for e in statuses] == [
                ("queued", None), ("running", 1), ("queued", 1), ("running", 2)], statuses
            assert "worker shut down" in statuses[2]["reason"] and statuses[3]["resume"] is True
            resumed = [e["data"]["step"] for e in events if e["type"] == "resumed"]
            assert len(resumed) == 1 and resumed[0] >= 5, resumed  # from its checkpoint, not from zero
            assert client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).status_code == 200
            assert _wait_final(client, job_id, headers, 60, second.tail)["status"] == "cancelled"
            measure(worker_exited_s=exited_s, step_at_shutdown=row.progress["step"], resumed_from_step=resumed[0])
        finally:
            if second is not None:
                second.stop()


def test_redis_restart_loses_no_job(make_settings, pg_databases, private_redis, rel_prefix, tiny_base,
                                    tmp_path, measure):
    """A private Redis (never the shared one) and a database of this test's own: one job running, three
    queued; Redis is SIGKILLed and restarted empty on the same port."""
    with own_deployment(make_settings, pg_databases, private_redis.url, rel_prefix, tiny_base, tmp_path,
                        "redis_restart") as d:
        _run_redis_restart(d.client, d.headers, d.db, private_redis, d.worker, measure)


def _run_redis_restart(client: TestClient, headers: dict, db: Any, redis: Any, worker: WorkerProcess,
                       measure: Any) -> None:
    long_train, val = _datasets(client, headers, n=200)
    short_train, _ = _datasets(client, headers, n=24, seed=5)
    running = _submit(client, headers, job_body(long_train, val, task="running", epochs=2, batch_size=4))
    wait_until(lambda: (_job(client, running, headers)["progress"] or {}).get("step", 0) >= 5, 120,
               f"the first job to train ({worker.tail(1500)})")
    # "One job running, three queued" must still hold when Redis dies: the first job's 100 steps could end while
    # the three are submitted and checked (a fast machine), and the worker would then take one of them before the
    # kill. So the child running it is paused (SIGSTOP) from here until Redis is gone: well under the 4 s heartbeat
    # staleness (tests/live.py WORKER_SETTINGS), and it trains on, mid-job, once woken.
    holder = job_row(db, running).claimed_by
    pid = int(holder.rpartition(":")[2])
    os.kill(pid, signal.SIGSTOP)
    try:
        paused = job_row(db, running)
        assert paused.status == "running" and paused.claimed_by == holder, (paused.status, paused.progress)
        queued = [_submit(client, headers, job_body(short_train, None, task=f"queued-{i}")) for i in range(3)]
        assert all(_job(client, j, headers)["status"] == "queued" for j in queued)
        old_epoch = redis.run_id()
        assert {job_row(db, j).broker_epoch for j in queued} == {old_epoch}
        assert _job(client, running, headers)["status"] == "running"

        step_at_kill = (_job(client, running, headers)["progress"] or {}).get("step")
        redis.kill9()  # every queued message (and the running job's unacked one) is lost with it
    finally:
        os.kill(pid, signal.SIGCONT)
    time.sleep(1.0)
    redis.start()
    restarted = time.monotonic()
    new_epoch = redis.run_id()
    assert new_epoch != old_epoch

    jobs = [running, *queued]
    done = {j: _wait_final(client, j, headers, 240, lambda: worker.tail(1500)) for j in jobs}
    measure(running_step_at_kill=step_at_kill, seconds_to_all_final=round(time.monotonic() - restarted, 1),
            statuses=[done[j]["status"] for j in jobs], attempts=[done[j]["attempts"] for j in jobs])
    for out in done.values():
        assert out["status"] == "succeeded", (out, worker.tail())
        assert out["adapter_version"] == 1 and 1 <= out["attempts"] <= 3
    # The queued jobs were re-sent to the new incarnation by the API's requeue loop, not lost.
    assert {job_row(db, j).broker_epoch for j in queued} == {new_epoch}
    # Exactly one version per task: no job registered twice.
    for task in ["running", "queued-0", "queued-1", "queued-2"]:
        versions = client.get(f"/v1/tasks/{task}/versions", headers=headers).json()["items"]
        assert [v["version"] for v in versions] == [1], versions
    assert {uuid.UUID(j) for j in jobs} == {job_row(db, j).id for j in jobs}
