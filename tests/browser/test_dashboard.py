"""The dashboard in headless Chromium against the live service and a real worker: enter a key, upload a
dataset and read its report, submit a job and watch it train, compare versions and roll back, see the layer
map, try a prediction, cancel a running job, read a failure in words; another tenant sees none of it; with
auth off (embedded mode) no key is asked for."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.tiny import toy_csv

pytestmark = pytest.mark.slow

BAD_CSV = b"text,label\ngood film,positive\n,negative\nfine plot,\nawful,negative\n"


def wait_until(page: Any, predicate: Callable[[], Any], timeout: float = 30, what: str = "a condition") -> Any:
    """Poll `predicate` (which reads the page through Playwright) until it is truthy. The page's CSP forbids
    eval, and with it Playwright's wait_for_function."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        page.wait_for_timeout(100)
    return value


def open_with_key(page, url: str, key: str, route: str = "#/jobs") -> None:
    page.goto(f"{url}/dashboard{route}")
    page.fill("#api-key", key)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#auth-state[data-mode=ok]")


def spafit_body(train: str, val: str | None, task: str, **hp) -> dict:
    return {"task": task, "train_dataset": train, "validation_dataset": val,
            "method": {"name": "spafit", "n1": 1, "n2": 3, "rank": 4},
            "hyperparameters": {"epochs": 2, "batch_size": 8, "learning_rate": 5e-3, "seed": 1, **hp}}


def badge(page) -> str:
    return page.get_attribute("h1 .badge", "data-status")


def points(page, chart: str) -> int:
    return int(page.get_attribute(f"{chart} svg", "data-points") or 0)


