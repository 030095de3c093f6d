"""Jobs that are never wrong, shown with real processes (Celery workers, Postgres, Redis), faults made for real:

- a worker paused (SIGSTOP) past its heartbeat is taken over by a second worker; woken up (SIGCONT) while the
  new holder trains, every write it tries is refused by its fencing token and it stops, so the job ends as
  the new holder makes it: succeeded, one adapter version, its event log in order;
- the database cut away from a worker (a TCP proxy between the worker and Postgres drops every connection)
  in the middle of training: a short cut is retried through and the job succeeds in its first attempt; a
  cut longer than `job_db_retry_s` ends the attempt, and the job resumes from its checkpoint and succeeds;
- a job message taken by a consumer that dies before claiming (never acknowledged: Redis would hold it for
  the 7-day visibility timeout) is re-sent after `job_claim_timeout_s` and the job succeeds;
- a sweep whose trial's worker is killed between the trial's result and the settling: the redelivered trial
  message finds the trial final and settles the sweep, once;
- a job whose loss is not finite fails naming the step and registers nothing; a job past its wall-clock limit
  fails with type `time-limit`; an internal error is shown as words plus an error id, its details only in the log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text, update

from app.main import create_app
from app.models import AdapterVersion, Job, JobEvent, Task
from tests.api.helpers import upload
from tests.live import WORKER_SETTINGS, WorkerProcess

from .conftest import ROOT, TcpProxy, job_body, job_row, service_env, via_proxy, wait_until
from .test_worker_faults import FINAL, _datasets, _job, _submit, _wait_final

pytestmark = pytest.mark.slow


def _events(db: Any, job_id: str) -> list[Any]:
    with db.session() as s:
        return list(s.scalars(select(JobEvent).where(JobEvent.job_id == uuid.UUID(job_id)).order_by(JobEvent.seq)))


def _versions(db: Any, tenant_id: Any, task: str) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(AdapterVersion).join(Task, Task.id == AdapterVersion.task_id)
                        .where(Task.tenant_id == tenant_id, Task.name == task))


def _pid(claimed_by: str) -> int:
    return int(claimed_by.rpartition(":")[2])


def _step(db: Any, job_id: str) -> int:
    return (job_row(db, job_id).progress or {}).get("step", 0)


@pytest.fixture
def app_client(make_settings, tiny_base, worker, db) -> Iterator[TestClient]:
    """The API in-process (its requeue loop running every 2 s, re-sending jobs unclaimed after 3 s), sending to
    the session worker's queue. Jobs other tests left queued on purpose (their messages held back) are cancelled
    first, or this requeuer would hand them all to the session's worker."""
    with db.transaction() as s:
        s.execute(update(Job).where(Job.status == "queued").values(status="cancelled", cancel_requested=True))
    app = create_app(make_settings(allowed_base_models=[tiny_base], default_base_model=tiny_base,
                                   **{**WORKER_SETTINGS, "job_claim_timeout_s": 3.0}))
    with TestClient(app) as client:
        yield client


# ------------------------------------------------------------------------------------------------ fencing


