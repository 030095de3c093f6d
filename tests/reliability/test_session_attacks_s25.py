"""Attacks on the warm-shutdown hand-back (worker/shutdown.py, worker/runner.py `_release`) and the settings' URL
checks (app/settings.py), with real processes and a real database and broker.

- A cancel accepted while the worker is shutting down, before the run noticed it (its heartbeat had not beaten
  since): the run handed the job back to `queued` with `cancel_requested` set. No worker ran it again and the
  requeuer passes over queued jobs whose cancel was requested, so the job stayed `queued` for ever (and `jobs wait`
  with it). Now the hand-back sees the cancel in the same fenced write and ends the job `cancelled`.
- The broker URL check refused Celery's documented Sentinel list (`sentinel://:pw@h1:26379;sentinel://...`), and
  a password holding `/` or `#` (not percent-encoded) was echoed in the one-line error ("Port could not be cast to
  integer value as '<password>'").
"""

from __future__ import annotations

import signal
import subprocess

import pytest

from tests.api.helpers import upload
from tests.tiny import toy_csv

from .conftest import job_body, job_row, own_deployment, wait_until


# ------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("url", [
    "sentinel://:pw@127.0.0.1:26379;sentinel://:pw@127.0.0.2:26379",
    "sentinel://localhost:26379;sentinel://localhost:26380;sentinel://localhost:26381",
    "redis://[::1]:6379/0", "amqp://guest:guest@host:5672//", "sqla+sqlite:////tmp/x/broker.db",
    "rediss://:p%40s%2Fs@host:6380/0?ssl_cert_reqs=required",
])
def test_valid_broker_urls_are_accepted(url: str, tmp_path) -> None:
    from app.settings import Settings

    Settings(database_url=f"sqlite:///{tmp_path}/s.db", broker_url=url, redis_url="redis://127.0.0.1:6379/11")


@pytest.mark.parametrize("name, url", [
    ("broker_url", "redis://:Sup3rS3cret/x@127.0.0.1:6379/0"),
    ("broker_url", "redis://:Sup3rS3cret#x@127.0.0.1:6379/0"),
    ("redis_url", "redis://:Sup3rS3cret/x@127.0.0.1:6379/0"),
    ("broker_url", "sentinel://:Sup3rS3cret/x@h1:26379;sentinel://:pw@h2:26379"),
])
def test_a_malformed_url_error_never_echoes_its_password(name: str, url: str, tmp_path) -> None:
    from pydantic import ValidationError

    from app.cli.common import error_message
    from app.settings import Settings

    kw = {"broker_url": "redis://127.0.0.1:6379/11", name: url}
    with pytest.raises(ValidationError) as info:
        Settings(database_url=f"sqlite:///{tmp_path}/s.db", **kw)
    message = error_message(info.value)
    assert f"SPAFIT_{name.upper()}" in message and "\n" not in message, message
    assert "Sup3rS3cret" not in message, message


def test_a_redis_failover_broker_list_gives_the_api_its_first_redis(tmp_path) -> None:
    """The Redis URL derived from a failover broker list was the whole list, which redis-py cannot read (its
    database became "0;redis:..."): the API failed on its first Redis call."""
    from app.settings import Settings

    s = Settings(database_url=f"sqlite:///{tmp_path}/s.db",
                 broker_url="redis://127.0.0.1:6379/0;redis://127.0.0.2:6379/0")
    assert s.redis_url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize("name", ["SPAFIT_BROKER_URL", "SPAFIT_REDIS_URL"])
