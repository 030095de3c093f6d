"""The SDK against the live service (a real uvicorn process, Postgres, Redis and a real Celery worker on a
tiny backbone): datasets, jobs with idempotency, progress and live events, tasks and their adapters,
predictions, pagination, typed errors, and the async client."""

from __future__ import annotations

import asyncio
import io
import uuid
import zipfile

import httpx
import pytest
from spafit_client import (
    AdapterVersion,
    AsyncClient,
    AuthenticationError,
    Client,
    ConflictError,
    Dataset,
    Job,
    JobEvent,
    Method,
    NotFoundError,
    PermissionDeniedError,
    TaskPredictions,
    ValidationError,
)

from tests.client.conftest import JOB_HYPERPARAMETERS, JOB_METHOD
from tests.tiny import toy_csv

pytestmark = pytest.mark.slow

TEXTS = ["good fun movie", "bad boring film", "love it"]


def test_train_upload_create_and_wait_with_a_progress_bar(trained):
    job = trained.job
    assert isinstance(job, Job) and job.status == "succeeded" and job.done
    assert job.adapter_version == 1 and job.error is None and {"accuracy", "f1"} <= set(job.metrics)
    assert job.progress.step == job.progress.total_steps == 16
    assert isinstance(trained.train, Dataset) and trained.train.rows == 64 and trained.train.label_field == "label"
    out = trained.progress_output
    assert "100% [" in out and "16/16" in out, out
    assert "epoch 1: " in out and "epoch 2: " in out and "accuracy" in out, out


def test_stream_events_yields_typed_events_in_order_until_the_end(trained):
    with trained.client() as client:
        events = list(client.jobs.stream_events(trained.job.id))
        later = list(client.jobs.stream_events(trained.job, after=3))
        snapshot = client.jobs.events(trained.job.id)
    assert all(isinstance(e, JobEvent) for e in events)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].type == "status" and events[0].data["status"] == "queued"
    assert events[-1].type == "status" and events[-1].data["status"] == "succeeded"
    assert {"progress", "eval", "checkpoint"} <= {e.type for e in events}
    assert [e.seq for e in later] == [e.seq for e in events[3:]]
    assert [e.seq for e in snapshot] == [e.seq for e in events]


def test_the_same_explicit_idempotency_key_returns_the_same_job(trained):
    key = f"sdk-{uuid.uuid4()}"
    body = dict(task="idem", train_dataset=trained.train, validation_dataset=trained.validation,
                method=Method(name="spafit", n1=1, n2=2, rank=4), hyperparameters={"epochs": 1, "batch_size": 8})
    with trained.client() as client:
        first = client.jobs.create(**body, idempotency_key=key)
        again = client.jobs.create(**body, idempotency_key=key)
        other = client.jobs.create(**body)  # a fresh automatic key: a new job
        with pytest.raises(ConflictError) as info:
            client.jobs.create(**{**body, "task": "idem-other"}, idempotency_key=key)
        for job in (first, other):
            client.jobs.cancel(job)
    assert first.id == again.id != other.id
    assert info.value.status == 409 and info.value.slug == "conflict"


def test_predict_and_predict_many(trained, tmp_path):
    with trained.client() as client:
        one = client.tasks.predict("sentiment", TEXTS, top_k=1)
        single = client.tasks.predict("sentiment", "fine plot")
        client.tasks.import_adapter("sentiment-twin", client.tasks.download("sentiment", tmp_path))
        many = client.predict_many(["sentiment", "sentiment-twin"], TEXTS)
    assert isinstance(one, TaskPredictions) and one.task == "sentiment" and one.version == 1
    assert len(one.predictions) == 3 and all(len(p.scores) == 1 for p in one.predictions)
    assert {p.label for p in one.predictions} <= {"negative", "positive"}
    assert len(single.predictions) == 1
    assert [r.task for r in many.results] == ["sentiment", "sentiment-twin"]
    twin, original = many["sentiment-twin"], many["sentiment"]
    for a, b in zip(twin.predictions, original.predictions, strict=True):  # the same weights answer the same
        assert a.label == b.label and a.score == pytest.approx(b.score, abs=1e-5)


def test_download_import_versions_and_activate(trained, tmp_path):
    with trained.client() as client:
        path = client.tasks.download("sentiment", tmp_path)
        assert path == tmp_path / "sentiment-v1.zip"
        with zipfile.ZipFile(path) as z:
            assert sorted(z.namelist()) == ["adapter.safetensors", "spafit_adapter.json"]
            z.extractall(tmp_path / "folder")
        v1 = client.tasks.import_adapter("copied", path)  # a zip
        v2 = client.tasks.import_adapter("copied", tmp_path / "folder")  # an adapter folder, zipped by the SDK
        v3 = client.tasks.import_adapter("copied", path.read_bytes())  # bytes
        assert isinstance(v1, AdapterVersion) and (v1.version, v2.version, v3.version) == (1, 2, 3)
        assert v1.sha256 == v2.sha256 and v3.active and v1.job_id is None
        versions = list(client.tasks.versions("copied", limit=1))
        assert [v.version for v in versions] == [3, 2, 1] and [v.active for v in versions] == [True, False, False]
        task = client.tasks.activate("copied", 1)
        assert task.active_version.version == 1 and task.version_count == 3
        assert client.tasks.get("copied").active_version.version == 1
        explicit = client.tasks.download("copied", tmp_path / "explicit.zip", version=2)
        assert explicit.read_bytes() == path.read_bytes()
        client.tasks.delete("copied")
        with pytest.raises(NotFoundError):
            client.tasks.get("copied")