def test_a_paused_worker_woken_after_a_takeover_cannot_change_the_job(app_client, worker, worker_env, tenant_key,
                                                                       db, tmp_path, measure):
    second = WorkerProcess(worker_env, tmp_path / "second-worker.log").start()
    logs = {w.log_path for w in (worker, second)}
    paused: int | None = None
    try:
        key = tenant_key("train")
        train, val = _datasets(app_client, key.headers, n=400)
        job_id = _submit(app_client, key.headers, job_body(train, val, task="takeover", epochs=2, batch_size=4))
        wait_until(lambda: _step(db, job_id) >= 8 and job_row(db, job_id).checkpoint_sha256, 120,
                   "the first attempt to train past a checkpoint")
        first = job_row(db, job_id)
        paused = _pid(first.claimed_by)
        os.kill(paused, signal.SIGSTOP)  # slow but alive: a GC pause, a swapped-out process
        paused_at = time.monotonic()
        step_at_pause = _step(db, job_id)

        # The other worker takes over once the heartbeat is stale, resumes from the checkpoint and trains on.
        wait_until(lambda: (j := job_row(db, job_id)).attempts == 2 and j.claimed_by != first.claimed_by
                   and (j.progress or {}).get("step", 0) > step_at_pause + 3, 90, "the takeover")
        takeover_s = time.monotonic() - paused_at
        os.kill(paused, signal.SIGCONT)  # the old holder wakes up and carries on where it was
        paused = None
        summary = f"job {job_id} attempt 1: "
        line = wait_until(lambda: next((ln for p in logs for ln in p.read_text(errors="replace").splitlines()
                                        if summary in ln and "fenced write(s) refused" in ln), None),
                          60, "the old holder to notice the takeover")
        refused = int(line.split(summary)[1].split()[0])

        done = _wait_final(app_client, job_id, key.headers, 180, second.tail)
        # Attempt 2 normally finishes it; on a starved machine (heartbeat stale after 4 s) the woken worker's
        # process may in turn take attempt 3 over from the second: fenced the same way.
        assert done["status"] == "succeeded" and done["attempts"] >= 2, (done, worker.tail(), second.tail())
        assert done["adapter_version"] == 1 and _versions(db, key.tenant_id, "takeover") == 1
        events = _events(db, job_id)
        starts = [e for e in events if e.type == "status" and e.data.get("status") == "running"]
        assert [s.data["attempt"] for s in starts] == list(range(1, done["attempts"] + 1))
        # After each takeover only the new holder wrote: its progress counts on from where it resumed, one step
        # at a time, with nothing of the old holder's (which was past that step when it woke) in between.
        for k, start in enumerate(starts[1:], 1):
            end = starts[k + 1].seq if k + 1 < len(starts) else events[-1].seq + 1
            run = [e for e in events if start.seq < e.seq < end]
            resumed = next(e for e in run if e.type == "resumed")
            steps = [e.data["step"] for e in run if e.type == "progress"]
            assert steps == list(range(resumed.data["step"] + 1, resumed.data["step"] + 1 + len(steps))), steps
        assert [e.data.get("status") for e in events if e.type == "status"][-1] == "succeeded"
        assert refused >= 1
        resumed = next(e for e in events if e.type == "resumed")
        measure(step_at_pause=step_at_pause, resumed_from_step=resumed.data["step"],
                seconds_paused_to_takeover=round(takeover_s, 1), fenced_writes_refused=refused,
                old_holder_writes_after_wake=0, attempts=done["attempts"], final=done["status"], versions=1)
    finally:
        if paused is not None:
            os.kill(paused, signal.SIGCONT)
        second.stop()


# ------------------------------------------------------------------------------------------------ database cut


@pytest.fixture
def proxied(make_settings, pg_url, redis_url, rel_prefix, tiny_base, tenant_key, tmp_path) -> Iterator[dict]:
    """A worker whose only way to Postgres is a TCP proxy (the API's is direct), on a broker prefix of its own."""
    from sqlalchemy import make_url

    url = make_url(pg_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432)).start()
    prefix = f"{rel_prefix}cut-{uuid.uuid4().hex[:6]}:"
    env = service_env(via_proxy(pg_url, proxy), redis_url, prefix, tiny_base, tmp_path / "data",
                      job_db_retry_s=6, database_connect_timeout=2)
    worker = WorkerProcess(env, tmp_path / "proxied-worker.log").start()
    app = create_app(make_settings(broker_key_prefix=prefix, allowed_base_models=[tiny_base],
                                   default_base_model=tiny_base, **WORKER_SETTINGS))
    try:
        with TestClient(app) as client:
            yield {"client": client, "proxy": proxy, "worker": worker, "key": tenant_key("train")}
    finally:
        worker.stop()
        proxy.cut()


def _cut_while_training(db, client, headers, job_id, proxy, seconds: float) -> int:
    wait_until(lambda: _step(db, job_id) >= 8 and job_row(db, job_id).checkpoint_sha256, 120,
               "the job to train past a checkpoint")
    step = _step(db, job_id)
    proxy.cut()
    time.sleep(seconds)
    proxy.restore()
    return step


