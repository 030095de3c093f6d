"""Bugs found by an adversarial pass over the last commits (5816c3b..a43f4a3): the SDK/CLI fixes, the job-path
fixes and the batcher rule. Each test fails on the code it was written against, for the reason its docstring
names, and passes once that is fixed."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Callable

import pytest
from spafit_client import AsyncClient, Client, ConflictError, NotFoundError, RetryPolicy

from tests.cli.conftest import Result
from tests.client.stub import Reply, StubServer, job_json, sse

JOB_ID = "00000000-0000-0000-0000-000000000001"
JOB = f"/v1/jobs/{JOB_ID}"
FAST = RetryPolicy(max_retries=3, backoff=0.01, max_backoff=0.02)
STREAM = {"Content-Type": "text/event-stream"}


@pytest.fixture
def stub():
    with StubServer() as s:
        yield s


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    from click.testing import CliRunner

    from app.cli import main

    for name in ("SPAFIT_URL", "SPAFIT_API_KEY"):
        monkeypatch.delenv(name, raising=False)

    def run(*args: str, url: str | None = None) -> Result:
        env = {"SPAFIT_URL": url} if url else {}
        return Result(CliRunner().invoke(main, list(args), env=env))

    return run


def _cut(body: bytes) -> Reply:
    """An event stream whose connection drops mid-body: it announces more bytes than it sends, then closes (httpx:
    RemoteProtocolError 'peer closed connection without sending complete message body')."""
    return Reply(200, body, {**STREAM, "Content-Length": str(len(body) + 4096)})


# ------------------------------------------------------------------------------------------ SDK: event streams


def test_an_event_stream_cut_mid_body_is_resumed_not_raised(stub):
    """`stream_events` resumes a dropped connection where it stopped (Last-Event-ID): its loop catches
    httpx.TransportError around `with self._c._stream(...)`. Commit 2d8f167 made `_stream` turn a TransportError
    raised in its body into APIConnectionError (for downloads cut mid-body), which is no httpx.TransportError: the
    resume is never reached, and the first cut of a live stream raises APIConnectionError out of stream_events (and
    out of `jobs.wait`, so `spafit jobs wait` exits 5 on one network blip)."""
    stub.add("GET", f"{JOB}/events",
             _cut(sse((1, "status", {"status": "queued"}), (2, "status", {"status": "running"}))),
             Reply(200, sse((3, "status", {"status": "succeeded"}), end=True), STREAM))
    with Client(stub.url, retry=FAST) as client:
        events = list(client.jobs.stream_events(JOB_ID))
    assert [e.seq for e in events] == [1, 2, 3]
    assert stub.seen("GET", f"{JOB}/events")[1].headers["last-event-id"] == "2"


def test_wait_follows_a_job_across_one_cut_of_its_event_stream(stub):
    """The same regression seen from `jobs.wait`: a running job whose stream drops once mid-body is no longer
    followed to its end; `wait` raises APIConnectionError instead of returning the succeeded job."""
    stub.add("GET", JOB, Reply(200, job_json(status="running")), Reply(200, job_json(status="succeeded")))
    stub.add("GET", f"{JOB}/events", _cut(sse((1, "status", {"status": "running"}))),
             Reply(200, sse((2, "status", {"status": "succeeded"}), end=True), STREAM))
    with Client(stub.url, retry=FAST) as client:
        job = client.jobs.wait(JOB_ID, progress=False)
    assert job.status == "succeeded"


def test_wait_with_a_timeout_on_a_quiet_stream_raises_wait_timeout(stub):
    """`jobs.wait(timeout=...)` reads the stream with a read timeout of the time left, and when it fires on a quiet
    job the TransportError was caught and the deadline raised `WaitTimeout` (documented: 'WaitTimeout after `timeout`
    seconds (the job itself goes on)'). With `_stream` converting it, `wait` now raises APITimeoutError ('no answer in
    time'), another class, for a service that answered and a job that is merely quiet."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from spafit_client import WaitTimeout

    class Quiet(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:
            if self.path.split("?")[0].endswith("/events"):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                self.wfile.write(b": ping\n\n")
                self.wfile.flush()
                time.sleep(2.0)  # a running job with nothing to say (the service pings every 15 s)
                return
            body = json.dumps(job_json(status="running")).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Client(f"http://127.0.0.1:{server.server_address[1]}", retry=FAST) as client, \
                pytest.raises(WaitTimeout):
            client.jobs.wait(JOB_ID, progress=False, timeout=0.8)
    finally:
        server.shutdown()
        server.server_close()

def test_async_an_event_stream_cut_mid_body_is_resumed_not_raised(stub):
    """The async twin (`AsyncClient._stream` got the same conversion, `_event_stream` the same TransportError
    catch): the cut raises APIConnectionError instead of resuming from Last-Event-ID."""
    stub.add("GET", f"{JOB}/events", _cut(sse((1, "status", {"status": "queued"}))),
             Reply(200, sse((2, "status", {"status": "succeeded"}), end=True), STREAM))

    async def run() -> list[int]:
        async with AsyncClient(stub.url, retry=FAST) as client:
            return [e.seq async for e in client.jobs.stream_events(JOB_ID)]

    assert asyncio.run(run()) == [1, 2]


# ------------------------------------------------------------------------------------------ SDK: done_if


def _not_found() -> Reply:
    return Reply(404, {"type": "https://spafit.dev/problems/not-found", "title": "Not found", "status": 404,
                       "detail": f"job {JOB_ID} not found"})


def test_a_delete_refused_with_429_then_answered_404_raises_not_found(stub):
    """`done_if` (commit 2d8f167) takes a 404 on any retry of a DELETE as 'an earlier attempt went through'. But a
    429 (or a 503 with Retry-After, or a refused connection) says the earlier attempt did *not* go through: the 404
    of the retry is the true answer. Deleting a job id that does not exist (a typo, another tenant's) while the
    service is rate limiting returns None, as if it had deleted something."""
    stub.add("DELETE", JOB, Reply(429, {"type": "https://spafit.dev/problems/rate-limited", "title": "Rate limited",
                                        "status": 429, "detail": "slow down"}, {"Retry-After": "0"}),
             _not_found())
    with Client(stub.url, retry=FAST) as client, pytest.raises(NotFoundError):
        client.jobs.delete(JOB_ID)


def test_a_cancel_refused_with_503_then_answered_409_raises_conflict(stub):
    """The same for cancel: a finished job answers 409 to a cancel (client README: 'a finished job answers 409').
    When the first attempt was refused (503 overloaded, Retry-After: nothing was done), the retry's 409 is the real
    answer, yet `jobs.cancel` returns the finished job (here: succeeded) as if the cancel had been accepted."""
    stub.add("POST", f"{JOB}/cancel",
             Reply(503, {"type": "https://spafit.dev/problems/overloaded", "title": "Overloaded", "status": 503,
                         "detail": "busy"}, {"Retry-After": "0"}),
             Reply(409, {"type": "https://spafit.dev/problems/conflict", "title": "Conflict", "status": 409,
                         "detail": f"job {JOB_ID} already succeeded; only queued or running jobs can be cancelled"}))
    stub.add("GET", JOB, Reply(200, job_json(status="succeeded")))
    with Client(stub.url, retry=FAST) as client, pytest.raises(ConflictError):
        client.jobs.cancel(JOB_ID)


# ------------------------------------------------------------------------------------------ SDK: downloads


def test_download_without_a_path_writes_only_into_the_current_folder(stub, tmp_path, monkeypatch):
    """`tasks.download(task)` (and `spafit tasks export` without -o) names the file after the answer's
    Content-Disposition: `save_archive` (_endpoints.py) uses `Path(filename)` as is when no path is given (only the
    folder branch takes `.name`). An answer from something that is not the service (the case APIResponseError was
    added for: a proxy, a URL pointing elsewhere) with filename="../x.zip" or an absolute path writes outside the
    current folder, e.g. over a file of the user's."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    stub.add("GET", "/v1/tasks/sentiment/adapter",
             Reply(200, b"PK\x05\x06" + b"\0" * 18, {"Content-Type": "application/zip",
                                                     "Content-Disposition": 'attachment; filename="../escaped.zip"'}))
    with Client(stub.url, retry=FAST) as client:
        path = client.tasks.download("sentiment")
    assert not (tmp_path / "escaped.zip").exists(), "written outside the current folder"
    assert path.resolve().parent == work.resolve(), path


def test_batch_results_that_are_not_the_services_answer_are_a_spafit_error(stub):
    """Commit 2d8f167: 'an answer that is not the service's JSON is APIResponseError' (client README: 'Every one is a
    SpafitError'). Only `parse` (_base.py) got that; `batch.results` feeds the body to `ResultRows`, whose
    json.loads raises json.JSONDecodeError (a ValueError) on a proxy's or captive portal's HTML page: no
    SpafitError, so `except SpafitError` around the SDK misses it."""
    from spafit_client import SpafitError

    path = f"/v1/batch-predictions/{JOB_ID}/results"
    stub.add("GET", path, Reply(200, "<html><body>Sign in to the Wi-Fi</body></html>\n", {"Content-Type": "text/html"}))
    with Client(stub.url, retry=FAST) as client, pytest.raises(SpafitError):
        list(client.batch.results(JOB_ID))


# ------------------------------------------------------------------------------------------ CLI: admin configuration


def test_cli_keys_with_a_malformed_database_url_is_an_error_message(cli, monkeypatch):
    """Commit 2d8f167: 'SPAFIT_* misconfigured for keys/db' is a message with its exit code. A SPAFIT_DATABASE_URL
    that is no URL (a typo, an unexpanded `${DB_URL}`) makes create_engine raise sqlalchemy.exc.ArgumentError, which
    `exit_code_for` (app/cli/common.py) maps to nothing: a traceback."""
    r = _cli_with_settings(cli, monkeypatch, {"SPAFIT_MODE": "server", "SPAFIT_DATABASE_URL": "${DATABASE_URL}",
                                              "SPAFIT_BROKER_URL": "redis://127.0.0.1:1/0"}, "keys", "list", "--tenant", "x")
    assert r.exit_code != 0 and "error" in r.stderr.lower(), r



def test_cli_keys_on_a_database_not_yet_migrated_is_an_error_message(cli, monkeypatch, empty_pg_url):
    """`spafit keys create` run before `spafit db upgrade` (server mode does not migrate by itself: auto_migrate is
    off) is the first thing an operator of a fresh deployment can get wrong. The driver's ProgrammingError
    ('relation "tenants" does not exist') is neither an OperationalError nor a Settings error, so SpafitGroup
    (app/cli/common.py `exit_code_for`) lets it out: a traceback with exit 1, where commit 2d8f167 made the other
    database / configuration failures of keys and db messages with exit codes."""
    r = _cli_with_settings(cli, monkeypatch, {"SPAFIT_MODE": "server", "SPAFIT_DATABASE_URL": empty_pg_url,
                                              "SPAFIT_BROKER_URL": "redis://127.0.0.1:1/0"},  # needed, not used
                           "keys", "list", "--tenant", "x")
    assert r.exit_code != 0 and "error" in r.stderr.lower(), r


def test_cli_db_upgrade_to_an_unknown_revision_is_an_error_message(cli, monkeypatch, tmp_path):
    """`spafit db upgrade --revision <typo>`: alembic raises alembic.util.CommandError ("Can't locate revision
    identified by 'bogus'"), which `exit_code_for` does not map: a traceback with exit 1 for a usage error of an
    admin command (the class of commit 2d8f167's 'CLI tracebacks for user errors ... keys/db')."""
    r = _cli_with_settings(cli, monkeypatch, {"SPAFIT_DATA_DIR": str(tmp_path / "data")},  # embedded, SQLite
                           "db", "upgrade", "--revision", "bogus")
    assert r.exit_code != 0 and "bogus" in r.stderr, r


def _cli_with_settings(cli, monkeypatch, env: dict[str, str], *args: str):
    """`spafit *args` with only `env` of the SPAFIT_* settings set; asserts no exception escaped the CLI."""
    from app.settings import get_settings

    for name in [n for n in os.environ if n.startswith("SPAFIT_") and not n.startswith("SPAFIT_TEST_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        r = cli(*args)
    finally:
        get_settings.cache_clear()
    assert r.exception is None or isinstance(r.exception, SystemExit), f"{r!r}\n--- escaped: {r.exception!r}"
    return r

def test_cli_a_url_whose_host_has_an_empty_label_is_an_error_message(cli):
    """Commit 2d8f167 checks --url with `httpx.URL(url)` (app/cli/common.py `remote`), but a host with an empty or
    over-long label (`http://api..example.com`, a typo) parses; the request then fails in socket.getaddrinfo's IDNA
    encoding with a builtin UnicodeError, which is no httpx.TransportError: the SDK lets it out as is (no
    SpafitError) and the CLI prints a traceback (exit 1) instead of a usage error or 'unreachable' (5)."""
    from spafit_client import SpafitError

    with Client("http://api..example.com", retry=FAST) as client, pytest.raises(SpafitError):
        client.health()
    r = cli("jobs", "list", url="http://api..example.com")
    assert r.exception is None or isinstance(r.exception, SystemExit), f"{r!r}\n--- escaped: {r.exception!r}"
    assert r.exit_code in (2, 5) and "error" in r.stderr.lower(), r

# ------------------------------------------------------------------------------------------ API: schema booleans


@pytest.mark.parametrize(("hyperparameters", "field"), [
    ({"epochs": True}, "hyperparameters.epochs"),
    ({"batch_size": True}, "hyperparameters.batch_size"),
    ({"early_stopping_patience": True}, "hyperparameters.early_stopping_patience"),
])
def test_a_boolean_epoch_count_or_batch_size_is_422_not_1(client, tenant_key, hyperparameters, field):
    """Commit d9db7b1 made `true` a 422 for method.n1/n2/rank ('true was taken as layer 1 or rank 1'), but every other
    integer knob of `HyperparametersIn` (app/schemas_jobs.py) is still a plain `int`, which pydantic's lax mode turns
    `true` into 1: `{"epochs": true}` is a 202 job that trains one epoch, `{"batch_size": true}` one row per step,
    `{"early_stopping_patience": true}` stops after one bad epoch."""
    from tests.tiny import toy_csv

    from .helpers import assert_problem, upload

    client.app.state.send_job = lambda job_id: None  # nothing here needs a worker
    key = tenant_key("train")
    train = upload(client, toy_csv(24, 5), headers=key.headers).json()["id"]
    r = client.post("/v1/jobs", json={"task": "bools", "train_dataset": train, "hyperparameters": hyperparameters},
                    headers=key.headers)
    assert r.status_code == 422, r.text
    assert assert_problem(r, 422)["field"].startswith(field), r.text


# ------------------------------------------------------------------------------------------ requeuer


def test_a_dead_running_job_whose_claim_beat_its_dispatch_write_is_resent(make_settings, tiny_base, tenant_key,
                                                                        redis_prefix):
    """`dispatch` (app/services/jobs.py) sends the message, *then* writes `enqueued_at`. An idle worker can take the
    message and claim the job (heartbeat_at = claim time) before that write lands, so `enqueued_at > heartbeat_at`.
    If that worker then dies before its next beat (an OOM while loading the model, 5 s of heartbeat interval),
    the new `dead_running` condition of commit d9db7b1 (`enqueued_at < heartbeat_at | unclaimed | epoch changed`)
    never holds while any other message waits in the training queue (`unclaimed` is false with a backlog): the job
    stays 'running' with a dead worker and is not re-sent once, however stale; with the queue empty it waits
    `job_claim_timeout_s` (15 min by default) instead of `job_heartbeat_stale_s` (60 s). Before the commit it was
    re-sent once its heartbeat was stale (this test passes with the old `requeue_orphans`). Its message is certainly
    not waiting in the queue: its worker took it and claimed the job."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.services import jobs
    from tests.tiny import toy_csv
    from worker.lease import claim

    from .helpers import upload

    prefix = f"{redis_prefix}stop23-{uuid.uuid4().hex[:6]}:"  # no worker reads it: what is sent stays queued
    settings = make_settings(broker_key_prefix=prefix, allowed_base_models=[tiny_base], default_base_model=tiny_base,
                             job_heartbeat_stale_s=1.0, job_requeue_interval_s=3600.0)
    app = create_app(settings)
    key = tenant_key("train")
    with TestClient(app) as client:
        broker = app.state.send_job

        class FastWorker:
            """The broker, and a worker that takes the message and claims the job at once (then dies)."""

            def __call__(self, job_id: uuid.UUID) -> None:
                assert claim(app.state.db, job_id, "gone-host:1", settings).outcome == "claimed"

            def epoch(self) -> str | None:
                return broker.epoch()

            def waiting(self) -> int | None:
                return broker.waiting()

        train = upload(client, toy_csv(24, 6), headers=key.headers).json()["id"]
        app.state.send_job = FastWorker()
        raced = uuid.UUID(client.post("/v1/jobs", json={"task": "raced", "train_dataset": train},
                                      headers=key.headers).json()["id"])
        app.state.send_job = broker
        other = client.post("/v1/jobs", json={"task": "other", "train_dataset": train}, headers=key.headers)
        assert other.status_code == 202, other.text  # its message waits in the queue: a backlog
        try:
            assert client.get(f"/v1/jobs/{raced}", headers=key.headers).json()["status"] == "running"
            time.sleep(settings.job_heartbeat_stale_s + 0.5)  # the worker is gone: no beat since its claim
            resent = []
            for _ in range(3):
                resent += jobs.requeue_orphans(app.state.db, broker, settings)
                time.sleep(0.2)
            assert raced in resent, "a running job whose worker died is never re-sent"
        finally:
            import redis

            r = redis.Redis.from_url(settings.broker_url)
            r.delete(f"{prefix}training")
            r.close()



# ------------------------------------------------------------------------------------------ concurrent first imports

def test_the_first_concurrent_adapter_imports_of_a_fresh_api_process_are_not_500(tiny_base):
    """Commit d9db7b1 put transformers' first lazy import behind a lock private to app/services/jobs.py
    (`_IMPORT_LOCK`, for job creates). The adapter import path does the same import unguarded:
    `registry.register_version` -> spafit_core/adapter_schema.py `backbone_limits` -> `from transformers import
    AutoConfig`, outside its try. In a fresh API process the first concurrent PUT /v1/tasks/{task}/adapter fail with
    `ImportError: cannot import name 'AutoConfig' from 'transformers'` (a 500), as job creates did; and since the
    lock is private, a job create racing an adapter import (or the preload thread's own transformers import) is not
    protected either. Seen here: 5 of 8 fresh processes, 1 to 8 of 16 threads each."""
    from tests.api.test_job_path_attacks import first_concurrent_calls_never_fail

    # what concurrent PUT /v1/tasks/{task}/adapter run in registry.register_version
    first_concurrent_calls_never_fail("from spafit_core.adapter_schema import backbone_limits",
                                      "backbone_limits(sys.argv[1])", tiny_base)
