"""Adversarial requests to batch predictions and evaluations (issue 16) that once got a 500 or a wrong answer:
each is a 4xx problem+json naming the field, or the documented behaviour."""

from __future__ import annotations

import contextlib
import json

import pytest

from .adapters import SPAFIT, random_adapter, register
from .helpers import assert_problem


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from .adapters import tiny_backbone

    return tiny_backbone(tmp_path_factory.mktemp("attack-model"))


@pytest.mark.parametrize("spec", ["\u00b2,1", "1,\u2460", "\u0661,2", "1,\uff12"])
def test_compare_with_non_ascii_digits_is_422_naming_compare(client, tenant_key, db, base, spec):
    """`str.isdigit` is true of superscripts and circled digits, which `int()` cannot parse: once a 500."""
    key = tenant_key("train")
    cfg, weights = random_adapter(base, SPAFIT, seed=0)
    register(db, key.tenant_id, "sentiment", cfg, weights)
    register(db, key.tenant_id, "sentiment", cfg, weights)
    r = client.get("/v1/tasks/sentiment/versions", params={"compare": spec}, headers=key.headers)
    assert assert_problem(r, 422)["field"] == "compare"


def _upload(client, key, labels: tuple[str, str], n: int = 12) -> str:
    from .helpers import upload

    rows = "".join(f"text number {i},{labels[i % 2]}\n" for i in range(n))
    r = upload(client, f"text,label\n{rows}".encode(), "rows.csv", headers=key.headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_evaluating_a_multi_label_version_is_422_at_creation_not_a_failed_job(client, tenant_key, db, base):
    key = tenant_key("train")
    cfg, weights = random_adapter(base, SPAFIT, labels=("neg", "pos"), task_type="multi_label_classification")
    register(db, key.tenant_id, "tags", cfg, weights)
    ds = _upload(client, key, ("neg", "pos"))
    p = assert_problem(client.post("/v1/tasks/tags/versions/1/evaluate", json={"dataset": ds}, headers=key.headers),
                       422)
    assert p["field"] == "version" and "multi-label" in p["detail"]


def test_evaluating_on_labels_the_version_does_not_know_is_422_naming_them(client, tenant_key, db, base):
    """Once a 202 and then a job failed at its first row; the upload's label counts already tell."""
    key = tenant_key("train")
    cfg, weights = random_adapter(base, SPAFIT, labels=("neg", "pos"))
    register(db, key.tenant_id, "sentiment", cfg, weights)
    client.app.state.send_job = lambda job_id: None  # nothing here needs a worker
    wrong = _upload(client, key, ("negative", "positive"))
    p = assert_problem(client.post("/v1/tasks/sentiment/versions/1/evaluate", json={"dataset": wrong},
                                   headers=key.headers), 422, "invalid-dataset")
    assert p["field"] == "label_field" and "negative" in p["detail"] and "positive" in p["detail"]
    right = _upload(client, key, ("pos", "neg"))
    assert client.post("/v1/tasks/sentiment/versions/1/evaluate", json={"dataset": right},
                       headers=key.headers).status_code == 202


def test_csv_results_do_not_hand_spreadsheets_formulas():
    """A label or id such as `=HYPERLINK(...)` or `@SUM(...)` (from a tenant's training labels or a customer's
    ticket id) is written as text (`'=...`) in CSV results; numbers, negative ones too, and JSON Lines stay as is."""
    import csv
    import io
    import json

    from app.services.batch import encode_rows, encode_task_rows

    rows = [{"id": "=1+2", "label": '=HYPERLINK("http://x","y")', "score": 0.5, "scores": []},
            {"id": "-3", "label": "@SUM(A1)", "score": 0.5, "scores": []},
            {"id": {"a": 1}, "label": "+cmd|' /C calc'!A0", "score": 0.5, "scores": []},
            {"id": 7, "label": "\tx", "score": 0.5, "scores": []},
            {"id": "-2+3", "label": "plain", "score": 0.5, "scores": []}]
    got = list(csv.reader(io.StringIO(encode_rows(rows, "csv", False).decode())))
    assert [(r[0], r[1]) for r in got] == [("'=1+2", "'=HYPERLINK(\"http://x\",\"y\")"), ("-3", "'@SUM(A1)"),
                                           ('{"a":1}', "'+cmd|' /C calc'!A0"), ("7", "'\tx"), ("'-2+3", "plain")]
    several = [{"id": r["id"], "results": {"t": r}} for r in rows]
    got = list(csv.reader(io.StringIO(encode_task_rows(several, ["t"], "csv", False).decode())))
    assert [(r[0], r[1]) for r in got][:2] == [("'=1+2", "'=HYPERLINK(\"http://x\",\"y\")"), ("-3", "'@SUM(A1)")]
    lines = [json.loads(x) for x in encode_rows(rows, "jsonl", False).decode().splitlines()]
    assert [(r["id"], r["label"]) for r in lines] == [(r["id"], r["label"]) for r in rows]


@pytest.fixture
def live_client(make_settings, tiny_base, worker):
    """The API in process, its jobs run by the session's real Celery worker (tests/live.py)."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.live import WORKER_SETTINGS

    app = create_app(make_settings(allowed_base_models=[tiny_base], default_base_model=tiny_base,
                                   batch_chunk_rows=16, **WORKER_SETTINGS))
    with TestClient(app) as c:
        yield c


def _finished(client, job_id: str, headers: dict, timeout: float = 120) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never ended: {job}")


@pytest.mark.slow
def test_results_answer_head_and_carry_their_content_length(live_client, tenant_key, db, tiny_base):
    """HEAD was 405; a GET had no Content-Length, so a download cut short (the job deleted mid-stream) looked
    complete. Both now give the file's exact length; HEAD gives the GET's status and headers, no body."""
    key, other = tenant_key("train"), tenant_key("train")
    cfg, weights = random_adapter(tiny_base, SPAFIT, labels=("=neg", "pos"), seed=0)
    register(db, key.tenant_id, "sentiment", cfg, weights)
    ds = _upload(live_client, key, ("=neg", "pos"), n=40)
    results = {}
    for fmt in ("csv", "jsonl"):
        r = live_client.post("/v1/batch-predictions", json={"task": "sentiment", "dataset": ds, "format": fmt,
                                                            "all_scores": True}, headers=key.headers)
        assert r.status_code == 202, r.text
        assert _finished(live_client, r.json()["id"], key.headers)["status"] == "succeeded"
        url = f"/v1/batch-predictions/{r.json()['id']}/results"
        got = live_client.get(url, headers=key.headers)
        head = live_client.head(url, headers=key.headers)
        assert got.status_code == head.status_code == 200 and head.content == b""
        assert int(got.headers["content-length"]) == int(head.headers["content-length"]) == len(got.content)
        assert head.headers["content-type"] == got.headers["content-type"]
        assert head.headers["content-disposition"] == got.headers["content-disposition"]
        assert len(got.text.splitlines()) == 40 + (fmt == "csv")
        results[fmt] = url
    assert live_client.head(results["csv"], headers=other.headers).status_code == 404
    live_client.app.state.send_job = lambda job_id: None  # held queued
    queued = live_client.post("/v1/batch-predictions", json={"task": "sentiment", "dataset": ds},
                              headers=key.headers).json()["id"]
    assert live_client.head(f"/v1/batch-predictions/{queued}/results", headers=key.headers).status_code == 409
    live_client.post(f"/v1/jobs/{queued}/cancel", headers=key.headers)


@pytest.mark.slow
def test_evaluating_a_regression_version_on_nan_labels_fails_naming_the_row(live_client, tenant_key, db, tiny_base):
    """`float("nan")` parses: once such a label made every metric null and the evaluation `succeeded`."""
    from .helpers import upload

    key = tenant_key("train")
    cfg, weights = random_adapter(tiny_base, SPAFIT, labels=(), task_type="regression")
    register(db, key.tenant_id, "score", cfg, weights)
    rows = "".join(f"text number {i},{'nan' if i == 7 else i / 10}\n" for i in range(12))
    r = upload(live_client, f"text,label\n{rows}".encode(), "rows.csv", headers=key.headers)
    assert r.status_code == 201, r.text
    job = live_client.post("/v1/tasks/score/versions/1/evaluate", json={"dataset": r.json()["id"]},
                           headers=key.headers)
    assert job.status_code == 202, job.text
    done = _finished(live_client, job.json()["id"], key.headers)
    assert done["status"] == "failed" and done["error"]["type"] == "invalid-dataset", done
    assert "row 7" in done["error"]["message"] and "nan" in done["error"]["message"]
    versions = live_client.get("/v1/tasks/score/versions", headers=key.headers).json()["items"]
    assert versions[0]["evaluations"] == []


@pytest.mark.parametrize("spec", ["reviews@\u00b2", "reviews@\u2460", "reviews@x", "reviews@0"])
def test_cli_task_version_that_is_not_an_ascii_number_is_a_usage_error(spec):
    """`spafit batch create DS --task NAME@²` was a ValueError traceback (str.isdigit accepts ², int() does not);
    it is refused before any request (the URL here answers nothing)."""
    from click.testing import CliRunner

    from app.cli import main

    r = CliRunner().invoke(main, ["batch", "create", "00000000-0000-0000-0000-000000000000", "--task", spec],
                           env={"SPAFIT_URL": "http://127.0.0.1:9", "SPAFIT_API_KEY": "k"})
    assert r.exit_code == 2 and "NAME@VERSION" in r.stderr, (r.exit_code, r.stderr, r.exception)


@pytest.mark.slow
def test_sdk_results_keep_ids_with_line_separators_whole(live_server, worker, make_key, db, tiny_base):
    """Ids with U+2028, U+0085 or a newline (a JSON Lines dataset's `id`): the SDK's `results` split lines with
    httpx's iter_lines, which ends a line at those too, and so cut such rows in two (JSONL: a JSONDecodeError; CSV:
    wrong rows). Sync and async, both formats, now give every id back as it was; JSON Lines escape U+2028/U+0085."""
    import asyncio
    import json

    import httpx
    from spafit_client import AsyncClient, Client

    key = make_key("train")
    cfg, weights = random_adapter(tiny_base, SPAFIT, labels=("neg", "pos"), seed=1)
    register(db, key.tenant_id, "sentiment", cfg, weights)
    ids = ["x\u2028y", "p\x85q", "m\nn", "r\u2029s", "plain", 'q"uote']
    data = "".join(json.dumps({"id": i, "text": f"text number {n}", "label": "pos" if n % 2 else "neg"}) + "\n"
                   for n, i in enumerate(ids)).encode()
    with Client(live_server.url, api_key=key.key) as client:
        ds = client.datasets.upload(data, name="rows.jsonl", format="jsonl")
        jobs = {fmt: client.batch.create(task="sentiment", dataset=ds, format=fmt) for fmt in ("jsonl", "csv")}
        for job in jobs.values():
            assert client.batch.wait(job, timeout=120, progress=False).status == "succeeded"
        for job in jobs.values():
            assert [r["id"] for r in client.batch.results(job)] == ids
        raw = httpx.get(f"{live_server.url}/v1/batch-predictions/{jobs['jsonl'].id}/results",
                        headers={"Authorization": f"Bearer {key.key}"}).text
        assert len(raw.splitlines()) == len(ids) and "\u2028" not in raw and "\x85" not in raw

    async def read() -> list[list[str]]:
        async with AsyncClient(live_server.url, api_key=key.key) as client:
            return [[r["id"] async for r in client.batch.results(job)] for job in jobs.values()]

    assert asyncio.run(read()) == [ids, ids]


@pytest.mark.slow
def test_deleting_the_task_while_its_evaluation_runs_fails_it_saying_so(live_client, tenant_key, db, tiny_base):
    """Once an internal error (the evaluation row's foreign key to the deleted version); now a failed job whose
    error says the version was deleted, on its first attempt, and no evaluation is stored."""
    import os
    import signal
    import time
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as FutureTimeout

    from sqlalchemy import func, select

    from app.models import VersionEvaluation
    from tests.reliability.conftest import job_row
    from tests.tiny import toy_csv

    from .helpers import upload

    key = tenant_key("train")
    cfg, weights = random_adapter(tiny_base, SPAFIT, labels=("neg", "pos"), seed=1)
    register(db, key.tenant_id, "sentiment", cfg, weights)
    ds = upload(live_client, toy_csv(4000, 9, labels=("neg", "pos")), "big.csv", headers=key.headers).json()["id"]
    job_id = live_client.post("/v1/tasks/sentiment/versions/1/evaluate", json={"dataset": ds},
                              headers=key.headers).json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = job_row(db, job_id)
        if job.status == "running" and ((job.progress or {}).get("step") or 0) > 0:
            break
        assert job.status not in ("succeeded", "failed", "cancelled"), job.status
        time.sleep(0.02)
    # CI once saw the evaluation finish between this read and the delete (a fast machine, 4,000 tiny rows): the
    # process running it is paused (SIGSTOP) so the delete lands mid-run for certain, then woken (well within the
    # 4 s heartbeat). Should the pause catch it inside a progress write, the delete waits on that row lock: the
    # worker is woken after 1.5 s, the write commits and the delete goes ahead, still with most rows to go.
    pid = int(job.claimed_by.rpartition(":")[2])
    os.kill(pid, signal.SIGSTOP)
    try:
        paused = job_row(db, job_id)
        assert paused.status == "running", (paused.status, paused.progress)
        with ThreadPoolExecutor(1) as pool:
            deleted = pool.submit(live_client.delete, "/v1/tasks/sentiment", headers=key.headers)
            try:
                deleted.result(timeout=1.5)
            except FutureTimeout:
                os.kill(pid, signal.SIGCONT)
            assert deleted.result(timeout=30).status_code == 204
    finally:
        with contextlib.suppress(ProcessLookupError):  # woken early, its child may have ended the job already
            os.kill(pid, signal.SIGCONT)
    done = _finished(live_client, job_id, key.headers)
    assert done["status"] == "failed" and done["attempts"] == 1, done
    assert done["error"]["type"] == "invalid-dataset" and "deleted" in done["error"]["message"], done
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(VersionEvaluation).where(
            VersionEvaluation.tenant_id == key.tenant_id)) == 0


@pytest.mark.slow
def test_top_k_alone_returns_that_many_scores_and_with_all_scores_false_is_422(live_client, tenant_key, db, tiny_base):
    """`top_k` without `all_scores` was accepted and silently ignored (rows without scores): alone it now asks for
    the best k scores; with `all_scores: false` it contradicts it (422 naming the body)."""
    key = tenant_key("train")
    cfg, weights = random_adapter(tiny_base, SPAFIT, labels=("neg", "pos"), seed=0)
    register(db, key.tenant_id, "sentiment", cfg, weights)
    ds = _upload(live_client, key, ("neg", "pos"), n=6)
    bad = live_client.post("/v1/batch-predictions", json={"task": "sentiment", "dataset": ds, "top_k": 1,
                                                          "all_scores": False}, headers=key.headers)
    problem = assert_problem(bad, 422)
    assert "all_scores" in problem["detail"] and problem["field"] == "all_scores", problem
    r = live_client.post("/v1/batch-predictions", json={"task": "sentiment", "dataset": ds, "top_k": 1},
                         headers=key.headers)
    assert r.status_code == 202, r.text
    assert _finished(live_client, r.json()["id"], key.headers)["status"] == "succeeded"
    rows = [json.loads(line) for line in live_client.get(f"/v1/batch-predictions/{r.json()['id']}/results",
                                                         headers=key.headers).text.splitlines()]
    assert len(rows) == 6
    for row in rows:
        assert [s["label"] for s in row["scores"]] == [row["label"]], row  # the best one, and only it


@pytest.mark.slow
def test_an_idempotent_retry_gets_its_job_back_after_the_active_version_changed(live_client, tenant_key, db,
                                                                                 tiny_base):
    """The request's hash once included the version it resolved to: a retry after another version was activated
    (or after the task was deleted) was a 409 or a 404 instead of the job the first request made."""
    key = tenant_key("train")
    cfg, weights = random_adapter(tiny_base, SPAFIT, labels=("neg", "pos"), seed=0)
    register(db, key.tenant_id, "sentiment", cfg, weights)
    ds = _upload(live_client, key, ("neg", "pos"), n=6)
    live_client.app.state.send_job = lambda job_id: None  # held queued: the retries find it as it was made
    headers = {**key.headers, "Idempotency-Key": "retry-me"}
    evaluate = {**key.headers, "Idempotency-Key": "retry-eval"}
    first = live_client.post("/v1/batch-predictions", json={"task": "sentiment", "dataset": ds}, headers=headers)
    scored = live_client.post("/v1/tasks/sentiment/versions/1/evaluate", json={"dataset": ds}, headers=evaluate)
    assert first.status_code == scored.status_code == 202, (first.text, scored.text)
    register(db, key.tenant_id, "sentiment", *random_adapter(tiny_base, SPAFIT, labels=("neg", "pos"), seed=1))
    again = live_client.post("/v1/batch-predictions", json={"task": "sentiment", "dataset": ds}, headers=headers)
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"], again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert live_client.delete("/v1/tasks/sentiment", headers=key.headers).status_code == 204
    for url, body, h, made in (("/v1/batch-predictions", {"task": "sentiment", "dataset": ds}, headers, first),
                               ("/v1/tasks/sentiment/versions/1/evaluate", {"dataset": ds}, evaluate, scored)):
        after = live_client.post(url, json=body, headers=h)
        assert after.status_code == 202 and after.json()["id"] == made.json()["id"], after.text
    other = live_client.post("/v1/batch-predictions", json={"task": "sentiment", "dataset": ds, "format": "csv"},
                             headers=headers)
    assert_problem(other, 409)  # the same key for another request is still refused


@pytest.mark.slow
def test_results_answer_a_byte_range_so_a_cut_download_resumes(live_client, tenant_key, db, tiny_base):
    """`Range` was ignored (the whole file again, allowed but useless to resume a download cut short): one byte
    range is now a 206 with those bytes and Content-Range, across chunk boundaries and the CSV header; past the
    end a 416; `If-Range` with another ETag, several ranges or a malformed one get the whole file."""
    key = tenant_key("train")
    cfg, weights = random_adapter(tiny_base, SPAFIT, labels=("neg", "pos"), seed=0)
    register(db, key.tenant_id, "sentiment", cfg, weights)
    ds = _upload(live_client, key, ("neg", "pos"), n=40)  # chunks of 16 rows: three of them
    for fmt in ("csv", "jsonl"):
        r = live_client.post("/v1/batch-predictions", json={"task": "sentiment", "dataset": ds, "format": fmt},
                             headers=key.headers)
        assert _finished(live_client, r.json()["id"], key.headers)["status"] == "succeeded"
        url = f"/v1/batch-predictions/{r.json()['id']}/results"
        full = live_client.get(url, headers=key.headers)
        body, etag, size = full.content, full.headers["etag"], len(full.content)
        assert full.status_code == 200 and full.headers["accept-ranges"] == "bytes" and size > 600

        def get(url=url, **extra):
            return live_client.get(url, headers={**key.headers, **extra})

        for spec, (lo, hi) in (("bytes=0-9", (0, 10)), ("bytes=5-", (5, size)), ("bytes=-7", (size - 7, size)),
                               (f"bytes=100-{size + 50}", (100, size)), ("bytes=300-700", (300, 701)),
                               (f"bytes=-{size * 2}", (0, size))):
            part = get(Range=spec)
            assert part.status_code == 206, (spec, part.status_code)
            assert part.content == body[lo:hi], spec
            assert part.headers["content-range"] == f"bytes {lo}-{hi - 1}/{size}"
            assert int(part.headers["content-length"]) == hi - lo
        cut = body[:333]  # a download cut short, resumed where it stopped, is the file
        assert cut + get(Range="bytes=333-", **{"If-Range": etag}).content == body
        for spec, extra in (("bytes=0-1,5-6", {}), ("bytes=9-3", {}), ("items=0-5", {}), ("bytes=x-", {}),
                            (b"bytes=\xb2-", {}), ("bytes=0-9", {"If-Range": '"another"'})):
            whole = get(Range=spec, **extra)
            assert whole.status_code == 200 and whole.content == body, spec
        beyond = get(Range=f"bytes={size}-")
        assert assert_problem(beyond, 416)["field"] == "Range"
        assert beyond.headers["content-range"] == f"bytes */{size}"
        assert_problem(get(Range="bytes=-0"), 416)
