"""The task page's Evaluations card: two versions evaluated by real `evaluate` jobs on the session's worker, side
by side on their dataset, with their confusion matrices (headless Chromium against the live server)."""

from __future__ import annotations

import time

from tests.api.adapters import SPAFIT, random_adapter, register
from tests.tiny import toy_csv

from .test_dashboard import open_with_key


def test_evaluations_side_by_side_with_confusion_matrices(page, live_server, api, tenant_key, db, tiny_base, shot):
    key = tenant_key("train")
    for seed in (0, 1):
        cfg, weights = random_adapter(tiny_base, SPAFIT, labels=("negative", "positive"), seed=seed)
        register(db, key.tenant_id, "graded", cfg, weights)
    client = api(key.key)
    ds = client.upload(toy_csv(30, 21), "eval.csv")
    ids = []
    for v in (1, 2):
        r = client.http.post(f"/v1/tasks/graded/versions/{v}/evaluate", json={"dataset": ds})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    deadline = time.monotonic() + 120
    while any(client.http.get(f"/v1/jobs/{i}").json()["status"] != "succeeded" for i in ids):
        assert time.monotonic() < deadline, [client.http.get(f"/v1/jobs/{i}").json() for i in ids]
        time.sleep(0.3)
    open_with_key(page, live_server.url, key.key, "#/tasks/graded")
    page.wait_for_selector("#evaluations .evaluations-table")
    rows = page.locator("#evaluations .evaluations-table tbody tr")
    assert rows.count() == 2
    assert [rows.nth(i).get_attribute("data-version") for i in range(2)] == ["1", "2"]
    assert "accuracy" in page.inner_text("#evaluations .evaluations-table thead")
    assert page.locator("#evaluations figure.confusion").count() == 2
    cells = page.locator("#evaluations figure.confusion[data-version='1'] tbody td").all_inner_texts()
    assert sum(int(c) for c in cells) == 30
    shot(page, "task-evaluations")


def test_an_evaluation_on_a_glue_preset_shows_its_metric_first(page, live_server, api, tenant_key, db, tiny_base):
    from tests.worker.test_batch import _as_glue_import

    key = tenant_key("train")
    cfg, weights = random_adapter(tiny_base, SPAFIT, labels=("unacceptable", "acceptable"), seed=2)
    register(db, key.tenant_id, "cola", cfg, weights)
    client = api(key.key)
    data = toy_csv(30, 22).replace(b",negative", b",unacceptable").replace(b",positive", b",acceptable")
    ds = client.upload(data, "cola-dev.csv")
    _as_glue_import(db, ds, "cola")
    r = client.http.post("/v1/tasks/cola/versions/1/evaluate", json={"dataset": ds})
    assert r.status_code == 202, r.text
    job = client.wait(r.json()["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
    assert job["status"] == "succeeded", job
    open_with_key(page, live_server.url, key.key, "#/tasks/cola")
    page.wait_for_selector("#evaluations .glue-note[data-preset=cola]")
    assert "matthews_corrcoef" in page.inner_text("#evaluations .glue-note")
    headers = page.locator("#evaluations .evaluations-table thead th").all_inner_texts()
    assert headers[:2] == ["Version", "matthews_corrcoef (GLUE)"]


def test_an_evaluation_without_its_confusion_matrix_says_why(page, live_server, api, tenant_key, db, tiny_base):
    """Past 100 labels an evaluation keeps no confusion matrix (worker/batch.py): the card says so for that
    version instead of showing nothing."""
    import uuid

    from app.models import VersionEvaluation
    from worker.batch import evaluation_metrics

    key = tenant_key("train")
    labels = tuple(f"l{i}" for i in range(101))
    cfg, weights = random_adapter(tiny_base, SPAFIT, labels=labels, seed=3)
    version = register(db, key.tenant_id, "wide", cfg, weights)
    ds = api(key.key).upload(toy_csv(30, 23), "eval.csv")
    metrics = evaluation_metrics("single_label_classification", [0, 1, 2, 1], [0, 1, 1, 1], list(labels))
    with db.transaction() as s:  # as the evaluate job stores it
        s.add(VersionEvaluation(tenant_id=key.tenant_id, version_id=version.id, dataset_id=uuid.UUID(ds), rows=4,
                                metrics=metrics))
    open_with_key(page, live_server.url, key.key, "#/tasks/wide")
    page.wait_for_selector("#evaluations .confusion-omitted")
    text = page.inner_text("#evaluations .confusion-omitted")
    assert text.startswith("v1: no confusion matrix") and "101 labels" in text, text
    assert page.locator("#evaluations figure.confusion").count() == 0