def test_lists_iterate_across_pages(live_server, make_key):
    key = make_key("train")
    requests = []
    http = httpx.Client(event_hooks={"request": [requests.append]})
    with Client(live_server.url, api_key=key.key, http_client=http) as client:
        made = [client.datasets.upload(toy_csv(8, seed), name=f"page-{seed}") for seed in range(3)]
        requests.clear()
        listed = list(client.datasets.list(limit=1))
        assert [d.id for d in listed] == [d.id for d in reversed(made)]  # newest first
        assert len(requests) == 3 and all(r.url.params["limit"] == "1" for r in requests)
        assert "cursor" not in requests[0].url.params and all("cursor" in r.url.params for r in requests[1:])
        page = client.datasets.list(limit=2).first_page()
        assert len(page.items) == 2 and page.next_cursor
        assert client.datasets.get(made[0].id).name == "page-0"
        client.datasets.delete(made[0])
        assert [d.name for d in client.datasets.list()] == ["page-2", "page-1"]
    http.close()


def test_job_list_filters_and_pages(trained):
    with trained.client() as client:
        succeeded = list(client.jobs.list(status="succeeded", limit=1))
        by_task = list(client.jobs.list(task="sentiment", limit=1))
        assert list(client.jobs.list(status="failed")) == []
    assert [j.id for j in succeeded] == [trained.job.id]
    assert [j.id for j in by_task] == [trained.job.id]


def test_errors_are_typed_from_problem_json(trained, live_server, make_key):
    reader = make_key("predict", tenant=trained.key.tenant_id)
    with trained.client() as client:
        with pytest.raises(NotFoundError) as info:
            client.jobs.get(str(uuid.uuid4()))
        assert info.value.status == 404 and info.value.type == "https://spafit.dev/problems/not-found"
        assert info.value.detail and info.value.request_id
        with pytest.raises(NotFoundError):
            client.tasks.predict("no-such-task", ["x"])
        with pytest.raises(ValidationError) as info:
            client.jobs.create(task="sentiment", train_dataset=trained.train, method={**JOB_METHOD, "rank": 0},
                               hyperparameters=JOB_HYPERPARAMETERS)
        assert info.value.status == 422 and info.value.field == "method.rank"
        with pytest.raises(ValidationError) as info:
            client.tasks.predict("sentiment", ["   "])
        assert info.value.errors and info.value.errors[0]["field"] == "body.inputs.0"
    with Client(live_server.url, api_key=reader.key) as client:
        with pytest.raises(PermissionDeniedError) as info:
            client.datasets.upload(toy_csv(8, 1))
        assert info.value.status == 403
        assert client.tasks.predict("sentiment", ["fun"]).task == "sentiment"  # what the scope does allow
    for bad in ("spafit_bad_key", None):
        with Client(live_server.url, api_key=bad or "") as client, pytest.raises(AuthenticationError) as info:
            client.jobs.list().first_page()
        assert info.value.status == 401


def test_async_client_parity(trained):
    async def run():
        async with AsyncClient(trained.url, api_key=trained.key.key) as client:
            dataset = await client.datasets.upload(io.BytesIO(toy_csv(8, 7)), name="async")
            assert (await client.datasets.get(dataset.id)).name == "async"
            names = [d.name async for d in client.datasets.list(limit=1)]
            job = await client.jobs.wait(trained.job.id, progress=False)
            events = [e async for e in client.jobs.stream_events(job.id, after=1)]
            predictions = await client.tasks.predict("sentiment", TEXTS)
            many = await client.predict_many(["sentiment"], TEXTS[:1])
            versions = await client.tasks.versions("sentiment").to_list()
            try:
                await client.tasks.get("absent")
            except NotFoundError as e:
                missing = e
            return names, job, events, predictions, many, versions, missing

    names, job, events, predictions, many, versions, missing = asyncio.run(run())
    with trained.client() as client:
        sync_names = [d.name for d in client.datasets.list()]
        sync_predictions = client.tasks.predict("sentiment", TEXTS)
    assert names == sync_names and "async" in names
    assert job.id == trained.job.id and job.status == "succeeded"
    assert events[0].seq == 2 and events[-1].data["status"] == "succeeded"
    assert [p.label for p in predictions.predictions] == [p.label for p in sync_predictions.predictions]
    assert many["sentiment"].predictions[0].label == predictions.predictions[0].label
    assert [v.version for v in versions] == [1]
    assert missing.status == 404
