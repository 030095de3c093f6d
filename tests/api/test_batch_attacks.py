"""Adversarial requests to batch predictions and evaluations (issue 16) that once got a 500 or a wrong answer:
each is a 4xx problem+json naming the field, or the documented behaviour."""

from __future__ import annotations

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