@pytest.mark.serial  # a 3 s cut within a 4 s heartbeat: run alone, not next to the parallel suite
def test_a_database_cut_in_the_middle_of_training_is_survived(proxied, db, measure):
    client, proxy, worker, key = proxied["client"], proxied["proxy"], proxied["worker"], proxied["key"]
    train, val = _datasets(client, key.headers, n=400)

    # A cut shorter than job_db_retry_s (6 s): the writes wait, retry, and training goes on in the same attempt.
    short = _submit(client, key.headers, job_body(train, val, task="short-cut", epochs=2, batch_size=4))
    start = time.monotonic()
    step = _cut_while_training(db, client, key.headers, short, proxy, 3.0)
    done = _wait_final(client, short, key.headers, 180, worker.tail)
    assert done["status"] == "succeeded" and done["attempts"] == 1, (done, worker.tail())
    assert done["adapter_version"] == 1 and _versions(db, key.tenant_id, "short-cut") == 1
    log = worker.log_path.read_text(errors="replace")
    summary = f"job {short} attempt 1: 0 fenced write(s) refused, "
    assert summary in log, worker.tail()
    retried = int(log.split(summary)[1].split()[0])  # writes that failed on the cut and went through on a retry
    assert retried >= 1
    measure(short_cut_s=3.0, short_step_at_cut=step, short_writes_retried=retried, short_attempts=done["attempts"],
            short_seconds_to_succeeded=round(time.monotonic() - start, 1))

    # A cut longer than job_db_retry_s: the attempt ends (the job untouched), the job is sent again and resumes.
    long = _submit(client, key.headers, job_body(train, val, task="long-cut", epochs=2, batch_size=4))
    start = time.monotonic()
    step = _cut_while_training(db, client, key.headers, long, proxy, 12.0)
    done = _wait_final(client, long, key.headers, 240, worker.tail)
    assert done["status"] == "succeeded" and done["attempts"] == 2, (done, worker.tail())
    assert done["adapter_version"] == 1 and _versions(db, key.tenant_id, "long-cut") == 1
    resumed = [e for e in _events(db, long) if e.type == "resumed"]
    assert len(resumed) == 1 and resumed[0].data["step"] >= 5  # from its checkpoint, not from zero
    assert "it will be re-sent and resume from its last checkpoint" in worker.log_path.read_text(errors="replace")
    measure(long_cut_s=12.0, long_step_at_cut=step, long_attempts=done["attempts"],
            long_resumed_from_step=resumed[0].data["step"], long_seconds_to_succeeded=round(time.monotonic() - start, 1))


# ------------------------------------------------------------------------------------------------ lost message

_DOOMED_CONSUMER = r"""
import json, os, signal, sys
from kombu import Connection
url, prefix = sys.argv[1], sys.argv[2]
with Connection(url, transport_options={"global_keyprefix": prefix}) as conn:
    print("ready", flush=True)  # started: it listens once told to (a line on stdin: "listen" and job ids to pass over)
    skip = set(sys.stdin.readline().split()[1:])
    queue = conn.SimpleQueue("training")
    print("listening", flush=True)
    while True:
        message = queue.get(block=True, timeout=60)
        job = json.loads(message.body)[0][0]
        if job not in skip:
            break
        message.requeue()  # another test's job, re-sent by the requeuer: back to the queue's far end
        print("passed over", job, flush=True)
    print("took", message.body, flush=True)  # taken, never acknowledged
    os.kill(os.getpid(), signal.SIGKILL)  # dies before it could claim the job
"""


