"""Job recipes through the real worker: per-kind learning rates from the job's hyperparameters, and a
validation split carved from the training data when the job gives none (so the best epoch is chosen)."""

from __future__ import annotations

import pytest

from tests.api.helpers import assert_problem, upload
from tests.tiny import toy_csv

from .test_jobs import wait_for

pytestmark = pytest.mark.slow


def test_a_job_without_validation_carves_one_and_reports_its_metrics(job_client, tenant_key, worker):
    key = tenant_key("train", "predict")
    train = upload(job_client, toy_csv(120, 7), "train.csv", headers=key.headers)
    assert train.status_code == 201, train.text
    body = {"task": "carved", "train_dataset": train.json()["id"],
            "method": {"name": "spafit", "n1": 1, "n2": 2, "rank": 4},
            "hyperparameters": {"epochs": 2, "batch_size": 8, "learning_rate": 5e-3, "head_learning_rate": 1e-2,
                                "bias_learning_rate": 2e-3, "lora_learning_rate": 1e-3, "validation_fraction": 0.2,
                                "seed": 1}}
    r = job_client.post("/v1/jobs", json=body, headers=key.headers)
    assert r.status_code == 202, r.text
    job = wait_for(job_client, r.json()["id"], key.headers, lambda j: j["status"] in ("succeeded", "failed"))
    assert job["status"] == "succeeded", (job, worker.tail())
    assert {"accuracy", "f1"} <= set(job["metrics"])
    assert job["progress"]["step"] == 2 * 12  # 96 training rows left after 24 held out, batches of 8
    events = job_client.get(f"/v1/jobs/{job['id']}/events", headers=key.headers).json()
    items = events["items"] if isinstance(events, dict) else events
    messages = [e["data"].get("message", "") for e in items if e["type"] == "log"]
    assert any("24 of 120 training rows held out" in m for m in messages), messages
    assert any(e["type"] == "eval" for e in items)


@pytest.mark.parametrize("field, value", [("head_learning_rate", 0.5), ("lora_learning_rate", 0),
                                          ("validation_fraction", 0.9), ("bias_learning_rate", "fast")])
def test_recipe_knobs_out_of_bounds_are_422_naming_the_field(job_client, tenant_key, field, value):
    key = tenant_key("train", "predict")
    train = upload(job_client, toy_csv(16, 1), "train.csv", headers=key.headers)
    body = {"task": "bounds", "train_dataset": train.json()["id"], "hyperparameters": {field: value}}
    problem = assert_problem(job_client.post("/v1/jobs", json=body, headers=key.headers), 422)
    assert field in str(problem), problem
