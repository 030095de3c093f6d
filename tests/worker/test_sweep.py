"""Stratification sweeps over HTTP: trials are jobs on the training queue; the best one is registered."""

from __future__ import annotations

import pytest

from tests.api.helpers import assert_problem
from tests.worker.test_jobs import datasets, final, wait_for

pytestmark = pytest.mark.slow


def sweep_body(train, val, task, sweep, **hp):
    return {"task": task, "train_dataset": train, "validation_dataset": val,
            "method": {"name": "spafit", "rank": 2, "sweep": sweep},
            "hyperparameters": {"epochs": 2, "batch_size": 8, "learning_rate": 5e-3, "seed": 1, **hp}}


def test_sweep_trains_every_trial_and_registers_the_best(job_client, tenant_key, worker):
    key = tenant_key("train")
    train, val = datasets(job_client, key.headers, n=48)
    r = job_client.post("/v1/jobs", json=sweep_body(train, val, "swept", {"n1": [0, 1], "n2": [2, 3]}),
                        headers=key.headers)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "sweep" and job["status"] == "running"
    assert job["progress"] == {"step": 0, "total_steps": 4, "epoch": None, "eta_seconds": None}
    done = wait_for(job_client, job["id"], key.headers, final, timeout=300)
    assert done["status"] == "succeeded", (done, worker.tail())
    assert done["adapter_version"] == 1 and done["progress"]["step"] == 4

    events = job_client.get(f"/v1/jobs/{job['id']}/events", headers=key.headers).json()
    trials = [e["data"] for e in events if e["type"] == "trial"]
    assert sorted((t["n1"], t["n2"]) for t in trials) == [(0, 2), (0, 3), (1, 2), (1, 3)]
    assert all(t["status"] == "succeeded" and "accuracy" in t["metrics"] and t["trainable_params"] > 0
               for t in trials)
    result = events[-1]["data"]
    board = result["leaderboard"]
    best_value = max(b["value"] for b in board)
    assert result["value"] == best_value
    winners = [b for b in board if b["value"] == best_value]
    fewest = min(b["trainable_params"] for b in winners)  # ties go to the smaller adapter
    assert (result["best"]["n1"], result["best"]["n2"]) in {(b["n1"], b["n2"]) for b in winners
                                                            if b["trainable_params"] == fewest}
    # Exactly one version, with the winning stratification; trials are not listed as jobs of their own.
    task = job_client.get("/v1/tasks/swept", headers=key.headers).json()
    assert task["active_version"]["method"]["n1"] == result["best"]["n1"]
    assert task["active_version"]["method"]["n2"] == result["best"]["n2"]
    listed = job_client.get("/v1/jobs", params={"task": "swept"}, headers=key.headers).json()["items"]
    assert [j["id"] for j in listed] == [job["id"]]


def test_sweep_under_an_impossible_budget_fails_with_a_reason(job_client, tenant_key, worker):
    key = tenant_key("train")
    train, val = datasets(job_client, key.headers, n=16)
    body = sweep_body(train, val, "budget", {"n1": [1], "n2": [2, 3], "max_trainable_params": 10}, epochs=1)
    job = job_client.post("/v1/jobs", json=body, headers=key.headers).json()
    done = wait_for(job_client, job["id"], key.headers, final, timeout=300)
    assert done["status"] == "failed" and done["error"]["type"] == "sweep-failed"
    assert "budget of 10" in done["error"]["message"]
    assert_problem(job_client.get("/v1/tasks/budget", headers=key.headers), 404)


def test_sweep_with_no_valid_combination_is_422(job_client, tenant_key):
    key = tenant_key("train")
    train, val = datasets(job_client, key.headers, n=16)
    r = job_client.post("/v1/jobs", json=sweep_body(train, val, "bad", {"n1": [3], "n2": [1]}), headers=key.headers)
    assert assert_problem(r, 422)["field"] == "method.sweep"