def test_a_message_taken_by_a_consumer_that_dies_before_claiming_is_resent(app_client, worker, tenant_key, db,
                                                                           redis_url, redis_prefix, measure):
    key = tenant_key("train")
    train, val = _datasets(app_client, key.headers, n=400)
    small_train, small_val = _datasets(app_client, key.headers, n=24, seed=7)
    # The session's worker is busy (one job at a time), so the next message goes to the doomed consumer. The
    # consumer starts first (a second or so of imports on a loaded machine): started after the blocker, it let the
    # blocker's 300 steps race its start, and a blocker ended meanwhile left the worker free to take the message.
    doomed = subprocess.Popen([sys.executable, "-c", _DOOMED_CONSUMER, redis_url, redis_prefix], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert doomed.stdout.readline().strip() == "ready"
    blocker = _submit(app_client, key.headers, job_body(train, val, task="blocker", epochs=3, batch_size=4))
    wait_until(lambda: _step(db, blocker) >= 2, 120, "the blocker to train")
    # And the blocker is paused (SIGSTOP) until the message is taken, so it is still running for certain: a few
    # hundred milliseconds, well under the 4 s heartbeat staleness.
    holder = job_row(db, blocker).claimed_by
    os.kill(_pid(holder), signal.SIGSTOP)
    try:
        paused = job_row(db, blocker)
        assert paused.status == "running" and paused.claimed_by == holder, (paused.status, paused.progress)
        # Jobs that earlier tests of this session left queued are re-sent by the requeuer at any time: the consumer
        # passes over their messages (in a loaded run the consumer took such an orphan instead of this job's).
        with db.session() as s:
            earlier = [str(i) for i in s.scalars(select(Job.id))]
        doomed.stdin.write(" ".join(["listen", *earlier]) + "\n")
        doomed.stdin.flush()
        assert doomed.stdout.readline().strip() == "listening"
        job_id = _submit(app_client, key.headers, job_body(small_train, small_val, task="lost-message"))
        sent = time.monotonic()
        while (took := doomed.stdout.readline()).startswith("passed over"):
            pass
    finally:
        os.kill(_pid(holder), signal.SIGCONT)
    assert doomed.wait(30) == -signal.SIGKILL and job_id in took, took
    row = job_row(db, job_id)
    assert row.status == "queued" and row.enqueued_at is not None and row.attempts == 0
    assert app_client.post(f"/v1/jobs/{blocker}/cancel", headers=key.headers).status_code == 200

    done = _wait_final(app_client, job_id, key.headers, 120, worker.tail)
    assert done["status"] == "succeeded" and done["attempts"] == 1 and done["adapter_version"] == 1, done
    claimed = next(e for e in _events(db, job_id) if e.type == "status" and e.data.get("status") == "running")
    measure(claim_timeout_s=3.0, seconds_sent_to_claimed=round((claimed.created_at - row.enqueued_at).total_seconds(), 1),
            seconds_to_succeeded=round(time.monotonic() - sent, 1), attempts=done["attempts"])


# ------------------------------------------------------------------------------------------------ sweeps


def test_a_sweep_whose_trial_message_is_redelivered_settles_once(make_settings, tiny_base, worker, tenant_key, db,
                                                                  measure):
    """The trial's worker is SIGKILLed after the trial's result committed, while it waits to settle the sweep
    (the test holds the sweep's row lock); Celery redelivers the trial's message, which settles the sweep."""
    from app.services import jobs, sweeps

    app = create_app(make_settings(allowed_base_models=[tiny_base], default_base_model=tiny_base,
                                   **{**WORKER_SETTINGS, "job_requeue_interval_s": 3600.0}))  # no help from the requeuer
    key = tenant_key("train")
    with TestClient(app) as client:
        broker = app.state.send_job
        held: list[uuid.UUID] = []
        app.state.send_job = held.append
        train, val = _datasets(client, key.headers, n=32)
        body = {**job_body(train, val, task="swept-redelivered"),
                "method": {"name": "spafit", "rank": 2, "sweep": {"n1": [1], "n2": [2]}}}
        sweep_id = _submit(client, key.headers, body)
        assert len(held) == 1
        trial_id = str(held[0])
        with db.engine.connect() as lock:
            lock.execute(select(Job.id).where(Job.id == uuid.UUID(sweep_id)).with_for_update())
            broker(held[0])
            wait_until(lambda: job_row(db, trial_id).status == "succeeded", 120, "the trial to succeed")
            trial = job_row(db, trial_id)
            wait_until(lambda: lock.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )).scalar(), 30, "the trial's worker to wait for the sweep's lock")
            os.kill(_pid(trial.claimed_by), signal.SIGKILL)
            lock.rollback()
        assert job_row(db, sweep_id).status == "running"  # the trial is final, its sweep not settled

        done = _wait_final(client, sweep_id, key.headers, 120, worker.tail)
        assert done["status"] == "succeeded" and done["adapter_version"] == 1, (done, worker.tail())
        assert job_row(db, trial_id).attempts == 1  # the redelivery did not run the trial again
        trial_events = [e for e in _events(db, sweep_id) if e.type == "trial"]
        assert [e.data["trial_job"] for e in trial_events] == [trial_id]
        # Settling again, by anyone, changes nothing.
        n = len(_events(db, sweep_id))
        sweeps.settle(app.state.db, uuid.UUID(sweep_id), uuid.UUID(trial_id))
        assert jobs.settle_sweeps(app.state.db) == []
        assert len(_events(db, sweep_id)) == n and _versions(db, key.tenant_id, "swept-redelivered") == 1
        measure(trial_attempts=1, sweep=done["status"], trial_events=len(trial_events))