def test_submit_watch_compare_roll_back_predict_and_stay_private(page, new_page, live_server, api, tenant_key,
                                                                 shot):
    """The main story: one tenant trains a task twice (v1 from the page, v2 through the API), compares the
    versions, rolls back to v1 and tries it; a second tenant's key sees none of it."""
    key = tenant_key("train", "predict")
    client = api(key.key)
    page.goto(f"{live_server.url}/")  # redirects to the dashboard, which asks for a key
    assert page.url.startswith(f"{live_server.url}/dashboard")
    page.wait_for_selector("#auth-state[data-mode=none]")
    assert page.inner_text("h1") == "API key needed"
    shot(page, "key-needed")
    open_with_key(page, live_server.url, key.key, "#/new")

    # A file with problems: the report names each one with its line.
    page.wait_for_selector("#train-file")
    page.set_input_files("#train-file", {"name": "bad.csv", "mimeType": "text/csv", "buffer": BAD_CSV})
    page.wait_for_selector("#train-report .report-bad")
    problems = page.locator("#train-report .problems-table tbody tr")
    lines = [problems.nth(i).locator("td").first.inner_text() for i in range(problems.count())]
    assert {"3", "4"} <= set(lines), lines
    assert "empty text" in page.inner_text("#train-report")
    shot(page, "new-job-dataset-problems")

    # Good files: rows, columns and label counts.
    page.set_input_files("#train-file", {"name": "train.csv", "mimeType": "text/csv", "buffer": toy_csv(160, 0)})
    page.wait_for_selector("#train-report .report-ok")
    assert page.inner_text("#train-report .report-rows") == "160"
    labels = page.inner_text("#train-report .labels-table")
    assert "negative" in labels and "positive" in labels and "80" in labels
    page.set_input_files("#validation-file", {"name": "val.csv", "mimeType": "text/csv", "buffer": toy_csv(24, 100)})
    page.wait_for_selector("#validation-report .report-ok")

    # The method's parameters come filled in with the API's defaults; each method shows its own.
    assert page.input_value("#method-rank") == "8" and page.input_value("#hyperparameters-epochs") == "3"
    assert page.is_checked("#target-query") and not page.is_checked("#target-ffn_in")
    page.check("#method-bitfit")
    assert page.locator("#method-rank").is_hidden()
    page.check("#method-spafit")
    page.fill("#task", "sentiment")
    page.fill("#method-n1", "1")
    page.fill("#method-n2", "3")
    page.fill("#method-rank", "4")
    page.fill("#hyperparameters-epochs", "3")
    page.fill("#hyperparameters-batch_size", "4")
    page.fill("#hyperparameters-learning_rate", "0.005")
    shot(page, "new-job")
    page.click("#submit-job")

    # The job page: the loss curve grows while the job runs, then it succeeds.
    page.wait_for_url(re.compile(r".*#/jobs/[0-9a-f-]{36}$"))
    job_id = page.url.rsplit("/", 1)[1]
    first = client.http.get(f"/v1/jobs/{job_id}").json()
    # Queue v2 now (LoRA, same data) so that the worker trains it right after v1.
    second = client.job({**spafit_body(first["train_dataset"], first["validation_dataset"], "sentiment"),
                         "method": {"name": "lora", "rank": 2}})
    seen = set()

    def finished() -> bool:
        if badge(page) == "running":
            seen.add(points(page, "#loss-chart"))
        return badge(page) in ("succeeded", "failed", "cancelled")

    wait_until(page, finished, timeout=120, what="the job to finish")
    assert badge(page) == "succeeded", (page.inner_text("main"), live_server.tail())
    assert len(seen - {0}) >= 2, f"the curve never grew while the job ran: {sorted(seen)}"
    wait_until(page, lambda: points(page, "#loss-chart") == 120, what="every step on the loss curve")
    assert points(page, "#lr-chart") == 120  # 160 rows / 4 x 3 epochs
    assert page.locator("#eval .eval-table tbody tr").count() == 3
    assert "attempt 1" in page.inner_text(".events-table")
    assert page.locator("#cancel-job").count() == 0
    config = page.inner_text("main")
    assert "n1" in config and "learning_rate" in config and "0.005" in config
    shot(page, "job-succeeded")

    # The list follows v2 live until it succeeds; the filters.
    page.click("nav >> text=Jobs")
    row = page.locator(f"tr[data-job-id='{second['id']}']")
    row.wait_for()
    wait_until(page, lambda: row.get_attribute("data-status") == "succeeded", timeout=120, what="v2 to succeed")
    assert page.locator(f"tr[data-job-id='{job_id}']").get_attribute("data-status") == "succeeded"
    assert "120/120" in page.inner_text(f"tr[data-job-id='{job_id}']")
    shot(page, "jobs")
    page.select_option("#filter-status", "failed")
    page.wait_for_selector(".empty")
    assert "No jobs match" in page.inner_text("main")
    page.select_option("#filter-status", "succeeded")
    page.wait_for_selector(f"tr[data-job-id='{job_id}']")
    page.fill("#filter-task", "other-task")
    page.press("#filter-task", "Enter")
    page.wait_for_selector(".empty")

    # The tasks list and the task: versions side by side, v2 active.
    page.click("nav >> text=Tasks")
    row = page.locator("tr[data-task='sentiment']")
    row.wait_for()
    assert "v2" in row.inner_text() and "accuracy" in row.inner_text() and "KB" in row.inner_text()
    shot(page, "tasks")
    row.locator("a").click()
    page.wait_for_selector(".versions-table")
    assert page.locator(".versions-table tbody tr").count() == 2
    assert page.get_attribute(".versions-table tr.active", "data-version") == "2"
    header = page.inner_text(".versions-table thead")
    assert "accuracy" in header and "f1" in header

    # The layer map of the active version (LoRA: every layer), then of v1 (SPAFIT n1=1, n2=3 of 4 layers).
    page.wait_for_selector("#layers svg.layers")
    assert page.get_attribute("#layers svg.layers", "data-groups") == "3333"
    assert "LoRA (4)" in page.inner_text("#layers")
    page.select_option("#layers-version", "1")
    page.wait_for_selector("#layers svg.layers[data-groups='1223']")
    groups = [page.locator("#layers g.layer").nth(i).get_attribute("data-group") for i in range(4)]
    assert groups == ["1", "2", "2", "3"]
    assert "frozen (1)" in page.inner_text("#layers") and "bias-only (2)" in page.inner_text("#layers")

    # Roll back to v1: predict serves it.
    page.click("button[data-activate='1']")
    page.wait_for_selector(".versions-table tr.active[data-version='1']")
    assert "v1 is now active" in page.inner_text("main")
    assert client.http.get("/v1/tasks/sentiment").json()["active_version"]["version"] == 1
    page.fill("#predict-text", "a great fun film\nawful and boring")
    page.click("#predict-submit")
    page.wait_for_selector("#predict-results svg.bars")
    assert "answered by v1" in page.inner_text("#predict-results")
    assert page.locator("#predict-results .prediction").count() == 2
    bars = page.locator("#predict-results .prediction").first.locator("g.bar")
    scores = [float(bars.nth(i).get_attribute("data-score")) for i in range(bars.count())]
    assert len(scores) == 2 and abs(sum(scores) - 1) < 1e-3 and scores[0] >= scores[1]
    assert {bars.nth(i).get_attribute("data-label") for i in range(2)} == {"negative", "positive"}
    shot(page, "task")

    # Another tenant, in another browser, sees none of it.
    other = new_page()
    open_with_key(other, live_server.url, tenant_key("train", "predict").key, "#/jobs")
    other.wait_for_selector(".empty")
    assert "No jobs yet" in other.inner_text("main")
    other.click("nav >> text=Tasks")
    # The jobs page's empty state is still on screen until the tasks page renders: wait for the tasks one.
    other.wait_for_selector(".empty:has-text('No tasks yet')")
    assert "No tasks yet" in other.inner_text("main")
    other.goto(f"{live_server.url}/dashboard#/jobs/{job_id}")
    other.wait_for_selector(".problem")
    assert "No such job" in other.inner_text(".problem")
    other.goto(f"{live_server.url}/dashboard#/tasks/sentiment")
    other.wait_for_selector(".problem")
    assert "No such task" in other.inner_text(".problem") and "not found" in other.inner_text(".problem")
    other.click("nav >> text=New job")
    other.wait_for_selector("#train-file")
    assert other.locator("#train-existing").count() == 0  # the first tenant's datasets are not offered
    shot(other, "other-tenant")

    # A wrong key is refused in words; forgetting the key asks for one again.
    other.fill("#api-key", "spafit_bad_key")
    other.click("#key-form button[type=submit]")
    other.wait_for_selector("#auth-state[data-mode=bad]")
    assert "The service refused this key" in other.inner_text("main")
    other.click("#key-forget")
    other.wait_for_selector("#auth-state[data-mode=none]")


