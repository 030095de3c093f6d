"""The SDK's own logic, against a scripted local HTTP server (tests/client/stub.py): retries with backoff
and Retry-After, which requests may be retried, the event stream's reconnects, timeouts, the one
error mapping, configuration from the environment, and the distribution's dependencies."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import tomllib
import uuid

import httpx
import pytest
from spafit_client import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ConflictError,
    JobCancelled,
    JobFailed,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    RetryPolicy,
    ServerError,
    SpafitAPIError,
    ValidationError,
    WaitTimeout,
)
from spafit_client.errors import error_from_response

from tests.client.conftest import CLIENT_DIR, subprocess_env
from tests.client.stub import Reply, StubServer, job_json, sse

JOB = "/v1/jobs/00000000-0000-0000-0000-000000000001"
FAST = RetryPolicy(max_retries=3, backoff=0.01, max_backoff=0.02)


def problem(status: int, slug: str, detail: str = "nope", **extra) -> dict:
    return {"type": f"https://spafit.dev/problems/{slug}", "title": slug.capitalize(), "status": status,
            "detail": detail, **extra}


@pytest.fixture
def stub():
    with StubServer() as s:
        yield s


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("status,cls", [
    (400, BadRequestError), (401, AuthenticationError), (403, PermissionDeniedError), (404, NotFoundError),
    (409, ConflictError), (413, PayloadTooLargeError), (415, BadRequestError), (422, ValidationError),
    (429, RateLimitError), (500, ServerError), (502, ServerError), (503, OverloadedError), (504, ServerError),
])
def test_each_status_maps_to_its_exception(status, cls):
    body = problem(status, "some-problem", "what went wrong", field="method.rank",
                   errors=[{"field": "body.method.rank", "message": "must be >= 1"}], reference="abc")
    err = error_from_response(httpx.Response(status, json=body, headers={"Retry-After": "7", "X-Request-ID": "r1"}))
    assert type(err) is cls and isinstance(err, SpafitAPIError)
    assert (err.status, err.slug, err.title, err.detail, err.field) == (
        status, "some-problem", "Some-problem", "what went wrong", "method.rank")
    assert err.errors[0]["message"] == "must be >= 1" and err.body["reference"] == "abc"
    assert err.retry_after == 7 and err.request_id == "r1"
    assert str(err).startswith(f"{status} Some-problem: what went wrong")


def test_an_error_without_a_problem_body_keeps_the_text():
    err = error_from_response(httpx.Response(502, text="<html>bad gateway</html>"))
    assert isinstance(err, ServerError) and err.detail == "<html>bad gateway</html>" and err.type == "about:blank"


def test_transport_errors_are_also_builtin_connection_and_timeout_errors():
    assert issubclass(APIConnectionError, ConnectionError)
    assert issubclass(APITimeoutError, TimeoutError) and issubclass(APITimeoutError, APIConnectionError)
    assert issubclass(WaitTimeout, TimeoutError)


# ------------------------------------------------------------------------------------------ retries
def test_a_get_is_retried_after_503_honouring_retry_after(stub):
    stub.add("GET", JOB, Reply(503, problem(503, "overloaded"), {"Retry-After": "1"}),
             Reply(503, problem(503, "overloaded"), {"Retry-After": "1"}), Reply(200, job_json()))
    with Client(stub.url) as client:
        t0 = time.monotonic()
        job = client.jobs.get("00000000-0000-0000-0000-000000000001")
    assert job.status == "succeeded" and job.done
    seen = stub.seen("GET", JOB)
    assert len(seen) == 3
    gaps = [b.at - a.at for a, b in zip(seen, seen[1:], strict=False)]
    assert all(g >= 0.95 for g in gaps), gaps  # waited the Retry-After each time
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_retryable_statuses_use_exponential_backoff(stub, status):
    stub.add("GET", JOB, Reply(status, problem(status, "x")), Reply(status, problem(status, "x")), Reply(200, job_json()))
    with Client(stub.url, retry=FAST) as client:
        assert client.jobs.get(JOB.rsplit("/", 1)[1]).status == "succeeded"
    assert len(stub.seen("GET", JOB)) == 3


def test_retries_give_up_after_max_retries_with_the_typed_error(stub):
    stub.add("GET", JOB, Reply(503, problem(503, "overloaded", "queue full"), {"Retry-After": "0"}))
    with Client(stub.url, max_retries=2) as client, pytest.raises(OverloadedError) as info:
        client.jobs.get(JOB.rsplit("/", 1)[1])
    assert len(stub.seen("GET", JOB)) == 3 and info.value.detail == "queue full"


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    policy = RetryPolicy(backoff=1.0, max_backoff=8.0)
    for attempt, full in enumerate([1, 2, 4, 8, 8]):
        delays = [policy.delay(attempt) for _ in range(50)]
        assert all(full / 2 <= d <= full for d in delays) and len(set(delays)) > 1
    assert policy.delay(0, retry_after=3) == 3 and policy.delay(0, retry_after=600) == policy.max_retry_after


def test_job_create_is_retried_with_one_automatic_idempotency_key(stub):
    stub.add("POST", "/v1/jobs", Reply(502, "bad gateway"), Reply(503, problem(503, "database-unavailable")),
             Reply(202, job_json(status="queued")))
    with Client(stub.url, retry=FAST) as client:
        client.jobs.create(task="t", train_dataset="00000000-0000-0000-0000-0000000000aa")
        client.jobs.create(task="t", train_dataset="00000000-0000-0000-0000-0000000000aa")
    keys = [r.headers["idempotency-key"] for r in stub.seen("POST", "/v1/jobs")]
    assert len(keys) == 4 and keys[0] == keys[1] == keys[2] != keys[3]  # retries share it; a new call gets a new one
    assert uuid.UUID(keys[0].removeprefix("spafit-client-")).version == 4


def test_an_explicit_idempotency_key_is_sent_as_given(stub):
    stub.add("POST", "/v1/jobs", Reply(202, job_json(status="queued")))
    with Client(stub.url) as client:
        client.jobs.create(task="t", train_dataset="d", idempotency_key="nightly-2026-01-01")
    assert stub.seen("POST", "/v1/jobs")[0].headers["idempotency-key"] == "nightly-2026-01-01"


def test_a_post_without_idempotency_key_is_not_retried(stub):
    stub.add("POST", "/v1/datasets", Reply(503, problem(503, "database-unavailable"), {"Retry-After": "0"}))
    with Client(stub.url, retry=FAST) as client, pytest.raises(OverloadedError):
        client.datasets.upload(b"text,label\na,b\n")
    assert len(stub.seen("POST", "/v1/datasets")) == 1


def test_a_4xx_is_never_retried(stub):
    stub.add("GET", JOB, Reply(404, problem(404, "not-found")))
    with Client(stub.url, retry=FAST) as client, pytest.raises(NotFoundError):
        client.jobs.get(JOB.rsplit("/", 1)[1])
    assert len(stub.seen("GET", JOB)) == 1


def test_connection_errors_are_retried_then_wrapped():
    port = closed_port()
    with Client(f"http://127.0.0.1:{port}", retry=FAST) as client:
        calls = []
        client._sleep = calls.append  # the backoff delays, instead of sleeping
        with pytest.raises(APIConnectionError) as info:
            client.health()
    assert len(calls) == 3 and not isinstance(info.value, APITimeoutError)
    assert f"127.0.0.1:{port}" in str(info.value)


def test_a_slow_answer_is_a_timeout_error(stub):
    stub.add("GET", JOB, Reply(200, job_json(), delay=1.5))
    with Client(stub.url, timeout=0.3, max_retries=0) as client, pytest.raises(APITimeoutError):
        client.jobs.get(JOB.rsplit("/", 1)[1])


# ------------------------------------------------------------------------------------------ events
def test_the_event_stream_reconnects_with_last_event_id(stub):
    stream = {"Content-Type": "text/event-stream"}
    stub.add("GET", f"{JOB}/events",
             Reply(200, sse((1, "status", {"status": "queued"}), (2, "status", {"status": "running"})), stream),
             Reply(200, sse((2, "status", {"status": "running"}), (3, "progress", {"step": 1, "total_steps": 1}),
                            (4, "status", {"status": "succeeded"}), end=True), stream))
    with Client(stub.url, retry=FAST) as client:
        events = list(client.jobs.stream_events(JOB.rsplit("/", 1)[1]))
    assert [e.seq for e in events] == [1, 2, 3, 4]  # the replayed 2 is not yielded twice
    first, second = stub.seen("GET", f"{JOB}/events")
    assert first.headers["accept"] == "text/event-stream" and "last-event-id" not in first.headers
    assert second.headers["last-event-id"] == "2"


def test_an_event_stream_that_keeps_closing_gives_up(stub):
    stub.add("GET", f"{JOB}/events", Reply(200, b": nothing\n\n", {"Content-Type": "text/event-stream"}))
    with Client(stub.url, retry=FAST) as client, pytest.raises(APIConnectionError, match="kept closing"):
        list(client.jobs.stream_events(JOB.rsplit("/", 1)[1]))
    assert len(stub.seen("GET", f"{JOB}/events")) == 4


def test_a_stream_the_server_ends_at_its_maximum_duration_is_resumed_at_once_however_often(stub):
    """`event: reconnect` (the stream's time is up) is not a failure: a job quiet for many stream lifetimes is
    followed to its end, each stream resumed from the last seq seen."""
    stream = {"Content-Type": "text/event-stream"}
    reconnect = b'event: reconnect\ndata: {"last_event_id": 1, "reason": "max-duration"}\n\n'
    stub.add("GET", f"{JOB}/events", Reply(200, sse((1, "status", {"status": "queued"})) + reconnect, stream),
             *[Reply(200, b": ping\n\n" + reconnect, stream)] * 6,
             Reply(200, sse((2, "status", {"status": "cancelled"}), end=True), stream))
    with Client(stub.url, retry=FAST) as client:
        events = list(client.jobs.stream_events(JOB.rsplit("/", 1)[1]))
    assert [e.seq for e in events] == [1, 2]
    seen = stub.seen("GET", f"{JOB}/events")
    assert len(seen) == 8 and all(s.headers["last-event-id"] == "1" for s in seen[1:])


@pytest.mark.parametrize("status,error,exc", [("failed", {"type": "invalid-dataset", "message": "bad rows"}, JobFailed),
                                              ("cancelled", None, JobCancelled)])
def test_wait_raises_when_the_job_does_not_succeed(stub, status, error, exc):
    stub.add("GET", JOB, Reply(200, job_json(status=status, error=error)))
    with Client(stub.url) as client, pytest.raises(exc) as info:
        client.jobs.wait(JOB.rsplit("/", 1)[1], progress=False)
    assert info.value.job.status == status
    if exc is JobFailed:
        assert (info.value.error_type, info.value.message) == ("invalid-dataset", "bad rows")


def test_wait_times_out_while_the_stream_is_quiet(stub):
    stub.add("GET", JOB, Reply(200, job_json(status="running")))
    stub.add("GET", f"{JOB}/events", Reply(200, b": keep-alive\n\n", {"Content-Type": "text/event-stream"}, delay=0.2))
    with Client(stub.url, retry=RetryPolicy(max_retries=100, backoff=0.05, max_backoff=0.1)) as client:
        t0 = time.monotonic()
        with pytest.raises(WaitTimeout):
            client.jobs.wait(JOB.rsplit("/", 1)[1], progress=False, timeout=1.0)
    assert time.monotonic() - t0 < 5


def test_async_client_retries_and_streams_like_the_sync_one(stub):
    stub.add("GET", JOB, Reply(503, problem(503, "overloaded"), {"Retry-After": "0"}), Reply(200, job_json()))
    stub.add("GET", f"{JOB}/events", Reply(200, sse((1, "status", {"status": "queued"})), {"Content-Type": "text/event-stream"}),
             Reply(200, sse((2, "status", {"status": "succeeded"}), end=True), {"Content-Type": "text/event-stream"}))

    async def run():
        async with AsyncClient(stub.url, retry=FAST) as client:
            job = await client.jobs.get(JOB.rsplit("/", 1)[1])
            events = [e async for e in client.jobs.stream_events(job.id)]
            return job, events

    job, events = asyncio.run(run())
    assert job.status == "succeeded" and [e.seq for e in events] == [1, 2]
    assert stub.seen("GET", f"{JOB}/events")[1].headers["last-event-id"] == "1"


# ------------------------------------------------------------------------------------------ configuration
def test_url_and_key_come_from_the_environment(stub, monkeypatch):
    stub.add("GET", "/healthz", Reply(200, {"status": "ok"}))
    monkeypatch.setenv("SPAFIT_URL", stub.url + "/")
    monkeypatch.setenv("SPAFIT_API_KEY", "spafit_abc_secret")
    with Client() as client:
        assert client.base_url == stub.url and client.health().status == "ok"
    headers = stub.seen("GET", "/healthz")[0].headers
    assert headers["authorization"] == "Bearer spafit_abc_secret" and headers["user-agent"].startswith("spafit-client/")
    with Client("http://elsewhere:1", api_key="k2") as client:
        assert client.base_url == "http://elsewhere:1" and client.api_key == "k2"


def test_response_models_keep_fields_they_do_not_know(stub):
    stub.add("GET", JOB, Reply(200, job_json(new_field={"x": 1}, status="paused")))
    with Client(stub.url) as client:
        job = client.jobs.get(JOB.rsplit("/", 1)[1])
    assert job.status == "paused" and job.new_field == {"x": 1} and not job.done


def test_the_sdk_imports_neither_torch_nor_the_server():
    code = ("import sys, spafit_client; print(sorted(m for m in ('torch', 'transformers', 'app', 'spafit_core', "
            "'fastapi', 'sqlalchemy', 'celery') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=subprocess_env(), cwd=CLIENT_DIR)
    assert out.stdout.strip() == "[]"


def test_the_distribution_depends_on_httpx_and_pydantic_only():
    meta = tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "spafit-client"
    assert sorted(d.split(">")[0].split("=")[0].split("<")[0] for d in meta["dependencies"]) == ["httpx", "pydantic"]
    assert (CLIENT_DIR / "spafit_client" / "py.typed").exists()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    from tests.client.conftest import free_port

    return free_port()


# ------------------------------------------------------------------------------------ dataset imports
DS_ID = "00000000-0000-0000-0000-0000000000d5"


def dataset_json(state: str, **kw) -> dict:
    body = {"id": DS_ID, "name": "owner/x:train", "state": state, "error": None, "format": "jsonl", "source": "hf",
            "task_type": "single_label_classification", "rows": None, "columns": [], "sha256": None,
            "size_bytes": None, "text_fields": [], "label_field": None, "label_counts": None, "report": {},
            "created_at": "2026-01-01T00:00:00Z"}
    return {**body, **kw}


def test_import_hf_posts_the_hub_id_and_polls_until_ready(stub):
    import json

    stub.add("POST", "/v1/datasets", Reply(202, dataset_json("importing")))
    stub.add("GET", f"/v1/datasets/{DS_ID}", Reply(200, dataset_json("importing")),
             Reply(200, dataset_json("ready", rows=3, sha256="a" * 64, size_bytes=10, columns=["text", "label"])))
    with Client(stub.url) as client:
        ds = client.datasets.import_hf("owner/x", config_name="c", max_rows=3, text_fields="text")
    assert (ds.state, ds.rows) == ("ready", 3)
    assert json.loads(stub.seen("POST", "/v1/datasets")[0].body) == {
        "hf": {"name": "owner/x", "split": "train", "config_name": "c"}, "max_rows": 3, "text_fields": ["text"]}
    assert len(stub.seen("GET", f"/v1/datasets/{DS_ID}")) == 2


def test_import_hf_raises_the_failure_with_its_type_and_reason(stub):
    from spafit_client import DatasetImportFailed

    failed = dataset_json("failed", error={"type": "import-too-large", "message": "more than 10 rows"})
    stub.add("POST", "/v1/datasets", Reply(202, dataset_json("importing")))
    stub.add("GET", f"/v1/datasets/{DS_ID}", Reply(200, failed))
    with Client(stub.url) as client, pytest.raises(DatasetImportFailed) as info:
        client.datasets.import_hf("owner/x")
    assert (info.value.error_type, info.value.message) == ("import-too-large", "more than 10 rows")
    assert "import-too-large" in str(info.value)


def test_import_hf_without_wait_returns_the_importing_dataset_and_wait_times_out(stub):
    from spafit_client import ImportWaitTimeout

    stub.add("POST", "/v1/datasets", Reply(202, dataset_json("importing")))
    stub.add("GET", f"/v1/datasets/{DS_ID}", Reply(200, dataset_json("importing")))
    with Client(stub.url) as client:
        ds = client.datasets.import_hf("owner/x", wait=False)
        assert ds.state == "importing" and not stub.seen("GET", f"/v1/datasets/{DS_ID}")
        started = time.monotonic()
        with pytest.raises(ImportWaitTimeout) as info:
            client.datasets.wait(ds, timeout=0.5)
    assert time.monotonic() - started < 3 and isinstance(info.value, WaitTimeout) and DS_ID in str(info.value)


def test_a_refused_import_is_a_typed_422_and_is_not_retried(stub):
    stub.add("POST", "/v1/datasets", Reply(422, problem(422, "unsafe-data-source", "a path", field="hf.name")))
    with Client(stub.url, retry=FAST) as client, pytest.raises(ValidationError) as info:
        client.datasets.import_hf("/etc/passwd")
    assert info.value.slug == "unsafe-data-source" and info.value.field == "hf.name"
    assert len(stub.seen("POST", "/v1/datasets")) == 1


def test_async_import_hf_waits_the_same_way(stub):
    from spafit_client import DatasetImportFailed

    stub.add("POST", "/v1/datasets", Reply(202, dataset_json("importing")))
    stub.add("GET", f"/v1/datasets/{DS_ID}", Reply(200, dataset_json("importing")),
             Reply(200, dataset_json("failed", error={"type": "unsafe-data-source", "message": "outside"})))

    async def run():
        async with AsyncClient(stub.url) as client:
            await client.datasets.import_hf("owner/x")

    with pytest.raises(DatasetImportFailed) as info:
        asyncio.run(run())
    assert info.value.error_type == "unsafe-data-source"