def test_the_requeuer_settles_a_sweep_whose_trials_all_ended(make_settings, tiny_base, tenant_key, db):
    """A sweep left running with every trial final (its last worker died before settling, its message gone):
    the API's requeue round settles it."""
    from app.services import jobs

    app = create_app(make_settings(allowed_base_models=[tiny_base], default_base_model=tiny_base,
                                   **{**WORKER_SETTINGS, "job_requeue_interval_s": 3600.0}))
    key = tenant_key("train")
    with TestClient(app) as client:
        app.state.send_job = lambda job_id: None  # messages lost
        train, val = _datasets(client, key.headers, n=16)
        body = {**job_body(train, val, task="swept-lost"),
                "method": {"name": "spafit", "rank": 2, "sweep": {"n1": [1], "n2": [2, 3]}}}
        sweep_id = _submit(client, key.headers, body)
        with db.transaction() as s:  # every trial failed, as a worker would have recorded it
            s.execute(update(Job).where(Job.parent_job_id == uuid.UUID(sweep_id)).values(
                status="failed", error_type="worker-lost", error_message="lost"))
        assert jobs.requeue_orphans(app.state.db, lambda job_id: None, app.state.settings) == []
        out = _job(client, sweep_id, key.headers)
        assert out["status"] == "failed" and out["error"]["message"] == "no trial succeeded", out
        assert len([e for e in _events(db, sweep_id) if e.type == "trial"]) == 2
        assert jobs.settle_sweeps(app.state.db) == []


# ------------------------------------------------------------------------------------------------ finite, bounded


def _regression_csv(label: float) -> bytes:
    rows = "\n".join(f"example text number {i},{label if i % 2 else 1.5}" for i in range(24))
    return f"text,label\n{rows}\n".encode()


def test_a_job_whose_loss_is_not_finite_fails_naming_the_step_and_registers_nothing(app_client, worker, tenant_key,
                                                                                     db, measure):
    key = tenant_key("train")
    r = upload(app_client, _regression_csv(1e38), "huge.csv", headers=key.headers, task_type="regression")
    assert r.status_code == 201, r.text
    body = {**job_body(r.json()["id"], None, task="diverges"), "task_type": "regression"}
    job_id = _submit(app_client, key.headers, body)
    done = _wait_final(app_client, job_id, key.headers, 120, worker.tail)
    assert done["status"] == "failed" and done["error"]["type"] == "non-finite", (done, worker.tail())
    assert "at step 1 of" in done["error"]["message"] and done["adapter_version"] is None
    assert _versions(db, key.tenant_id, "diverges") == 0
    assert app_client.get("/v1/tasks/diverges", headers=key.headers).status_code == 404
    measure(error=done["error"])


