"""Bugs found by an adversarial pass over the training-job path (jobs, their datasets, evaluations, listing):
each test fails on the code as found and passes once the bug is fixed."""

from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest

from .helpers import assert_problem, upload


def _cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


# ------------------------------------------------------------------------------------------ listing


def test_a_cursor_whose_id_is_not_a_string_is_422_not_500(client, tenant_key):
    """`decode_cursor` catches ValueError/TypeError, but `uuid.UUID(5)` raises AttributeError ('int' object has no
    attribute 'replace'): a well-formed base64 JSON pair with a number (or a list, an object) as the id was a 500."""
    key = tenant_key("train")
    for bad_id in (5, [1], {"a": 1}, None, True):
        r = client.get("/v1/jobs", params={"cursor": _cursor(["2020-01-01T00:00:00+00:00", bad_id])},
                       headers=key.headers)
        assert assert_problem(r, 422, "invalid-input")["field"] == "cursor", bad_id


# ------------------------------------------------------------------------------------------ evaluation


def _wait(http: httpx.Client, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            return job
        time.sleep(0.3)


def _spaced_header_csv(n: int = 24, seed: int = 300) -> bytes:
    """The toy task as a CSV whose header has a space after the comma (`text, label`), as many tools write it.
    The upload strips header names (its columns are `text` and `label`)."""
    from tests.tiny import toy_csv

    return toy_csv(n, seed).decode().replace("text,label", "text, label", 1).encode()


@pytest.fixture
def own_sentiment(live_server, tenant_key, db, tiny_base):
    """(the live server's URL, a key of a tenant of its own whose task `sentiment` has a random adapter as version 1).
    Not the session's trained tenant: that one is shared, and these jobs of its task would show in other files'
    job lists."""
    from .adapters import SPAFIT, random_adapter, register

    key = tenant_key("train", "predict")
    cfg, weights = random_adapter(tiny_base, SPAFIT, labels=("negative", "positive"), seed=3)
    register(db, key.tenant_id, "sentiment", cfg, weights)
    return live_server.url, key


def test_evaluation_reads_a_csv_whose_header_has_spaces_like_its_upload_did(own_sentiment):
    """The upload strips each header name (spafit_core/data_read.py `_header`), so the dataset's columns are `text`
    and `label`; the evaluation worker reads the rows with the raw header (worker/batch.py `stream_rows`), keyed
    ` label`, finds no label in any row and fails the job: 'row 0: label None is not one of the version's labels'."""
    url, key = own_sentiment
    with httpx.Client(base_url=url, headers=key.headers, timeout=60) as http:
        r = upload(http, _spaced_header_csv(), "spaced.csv")
        assert r.status_code == 201, r.text
        assert r.json()["columns"] == ["text", "label"]
        started = http.post("/v1/tasks/sentiment/versions/1/evaluate", json={"dataset": r.json()["id"]})
        assert started.status_code == 202, started.text
        job = _wait(http, started.json()["id"])
        assert job["status"] == "succeeded", job["error"]
        assert job["metrics"]["per_class"]["negative"]["support"] + job["metrics"]["per_class"]["positive"][
            "support"] == 24


def test_batch_prediction_reads_the_text_column_of_a_csv_whose_header_has_spaces(own_sentiment):
    """Same root cause as above, silently: a batch prediction over `id, text, label` looks up `text` in rows keyed
    ` text`, finds nothing and predicts the empty string for every row (every score identical), where the same rows
    under `id,text,label` get their own predictions."""
    from tests.tiny import toy_examples

    texts = toy_examples(8, 5).texts
    rows = "".join(f"{i},{t},negative\n" for i, t in enumerate(texts))
    results = {}
    url, key = own_sentiment
    with httpx.Client(base_url=url, headers=key.headers, timeout=60) as http:
        for name, header in (("plain", "id,text,label"), ("spaced", "id, text, label")):
            ds = upload(http, f"{header}\n{rows}".encode(), f"{name}.csv")
            assert ds.status_code == 201, ds.text
            started = http.post("/v1/batch-predictions", json={"task": "sentiment", "dataset": ds.json()["id"],
                                                               "format": "jsonl", "all_scores": True})
            assert started.status_code == 202, started.text
            job = _wait(http, started.json()["id"])
            assert job["status"] == "succeeded", job["error"]
            out = http.get(f"/v1/batch-predictions/{job['id']}/results")
            assert out.status_code == 200, out.text
            results[name] = [{s["label"]: s["score"] for s in json.loads(line)["scores"]}
                             for line in out.text.splitlines()]
    assert len(results["spaced"]) == len(results["plain"]) == len(texts)
    for spaced, plain in zip(results["spaced"], results["plain"], strict=True):
        assert spaced == pytest.approx(plain, abs=1e-5)


# ------------------------------------------------------------------------------------------ cancellation


def test_a_cancel_accepted_after_the_last_step_leaves_no_adapter(live_server, worker, make_key, db):
    """README: a running job that is cancelled 'stops at its next step, no adapter left behind'. The trainer polls
    the cancel flag only between training steps (spafit_core/train.py), and the worker registers the adapter
    without looking at it (worker/runner.py `register`): a cancel answered 200 `cancel_requested: true` while the
    last epoch's evaluation runs still ends `succeeded`, with a new version registered and made active."""
    from tests.tiny import toy_csv

    key = make_key("train")
    with httpx.Client(base_url=live_server.url, headers=key.headers, timeout=60) as http:
        train = upload(http, toy_csv(48, 11), "small.csv")
        validation = upload(http, toy_csv(12000, 12), "big-validation.csv")  # the last evaluation takes seconds
        assert train.status_code == 201 and validation.status_code == 201, (train.text, validation.text)
        created = http.post("/v1/jobs", json={
            "task": "late-cancel", "train_dataset": train.json()["id"],
            "validation_dataset": validation.json()["id"], "method": {"name": "spafit", "n1": 1, "n2": 2, "rank": 4},
            "hyperparameters": {"epochs": 1, "batch_size": 8}})
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        deadline = time.monotonic() + 180
        while True:  # until the last optimizer step is recorded: the final evaluation runs now
            job = http.get(f"/v1/jobs/{job_id}").json()
            progress = job["progress"] or {}
            if progress.get("step") and progress["step"] == progress.get("total_steps"):
                break
            assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
            time.sleep(0.02)
        # The process running the job is paused (SIGSTOP) so that the cancel lands before the final evaluation
        # ends, however fast the machine; should the pause catch it inside a write, the cancel waits on that row
        # lock: the worker is woken after 1.5 s (well within the heartbeat's staleness) and the cancel goes ahead.
        import os
        import signal
        from concurrent.futures import ThreadPoolExecutor
        from concurrent.futures import TimeoutError as FutureTimeout

        from tests.reliability.conftest import job_row

        pid = int(job_row(db, job_id).claimed_by.rpartition(":")[2])
        os.kill(pid, signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(1) as pool:
                sent = pool.submit(http.post, f"/v1/jobs/{job_id}/cancel")
                try:
                    sent.result(timeout=1.5)
                except FutureTimeout:
                    os.kill(pid, signal.SIGCONT)
                cancel = sent.result(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):  # woken early, its child may have ended the job already
                os.kill(pid, signal.SIGCONT)
        assert cancel.status_code == 200, cancel.text  # accepted: the job was still running
        assert cancel.json()["cancel_requested"] is True
        job = _wait(http, job_id)
        assert job["status"] == "cancelled", (job["status"], job["adapter_version"])
        assert job["adapter_version"] is None
        assert_problem(http.get("/v1/tasks/late-cancel"), 404)  # no version was registered


# ------------------------------------------------------------------------------------------ job config


def _dataset(client, key) -> str:
    from .helpers import unique_csv

    r = upload(client, unique_csv(), headers=key.headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.mark.parametrize(("method", "field"), [
    ({"n1": True, "n2": 2}, "method.n1"),
    ({"n1": 0, "n2": True}, "method.n2"),
    ({"rank": True}, "method.rank"),
])
def test_a_boolean_layer_index_or_rank_is_422_not_layer_1(client, tenant_key, method, field):
    """`true` is not a layer index: the sweep refuses it ('a layer index (int) or a fraction of the depth (float),
    not a boolean', schemas_jobs.py `_not_bool`; its ranks are StrictInt) and so does spafit_core's MethodConfig
    ('n1 must be an integer layer index or a fraction of L, not a boolean'). `MethodIn` has plain `int | float` /
    `int` fields, which pydantic's lax mode turns `true` into 1 before the core sees it: the job was 202 and trained
    with n1 = 1 (or rank 1)."""
    client.app.state.send_job = lambda job_id: None  # nothing here needs a worker
    key = tenant_key("train")
    r = client.post("/v1/jobs", json={"task": "bools", "train_dataset": _dataset(client, key), "method": method},
                    headers=key.headers)
    assert assert_problem(r, 422)["field"].startswith(field), r.text


# ------------------------------------------------------------------------------------------ requeuer


def test_a_stale_running_job_is_not_resent_while_its_resent_message_still_waits(make_settings, tiny_base,
                                                                                tenant_key, db, redis_prefix):
    """With every worker down, `requeue_orphans` re-sends each running job whose heartbeat is stale on every pass
    once `job_heartbeat_stale_s` has passed since the last send: one more message per job per staleness period,
    none of them taken. (A queued job is re-sent only while no message waits, so as not to 'pile up duplicates'.)
    Seen live: a worker SIGKILLed mid-job for ~80 s left 22 messages for that one job in the training queue; the
    restarted worker spent ~5 s on each (a fresh child per message), so a job submitted meanwhile waited ~2 min.
    A broker prefix no worker reads: whatever is sent stays in the queue."""
    from fastapi.testclient import TestClient
    from sqlalchemy import update

    from app.main import create_app
    from app.models import Job, utcnow
    from app.services import jobs
    from tests.tiny import toy_csv

    prefix = f"{redis_prefix}hunt-{uuid.uuid4().hex[:6]}:"
    settings = make_settings(broker_key_prefix=prefix, allowed_base_models=[tiny_base], default_base_model=tiny_base,
                             job_heartbeat_stale_s=1.0, job_requeue_interval_s=3600.0)
    app = create_app(settings)
    key = tenant_key("train")
    with TestClient(app) as client:
        broker = app.state.send_job
        train = upload(client, toy_csv(24, 3), headers=key.headers).json()["id"]
        job_id = uuid.UUID(client.post("/v1/jobs", json={"task": "stale", "train_dataset": train},
                                       headers=key.headers).json()["id"])
        redis = __import__("redis").Redis.from_url(settings.broker_url)
        redis.delete(f"{prefix}training")  # a worker took the message, claimed the job, and was SIGKILLed
        long_ago = utcnow() - timedelta(minutes=5)
        with db.transaction() as s:
            s.execute(update(Job).where(Job.id == job_id).values(
                status="running", attempts=1, claimed_by="gone-host:1", claimed_at=long_ago, started_at=long_ago,
                heartbeat_at=long_ago, enqueued_at=long_ago - timedelta(minutes=1)))  # sent, then claimed

        def waiting_for_this_job() -> int:  # (other tests' stale jobs in the session database may be re-sent too)
            bodies = [json.loads(m)["body"] for m in redis.lrange(f"{prefix}training", 0, -1)]
            return sum(str(job_id) in base64.b64decode(b).decode() for b in bodies)

        assert job_id in jobs.requeue_orphans(app.state.db, broker, settings)  # re-sent once: right
        assert waiting_for_this_job() == 1
        for _ in range(3):  # no worker anywhere: the message just sent still waits
            time.sleep(settings.job_heartbeat_stale_s + 0.2)
            jobs.requeue_orphans(app.state.db, broker, settings)
        waiting = waiting_for_this_job()
        redis.delete(f"{prefix}training")
        redis.close()
        assert waiting == 1, f"{waiting} messages wait for one job"


# ------------------------------------------------------------------------------------------ resume


def test_a_run_resumed_after_it_stopped_early_trains_no_further(tiny_base, tmp_path):
    """A job that stopped early saves its last checkpoint (epoch < epochs, patience used up) and then serialises
    and registers its adapter; a worker killed in that window has the job re-delivered, and the resumed run goes
    back into the epoch loop (`while state['epoch'] < cfg.epochs`: the stop is not in the checkpoint's state): it
    trains more epochs, with more steps, a longer history, `stopped_early` false, and an adapter that can differ
    from the uninterrupted run's."""
    from spafit_core import MethodConfig, TaskSpec, TrainConfig
    from spafit_core.model import SpafitModel
    from spafit_core.train import encode, set_seed, train
    from tests.tiny import toy_examples

    def model(seed: int = 0) -> SpafitModel:
        set_seed(seed)
        return SpafitModel.from_pretrained(tiny_base, MethodConfig(n1=1, n2=2, rank=4), TaskSpec(labels=("0", "1")))

    def data(m: SpafitModel, n: int, seed: int):
        return encode(toy_examples(n, seed), m.tokenizer, 32, m.task.task_type)

    cfg = TrainConfig(epochs=6, batch_size=8, learning_rate=1e-9, early_stopping_patience=1, log_every_steps=1,
                      seed=3)
    ckpt = tmp_path / "checkpoint.safetensors"
    first = model()
    done = train(first, data(first, 32, 0), cfg, validation=data(first, 16, 1), checkpoint_path=ckpt)
    assert done.stopped_early and len(done.history) == 2  # the learning rate is ~0: the metric stalls at once
    again = model(seed=99)  # the re-delivered job, in a fresh process, from the checkpoint the first run left
    resumed = train(again, data(again, 32, 0), cfg, validation=data(again, 16, 1), checkpoint_path=ckpt)
    assert resumed.steps == done.steps, "the resumed run trained past the early stop"
    assert resumed.stopped_early and len(resumed.history) == len(done.history)


# ------------------------------------------------------------------------------------------ concurrent creates

_FIRST_CONCURRENT_CALLS = """
import sys, threading
import app.main  # what an API process has imported when it starts serving
{setup}

errors, start = [], threading.Barrier(16)

def call():
    start.wait()
    try:
        {call}
    except Exception as e:
        errors.append(repr(e))

threads = [threading.Thread(target=call) for _ in range(16)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(errors[0] if errors else "ok")
"""


def first_concurrent_calls_never_fail(setup: str, call: str, arg: str) -> None:
    """In up to 4 fresh processes (stopping at the first failure), 16 threads make `call` at once, as the first
    concurrent requests of a fresh API process would (`sys.argv[1]` is `arg`); none may raise. Four: the races
    these tests guard failed 5 and 6 of 8 fresh processes without their fix (all four pass by chance about once
    in 50 to 250 runs), and each process imports the app (8 cost the suite over 100 s a test on a loaded
    machine)."""
    import subprocess
    import sys

    from tests.live import ROOT, subprocess_env

    script = _FIRST_CONCURRENT_CALLS.format(setup=setup, call=call)
    for attempt in range(4):
        out = subprocess.run([sys.executable, "-c", script, arg], cwd=ROOT, env=subprocess_env(HF_HUB_OFFLINE="1"),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == "ok", f"fresh process {attempt + 1}: {out.stdout[-500:]}"


def test_the_first_concurrent_job_creates_of_a_fresh_api_process_are_not_500(tiny_base):
    """`_read_max_positions` imports `transformers.AutoConfig` on first use, in the request's threadpool thread.
    transformers' lazy module is not safe to import from several threads at once: in a fresh API process (a new
    replica, a restart) the first concurrent POST /v1/jobs fail with `ImportError: cannot import name
    'AutoConfig' from 'transformers'`, a 500 (seen live: 2 of the first 6 concurrent creates). Each try is a fresh
    process (up to 4); without a fix most of them hit it (6 of 8 in a manual run)."""
    # what concurrent POST /v1/jobs run first in their threadpool threads (jobs._check_limits)
    first_concurrent_calls_never_fail("from app.services import jobs", "jobs.max_positions(sys.argv[1])", tiny_base)


def test_concurrent_retries_with_one_idempotency_key_get_the_job_not_429(worker_env, tmp_path, make_key):
    """'Idempotency-Key makes retries safe': a retry sent while the first request is still being served (the client
    timed out) passes the replay check (nothing committed yet), then waits for the tenant's row lock and counts the
    first request's job against the tenant's limit: 429 too-many-jobs for the very job it is retrying (seen live
    with SPAFIT_MAX_ACTIVE_JOBS_PER_TENANT=1: 4 rounds of 5 answered some of 6 identical requests with 429)."""
    import concurrent.futures

    from tests.live import ApiProcess, subprocess_env
    from tests.tiny import toy_csv

    server = ApiProcess(subprocess_env(worker_env, SPAFIT_MAX_ACTIVE_JOBS_PER_TENANT="1",
                                       SPAFIT_JOB_REQUEUE_INTERVAL_S="3600",
                                       SPAFIT_BROKER_KEY_PREFIX=f"hunt-{uuid.uuid4().hex[:8]}:"),  # no worker reads it
                        tmp_path / "server.log").start()
    try:
        key = make_key("train")
        with httpx.Client(base_url=server.url, headers=key.headers, timeout=60) as http:
            train = upload(http, toy_csv(24, 4), "train.csv").json()["id"]
            http.get("/v1/jobs")  # (a first request, so the process is warm)
            answers = []
            for round_ in range(4):
                idem = f"retry-{round_}-{uuid.uuid4().hex}"
                body = {"task": "retried", "train_dataset": train, "hyperparameters": {"epochs": 1},
                        "method": {"n1": 1, "n2": 2}}
                if round_ == 0:  # warm the job path itself (see the test above for its first concurrent creates)
                    warm = http.post("/v1/jobs", json=body)
                    http.post(f"/v1/jobs/{warm.json()['id']}/cancel")

                def create(_: int, idem=idem, body=body) -> tuple[int, str]:
                    r = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": idem})
                    return r.status_code, r.json().get("id") or r.json().get("type")

                with concurrent.futures.ThreadPoolExecutor(6) as pool:
                    got = list(pool.map(create, range(6)))
                answers.append(got)
                for status, job_id in set(got):
                    if status == 202:
                        http.post(f"/v1/jobs/{job_id}/cancel")  # the tenant's one slot, free for the next round
            for got in answers:
                assert {status for status, _ in got} == {202}, answers
                assert len({job_id for _, job_id in got}) == 1, answers
    finally:
        server.stop()
