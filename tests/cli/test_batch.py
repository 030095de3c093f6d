"""The SDK (sync and async) and the CLI for batch predictions and evaluations, against the live server and the
session's worker (real processes)."""

from __future__ import annotations

import asyncio
import csv
import io
import json

import pytest

from tests.api.adapters import SPAFIT, random_adapter, register
from tests.tiny import toy_csv

pytestmark = pytest.mark.slow


@pytest.fixture
def batch_tenant(live_server, make_key, db, tiny_base):
    key = make_key("train", "predict")
    for seed in (0, 1):
        cfg, weights = random_adapter(tiny_base, SPAFIT, labels=("negative", "positive"), seed=seed)
        register(db, key.tenant_id, "reviews", cfg, weights)
    register(db, key.tenant_id, "reviews-old", cfg, weights)  # a second task (the last weights) for fan-out jobs
    return live_server, key


def test_sync_sdk_batch_prediction_and_evaluation(batch_tenant, worker, tmp_path):
    """Slow: four real jobs (a batch prediction, two evaluations, a two-task batch prediction) one after another on
    the session's one worker; each worker child imports torch and loads the backbone (20-30 s in all when idle,
    over 60 s on a loaded machine)."""
    from spafit_client import Client

    server, key = batch_tenant
    with Client(server.url, api_key=key.key) as client:
        ds = client.datasets.upload(toy_csv(30, 7), name="rows")
        job = client.batch.create(task="reviews", dataset=ds, format="csv", all_scores=True)
        assert job.kind == "predict" and job.status == "queued"
        out = io.StringIO()
        done = client.batch.wait(job, timeout=120, file=out)
        assert done.status == "succeeded" and done.progress.step == 30
        assert "30/30" in out.getvalue() or "100%" in out.getvalue(), out.getvalue()
        rows = list(client.batch.results(job))
        assert [int(r["id"]) for r in rows] == list(range(30))
        assert all(len(json.loads(r["scores"])) == 2 for r in rows)
        whole = client.batch.download(job, tmp_path / "all.csv").read_bytes()
        cut = tmp_path / "cut.csv"
        for kept in (whole[:7], whole[:len(whole) // 2], whole + b"more", b""):  # resumed, or fetched whole again
            cut.write_bytes(kept)
            assert client.batch.download(job, cut, resume=True).read_bytes() == whole, len(kept)
        assert [j.id for j in client.batch.list()] == [job.id]

        for v in (1, 2):
            ev = client.tasks.evaluate("reviews", v, ds)
            assert ev.kind == "evaluate"
            client.jobs.wait(ev, progress=False, timeout=120)
        versions = {v.version: v for v in client.tasks.versions("reviews")}
        assert all(len(v.evaluations) == 1 for v in versions.values())
        cmp = client.tasks.compare("reviews", 1, 2)
        assert cmp["versions"] == [1, 2] and cmp["datasets"][0]["dataset"] == ds.id

        # several tasks over the dataset in one job: each row carries each task's prediction
        many = client.batch.create(tasks=["reviews", ("reviews-old", 1)], dataset=ds)
        assert [t["task"] for t in many.hyperparameters["tasks"]] == ["reviews", "reviews-old"]
        client.batch.wait(many, progress=False, timeout=120)
        rows = list(client.batch.results(many))
        assert [r["id"] for r in rows] == list(range(30))
        assert all(set(r["results"]) == {"reviews", "reviews-old"} for r in rows)


def test_async_sdk_batch_prediction(batch_tenant, worker, tmp_path):
    from spafit_client import AsyncClient

    server, key = batch_tenant

    async def go():
        async with AsyncClient(server.url, api_key=key.key) as client:
            ds = await client.datasets.upload(toy_csv(20, 8), name="rows")
            job = await client.batch.create(task="reviews", dataset=ds)
            await client.batch.wait(job, progress=False, timeout=120)
            rows = [r async for r in client.batch.results(job)]
            path = await client.batch.download(job, tmp_path / "out.jsonl")
            whole = path.read_bytes()
            cut = tmp_path / "cut.jsonl"  # a download cut short, resumed: the file, not the file twice
            cut.write_bytes(whole[:100])
            await client.batch.download(job, cut, resume=True)
            resumed = cut.read_bytes()
            await client.batch.download(job, cut, resume=True)  # already whole: left as it is
            return rows, path, whole, resumed, cut.read_bytes()

    rows, path, whole, resumed, again = asyncio.run(go())
    assert [r["id"] for r in rows] == list(range(20))
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    assert resumed == again == whole


def test_cli_batch_and_evaluate(batch_tenant, worker, spafit, tmp_path):
    """Slow: four real jobs (two batch predictions, one over two tasks, and two evaluations) in turn on the session's
    one worker, each in a fresh worker child (over 60 s on a loaded machine)."""
    from spafit_client import Client

    server, key = batch_tenant
    with Client(server.url, api_key=key.key) as client:
        ds = client.datasets.upload(toy_csv(25, 9), name="rows").id
    out = tmp_path / "r.csv"
    r = spafit("batch", "create", "reviews", ds, "--format", "csv", "-o", str(out), "--json", url=server.url,
               key=key.key)
    assert r.exit_code == 0, r
    assert r.json()["status"] == "succeeded"
    assert [int(row["id"]) for row in csv.DictReader(io.StringIO(out.read_text()))] == list(range(25))
    r = spafit("batch", "results", r.json()["id"], url=server.url, key=key.key)
    assert r.exit_code == 0 and r.stdout.startswith("id,label,score,scores"), r
    r = spafit("evaluate", "reviews", "1", ds, url=server.url, key=key.key)
    assert r.exit_code == 0, r
    assert "accuracy" in r.stdout and "confusion" in r.stdout
    r = spafit("evaluate", "reviews", "2", ds, "--compare-with", "1", "--json", url=server.url, key=key.key)
    assert r.exit_code == 0, r
    assert r.json()["compare"]["versions"] == [1, 2]
    r = spafit("batch", "show", "00000000-0000-0000-0000-000000000000", url=server.url, key=key.key)
    assert r.exit_code == 3, r
    both = tmp_path / "both.csv"
    r = spafit("batch", "create", ds, "--task", "reviews", "--task", "reviews-old@1", "--format", "csv", "-o",
               str(both), "--json", url=server.url, key=key.key)
    assert r.exit_code == 0, r
    assert [t["task"] for t in r.json()["hyperparameters"]["tasks"]] == ["reviews", "reviews-old"]
    table = list(csv.DictReader(io.StringIO(both.read_text())))
    assert len(table) == 25 and table[0]["reviews.label"] == table[0]["reviews-old.label"]  # the same weights
    r = spafit("batch", "create", "reviews", ds, "--task", "reviews-old", url=server.url, key=key.key)
    assert r.exit_code == 2 and "--task" in r.stderr, r
    r = spafit("batch", "create", ds, "--task", "reviews@x", url=server.url, key=key.key)
    assert r.exit_code == 2 and "NAME@VERSION" in r.stderr, r