def test_a_job_past_its_wall_clock_limit_fails_with_that_reason(app_client, worker, tenant_key, db):
    key = tenant_key("train")
    train, val = _datasets(app_client, key.headers, n=400)
    held: list[uuid.UUID] = []
    broker, app_client.app.state.send_job = app_client.app.state.send_job, held.append
    # 100 epochs (10,000 steps) that only the limit can end: with 10 (1,000 steps) the job raced its own limit, and
    # a machine about four times as fast as a 2-core box (260 steps in the 6 s here) would finish it and succeed.
    # The limit stops it after 6 s either way: the test takes no longer.
    job_id = _submit(app_client, key.headers, {**job_body(train, val, task="slow", epochs=100, batch_size=4),
                                               "time_limit_s": 600})
    with db.transaction() as s:  # below what the API accepts (60 s), to keep the test short
        s.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(time_limit_s=6))
    broker(held[0])
    done = _wait_final(app_client, job_id, key.headers, 120, worker.tail)
    assert done["status"] == "failed" and done["error"]["type"] == "time-limit", (done, worker.tail())
    assert "wall-clock limit of 6 s" in done["error"]["message"] and done["adapter_version"] is None
    assert (done["progress"] or {}).get("step", 0) < done["progress"]["total_steps"] == 10_000
    assert _versions(db, key.tenant_id, "slow") == 0

    # A job whose limit passed while it was away (its worker lost) fails at its next claim, without running.
    queued = _submit(app_client, key.headers, job_body(train, val, task="expired"))
    from datetime import timedelta

    from app.models import utcnow

    with db.transaction() as s:
        s.execute(update(Job).where(Job.id == uuid.UUID(queued)).values(
            started_at=utcnow() - timedelta(hours=25), attempts=1))
    app_client.app.state.send_job = broker
    broker(uuid.UUID(queued))
    out = _wait_final(app_client, queued, key.headers, 60, worker.tail)
    assert out["status"] == "failed" and out["error"]["type"] == "time-limit" and out["attempts"] == 1, out


def test_an_internal_error_is_shown_in_words_with_an_error_id_and_logged_in_full(app_client, worker, tenant_key, db,
                                                                                 tmp_path):
    key = tenant_key("train")
    train, val = _datasets(app_client, key.headers, n=16)
    broken = tmp_path / "secret-models" / "broken"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{ this is not json")
    held: list[uuid.UUID] = []
    broker, app_client.app.state.send_job = app_client.app.state.send_job, held.append
    job_id = _submit(app_client, key.headers, job_body(train, val, task="internal"))
    with db.transaction() as s:  # as if the deployment's model folder broke after the job was accepted
        s.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(base_model=str(broken)))
    broker(held[0])
    done = _wait_final(app_client, job_id, key.headers, 120, worker.tail)
    error = done["error"]
    assert done["status"] == "failed" and error["type"] == "internal-error", (done, worker.tail())
    assert error["error_id"] and error["error_id"] in error["message"]
    assert "secret-models" not in str(error) and "Traceback" not in str(error)
    events = [e for e in _events(db, job_id) if e.type == "status"]
    assert "secret-models" not in str(events[-1].data) and events[-1].data["error"]["error_id"] == error["error_id"]
    log = Path(worker.log_path).read_text(errors="replace")
    assert f"error id {error['error_id']}" in log and "Traceback" in log


def test_a_final_job_is_left_as_it_is_by_every_late_message(app_client, worker, tenant_key, db):
    """Duplicates of a succeeded job's message change nothing (no attempt, no event)."""
    key = tenant_key("train")
    train, val = _datasets(app_client, key.headers, n=16)
    job_id = _submit(app_client, key.headers, job_body(train, val, task="dupes"))
    done = _wait_final(app_client, job_id, key.headers, 120, worker.tail)
    assert done["status"] == "succeeded"
    before = (job_row(db, job_id).updated_at, len(_events(db, job_id)))
    for _ in range(3):
        app_client.app.state.send_job(uuid.UUID(job_id))
    time.sleep(3)
    assert (job_row(db, job_id).updated_at, len(_events(db, job_id))) == before
    assert job_row(db, job_id).status in FINAL


def test_a_worker_session_left_idle_in_a_transaction_loses_its_locks(make_settings, pg_url, app_client, tenant_key,
                                                                      db):
    """A worker paused inside a transaction would keep its row lock on the job and block the takeover: worker
    sessions are ended by Postgres once idle in a transaction for a heartbeat's staleness."""
    from sqlalchemy.exc import DBAPIError

    from app.db import Database
    from worker.runner import _transient, guard

    key = tenant_key("train")
    train, val = _datasets(app_client, key.headers, n=16)
    app_client.app.state.send_job = lambda job_id: None
    job_id = uuid.UUID(_submit(app_client, key.headers, job_body(train, val, task="locked")))
    paused = guard(Database.from_url(pg_url), make_settings(job_heartbeat_stale_s=1.0))
    try:
        with pytest.raises(DBAPIError) as ended, paused.transaction() as s:
            s.execute(select(Job.id).where(Job.id == job_id).with_for_update())  # the "paused" worker's lock
            start = time.monotonic()
            with db.transaction() as other:  # the worker taking over gets the row once the session is ended
                other.execute(update(Job).where(Job.id == job_id).values(claimed_by="successor:1"))
            waited = time.monotonic() - start
            s.execute(select(Job.id))  # the paused one, awake: its session is gone
        assert 0.5 < waited < 10, waited
        assert _transient(ended.value)  # the woken worker retries it (then its fence refuses the write)
        assert job_row(db, job_id).claimed_by == "successor:1"
    finally:
        paused.dispose()