def test_cancel_a_running_job_from_its_page(page, live_server, api, tenant_key, shot):
    key = tenant_key("train")
    client = api(key.key)
    train = client.upload(toy_csv(400, 3), "long.csv")
    job = client.job(spafit_body(train, None, "long-run", epochs=20, batch_size=4))
    open_with_key(page, live_server.url, key.key, f"#/jobs/{job['id']}")
    wait_until(page, lambda: points(page, "#loss-chart") >= 3, timeout=90, what="three steps on the curve")
    assert badge(page) == "running"
    assert "s" in page.inner_text(".eta")  # an ETA while it runs
    page.click("#cancel-job")
    page.click("#confirm-cancel")
    page.wait_for_selector("h1 .badge[data-status=cancelled]", timeout=60_000)
    assert page.locator("#cancel-job").count() == 0
    assert "cancelled" in page.inner_text(".events-table")
    shot(page, "job-cancelled")
    done = client.http.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "cancelled" and done["adapter_version"] is None


def test_a_failed_job_shows_its_error_in_words(page, live_server, api, tenant_key, shot):
    key = tenant_key("train")
    client = api(key.key)
    train = client.upload(toy_csv(32, 5), "train.csv")
    # A label the training data lacks: checked when the job is created where both sets were checked as this job's
    # task type; this one was uploaded as multi-label, so only the worker, reading it as the job's, finds it.
    val = client.upload(b"text,label\ngood film,neutral\nbad film,negative\n" + b"fine,neutral\n" * 8, "odd.csv",
                        task_type="multi_label_classification")
    job = client.job(spafit_body(train, val, "will-fail", epochs=1))
    open_with_key(page, live_server.url, key.key, f"#/jobs/{job['id']}")
    page.wait_for_selector("#job-error", timeout=90_000)
    text = page.inner_text("#job-error")
    assert "The job failed" in text and "does not occur in the training data" in text and "invalid-dataset" in text
    assert badge(page) == "failed"
    shot(page, "job-failed")


def test_auth_off_in_embedded_mode_needs_no_key(page, embedded_server, shot):
    page.goto(f"{embedded_server.url}/dashboard")
    page.wait_for_selector("#auth-state[data-mode=off]")
    assert "Auth is off" in page.inner_text("#auth-state")
    page.wait_for_selector(".empty")
    assert "No jobs yet" in page.inner_text("main")
    page.click("nav >> text=New job")
    page.set_input_files("#train-file", {"name": "train.csv", "mimeType": "text/csv", "buffer": toy_csv(20, 2)})
    page.wait_for_selector("#train-report .report-ok")
    assert page.inner_text("#train-report .report-rows") == "20"
    shot(page, "embedded-auth-off")
