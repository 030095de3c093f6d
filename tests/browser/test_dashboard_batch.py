"""The dashboard's batch predictions page (#/batch) in headless Chromium against the live server and the session's
worker: the tenant's batch jobs with status and progress, the form that starts one over several tasks (the fan-out
path), the result file downloaded through the page; another tenant sees none of it."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from tests.api.adapters import SPAFIT, random_adapter, register
from tests.tiny import toy_csv

from .test_dashboard import open_with_key

pytestmark = pytest.mark.slow


def test_start_a_several_task_batch_prediction_watch_it_and_download_its_results(page, new_page, live_server, api,
                                                                                 tenant_key, db, tiny_base, shot):
    key = tenant_key("train")
    for task, seed in (("alpha", 0), ("beta", 1)):
        cfg, weights = random_adapter(tiny_base, SPAFIT, labels=("negative", "positive"), seed=seed)
        register(db, key.tenant_id, task, cfg, weights)
    client = api(key.key)
    ds = client.upload(toy_csv(40, 31), "batch-rows.csv")

    open_with_key(page, live_server.url, key.key, "#/batch")
    page.wait_for_selector("#batch-form")  # the batch page's own elements (the jobs page has neither)
    page.wait_for_selector("#batch-jobs .batch-empty")
    page.click("#batch-start")  # no task picked: said in words, nothing sent
    assert "Pick at least one task" in page.inner_text("#batch-form-result")
    page.check("#batch-task-alpha")
    page.check("#batch-task-beta")
    page.select_option("#batch-dataset", ds)
    page.select_option("#batch-format", "csv")
    page.click("#batch-start")
    page.wait_for_selector("#batch-form-result >> text=Started job")
    row = page.locator("#batch-jobs tbody tr[data-status=succeeded]")
    row.wait_for(timeout=120_000)  # the list refreshes itself while a job is going
    assert page.locator("#batch-jobs tbody tr").count() == 1
    assert row.locator(".batch-tasks").inner_text() == "alpha v1, beta v1"
    assert "40/40 rows (100%)" in row.inner_text()
    shot(page, "batch-predictions")

    with page.expect_download() as info:
        row.locator("button.download").click()
    download = info.value
    assert download.suggested_filename.endswith(".csv")
    table = list(csv.DictReader(io.StringIO(Path(download.path()).read_text())))
    assert [int(r["id"]) for r in table] == list(range(40))
    assert {"alpha.label", "alpha.score", "beta.label", "beta.score"} <= set(table[0])
    assert all(r["alpha.label"] in ("negative", "positive") and r["beta.label"] for r in table)

    other = new_page()  # another tenant: an empty list, and no form without tasks
    open_with_key(other, live_server.url, tenant_key("train").key, "#/batch")
    other.wait_for_selector("#batch-jobs .batch-empty")
    assert other.locator("#batch-form-missing").count() == 1