def _claimed_here(app_client, key, db, task: str) -> tuple[uuid.UUID, Any, Any]:
    """A job of `task` (its message held back) claimed by this test as a worker would: (id, lease, heartbeat)."""
    from worker.lease import _Heartbeat, claim

    train, val = _datasets(app_client, key.headers, n=24)
    held: list[uuid.UUID] = []
    broker, app_client.app.state.send_job = app_client.app.state.send_job, held.append
    try:
        job_id = uuid.UUID(_submit(app_client, key.headers, job_body(train, val, task=task)))
    finally:
        app_client.app.state.send_job = broker
    c = claim(db, job_id, "test-runner", app_client.app.state.settings)
    assert c.outcome == "claimed" and c.lease is not None
    return job_id, c.lease, _Heartbeat(c.lease, 60.0, None)


def test_a_heartbeat_that_meets_the_final_status_its_own_run_wrote_is_not_a_takeover(app_client, tenant_key, db):
    """Found in CI by the database-cut test: a beat held up by the database ran its fenced write just after the
    run's own final write, was refused, and the run reported a takeover that never happened ("1 fenced write(s)
    refused", the lease marked lost). Once `end()` begins, the heartbeat stands down."""
    import threading

    from app.models import utcnow

    job_id, lease, hb = _claimed_here(app_client, tenant_key("train"), db, "beat-after-end")
    hb.beat()
    assert lease.refused == 0 and not lease.lost.is_set()  # a plain beat while the run holds the job

    # The race as CI met it: a beat waits on the job's row while the run's final write commits.
    with db.transaction() as s:
        s.execute(select(Job.id).where(Job.id == job_id).with_for_update())
        beat = threading.Thread(target=hb.beat)
        beat.start()
        time.sleep(0.5)
        assert beat.is_alive()  # its UPDATE waits for this transaction's row lock
        lease.ending.set()  # what Lease.end() does before its fenced write
        s.execute(update(Job).where(Job.id == job_id).values(status="failed", finished_at=utcnow()))
    beat.join(10)
    assert not beat.is_alive()
    assert lease.refused == 0 and not lease.lost.is_set(), "a beat after the run's own end counted as a takeover"
    hb.beat()  # and any later beat: no write at all
    assert lease.refused == 0 and job_row(db, job_id).status == "failed"


def test_a_success_write_that_stores_a_result_also_stands_the_heartbeat_down(app_client, tenant_key, db):
    """The rule above held for `end()` only: a run that succeeds stores its adapter (or evaluation, or trial) and
    its status in one fenced write of its own, and a beat held up meanwhile reported a takeover (found by a
    stress hunt: `refused=1`, the lease marked lost, on a job that succeeded). Any write setting a final status
    stands the heartbeat down."""
    import threading

    from app.models import utcnow

    job_id, lease, hb = _claimed_here(app_client, tenant_key("train"), db, "beat-after-success")
    written, beat = threading.Event(), threading.Thread(target=hb.beat)

    def store_result(s) -> None:  # the shape of register / an evaluation's finish: status and result together
        s.execute(select(Job.id).where(Job.id == job_id).with_for_update())  # the row, as its first statement
        beat.start()  # past its own check (the run still running), its UPDATE waits for this row lock
        time.sleep(0.5)
        assert beat.is_alive()
        lease.hold(s, status="succeeded", finished_at=utcnow())
        written.set()

    lease.write(store_result, "store the result")
    beat.join(10)
    assert written.is_set() and not beat.is_alive()
    assert lease.refused == 0 and not lease.lost.is_set(), "the run's own success counted as a takeover"
    assert job_row(db, job_id).status == "succeeded"