def test_a_redis_url_whose_database_is_not_a_number_is_refused_at_start(name: str, tmp_path) -> None:
    """`redis://host:6379/abc` passed the settings: `spafit worker` printed Celery's traceback ("Database is int
    between 0 and limit - 1, not abc") and exited 0, the API failed on its first Redis call."""
    import os
    import sys

    from tests.live import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("SPAFIT_")}
    env.update(SPAFIT_MODE="server", SPAFIT_DATABASE_URL="postgresql://127.0.0.1:5432/test",
               SPAFIT_BROKER_URL="redis://127.0.0.1:6379/11", SPAFIT_PRELOAD_BASE_MODEL="false",
               SPAFIT_WORKER_PRELOAD="0", SPAFIT_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(ROOT))
    env[name] = "redis://:Sup3rS3cret@127.0.0.1:6379/abc"
    r = subprocess.run([sys.executable, "-m", "app.cli", "worker"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and name in lines[0], (r.returncode, r.stderr[-3000:])
    assert "Sup3rS3cret" not in r.stderr


# --------------------------------------------------------------------------------- warm shutdown
def test_a_cancel_accepted_as_the_worker_shuts_down_ends_the_job_cancelled_not_queued_for_ever(
        make_settings, pg_databases, redis_url, rel_prefix, tiny_base, tmp_path) -> None:
    """The cancel lands (the API sets `cancel_requested` on the running job) and SIGTERM follows before the run's
    heartbeat has read the flag (a long heartbeat interval makes that certain here): the run stops for the shutdown.
    Before, it handed the job back to `queued` with the cancel pending, where nothing ever picked it up again (the
    requeuer skips queued jobs whose cancel was requested): a cancelled job shown queued for ever."""
    slow_beat = {"job_heartbeat_interval_s": 60.0, "job_heartbeat_stale_s": 120.0}
    with own_deployment(make_settings, pg_databases, redis_url, f"{rel_prefix}s25cancel:", tiny_base, tmp_path,
                        "s25_cancel", **slow_beat) as d:
        client, headers, worker = d.client, d.headers, d.worker
        train = upload(client, toy_csv(800, 0), "train.csv", headers=headers).json()["id"]
        r = client.post("/v1/jobs", json=job_body(train, None, task="s25", epochs=3, batch_size=4), headers=headers)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        wait_until(lambda: (client.get(f"/v1/jobs/{job_id}", headers=headers).json()["progress"] or {})
                   .get("step", 0) >= 2, 90, f"the job to train ({worker.tail(1500)})")
        r = client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
        assert r.status_code == 200 and r.json()["cancel_requested"], r.text
        worker.proc.send_signal(signal.SIGTERM)
        try:
            worker.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill9()
        row = job_row(d.db, job_id)
        assert row.status == "cancelled", (row.status, row.cancel_requested, worker.tail(2000))
        events = client.get(f"/v1/jobs/{job_id}/events", headers=headers).json()
        statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
        assert statuses[-1] == "cancelled" and "queued" not in statuses[1:], statuses


def test_hand_backs_past_their_allowance_count_as_attempts(client, tenant_key, db, make_settings) -> None:
    """Each hand-back raised the job's attempt limit by one, with no end: a job whose workers kept being stopped (a
    pod evicted again and again) looped for ever. Past MAX_HANDBACKS over the setting the limit stays, so each
    further stop counts as an attempt and the job ends `worker-lost`."""
    from app.schemas_jobs import JobCreate
    from app.services import jobs
    from tests.api.helpers import csv_bytes
    from worker import runner
    from worker.lease import claim

    settings = make_settings(job_max_attempts=3)
    key = tenant_key("train")
    train = upload(client, csv_bytes(), headers=key.headers).json()["id"]
    with db.session() as s:  # stored, never sent: only the test's claims below take it, not the session's worker
        job_id = jobs.create(s, key.tenant_id, JobCreate(**job_body(train, None, task="handbacks")), settings)[0].id
    limits = []
    for _ in range(runner.MAX_HANDBACKS + 10):
        c = claim(db, job_id, "test-host:1", settings)
        if c.outcome != "claimed":
            break
        assert runner._release(c.lease, c.job, settings) == "released"
        limits.append(job_row(db, job_id).max_attempts)
    top = 3 + runner.MAX_HANDBACKS
    assert limits == [*range(4, top + 1), top, top, top], limits  # then 3 more stops counted: attempts 21, 22, 23
    assert c.outcome == "gave_up" and job_row(db, job_id).error_type == "worker-lost", c.outcome


def test_a_cancel_that_meets_a_hand_back_cancels_the_job(client, tenant_key, db, make_settings, pg_url) -> None:
    """A cancel of a running job waits on its row while a worker shutting down hands the job back (running ->
    queued). The cancel's update of a running job then matched nothing, and the request was a 409 "already running;
    only queued or running jobs can be cancelled". Now it reads the row again and cancels the queued job."""
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import create_engine, text

    from app.schemas_jobs import JobCreate
    from app.services import jobs
    from tests.api.helpers import csv_bytes

    key = tenant_key("train")
    train = upload(client, csv_bytes(), headers=key.headers).json()["id"]
    with db.session() as s:  # stored, never sent: the session's worker never takes it
        job_id = jobs.create(s, key.tenant_id, JobCreate(**job_body(train, None, task="cancel-meets-handback")),
                             make_settings())[0].id
        s.execute(text("UPDATE jobs SET status = 'running', claimed_by = 'test-host:1', attempts = 1 WHERE id = :id"),
                  {"id": job_id})
        s.commit()
    engine = create_engine(pg_url)
    try:
        # the pool outermost: on a failure the hand-back's transaction ends (and its lock goes) before the pool waits
        with ThreadPoolExecutor(1) as pool, engine.connect() as hand_back, engine.connect() as watch:
            hand_back.execute(text("UPDATE jobs SET status = 'queued', claimed_by = NULL WHERE id = :id"),
                              {"id": job_id})  # the hand-back's write, not committed yet: the row is locked
            cancel = pool.submit(client.post, f"/v1/jobs/{job_id}/cancel", headers=key.headers)

            def waiting() -> bool:  # a fresh transaction each time: pg_stat_activity is read once per transaction
                with watch.begin():
                    return bool(watch.execute(text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query LIKE 'UPDATE jobs%'")).scalar())

            wait_until(lambda: cancel.done() or waiting(), 30, "the cancel to wait on the job's row")
            hand_back.commit()
            r = cancel.result(30)
    finally:
        engine.dispose()
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled" and job_row(db, job_id).status == "cancelled"


_FLAG_SCRIPT = r"""
import os, signal, sys, threading, time
from worker import shutdown

shutdown.arm()
for i in range(30):  # a child reading the flag, SIGKILLed at any moment (the OOM killer, a hard time limit)
    pid = os.fork()
    if pid == 0:
        while True:
            shutdown.requested()
    time.sleep(0.03)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    t = threading.Thread(target=shutdown.requested, daemon=True)
    t.start()
    t.join(2)
    if t.is_alive():
        print(f"wedged after {i + 1} kills", flush=True)
        os._exit(1)
pid = os.fork()  # and the flag the parent sets is seen by a child forked before
if pid == 0:
    deadline = time.monotonic() + 5
    while not shutdown.requested():
        if time.monotonic() > deadline:
            os._exit(3)
        time.sleep(0.01)
    os._exit(0)
time.sleep(0.1)
shutdown.begin()
_, status = os.waitpid(pid, 0)
print("child saw it" if os.waitstatus_to_exitcode(status) == 0 else "child never saw it", flush=True)
os._exit(0 if os.waitstatus_to_exitcode(status) == 0 else 2)
"""


def test_a_job_child_killed_while_reading_the_shutdown_flag_never_wedges_the_worker(tmp_path) -> None:
    """The flag was a multiprocessing.Event, whose every read takes a process-shared lock. A child killed while
    reading it (each training step reads it) left the lock held: the next read by any child, or the parent's `set()`
    in its SIGTERM handler, blocked for ever (a worker whose jobs all hang at their next step and that no SIGTERM
    stops). Here a child spinning on the flag is SIGKILLed until that happens (3 kills were enough before)."""
    import sys

    from tests.live import ROOT

    r = subprocess.run([sys.executable, "-c", _FLAG_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])


def test_spafit_serve_stopped_mid_job_hands_it_back_once_not_in_a_loop(tmp_path) -> None:
    """`spafit serve` (embedded: SQLite, the sqla+sqlite broker, its own worker child) gets SIGTERM mid-job. Its
    worker's parent goes on taking messages during the warm shutdown, so each job its children handed back came
    straight back to it: claimed again (an attempt counted) and handed back again (the limit raised), over and over
    (attempts 3 of 4 seen here) until the worker exited; serve killing it after 30 s mid-claim left the job running
    with every attempt used (3 of 3), and it failed `worker-lost` on the next start. Now it is handed back once."""
    import json
    import os
    import sqlite3
    import sys
    import urllib.request
    import uuid

    from tests.live import ROOT, free_port
    from tests.tiny import make_tiny_model

    base = str(make_tiny_model(tmp_path / "model", "bert", hidden=64))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPAFIT_")}
    env.update(SPAFIT_MODE="embedded", SPAFIT_DATA_DIR=str(tmp_path / "data"), SPAFIT_ALLOWED_BASE_MODELS=base,
               SPAFIT_DEFAULT_BASE_MODEL=base, SPAFIT_PRELOAD_BASE_MODEL="false", SPAFIT_CHECKPOINT_EVERY_STEPS="5",
               SPAFIT_JOB_LOG_EVERY_STEPS="1", SPAFIT_JOB_MAX_ATTEMPTS="1", PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log = tmp_path / "serve.log"

    def call(method: str, path: str, body: bytes | None = None, ctype: str = "application/json") -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=body,
                                     headers={"Content-Type": ctype})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")

    def up() -> bool:
        try:
            return call("GET", "/healthz") is not None
        except OSError:
            return False

    with log.open("wb") as out:
        serve = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env=env,
                                 stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_until(up, 90, "spafit serve to answer", interval=0.3)
        b = uuid.uuid4().hex
        body = (f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="t.csv"\r\n'
                "Content-Type: text/csv\r\n\r\n").encode() + toy_csv(800, 0) + f"\r\n--{b}--\r\n".encode()
        ds = call("POST", "/v1/datasets", body, f"multipart/form-data; boundary={b}")["id"]
        job_id = call("POST", "/v1/jobs", json.dumps(job_body(ds, None, task="emb", epochs=3, batch_size=4))
                      .encode())["id"]
        wait_until(lambda: (call("GET", f"/v1/jobs/{job_id}")["progress"] or {}).get("step", 0) >= 8, 120,
                   f"the job to train ({log.read_bytes()[-1500:]!r})", interval=0.3)
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=45)
        with sqlite3.connect(tmp_path / "data" / "spafit.db") as c:
            row = c.execute("SELECT status, attempts, max_attempts FROM jobs WHERE id = ?",
                            (uuid.UUID(job_id).hex,)).fetchone()
            assert row == ("queued", 1, 2), (row, log.read_bytes()[-3000:])
            c.execute("UPDATE jobs SET status = 'cancelled', cancel_requested = 1 WHERE id = ?",
                      (uuid.UUID(job_id).hex,))  # never run again
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
