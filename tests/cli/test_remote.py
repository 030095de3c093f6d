"""Remote commands (`predict`, `jobs`, `tasks`) against the live service, with --json output and the exit
codes scripts rely on: 0 ok, 1 failed, 2 usage, 3 not found, 4 auth, 5 unreachable, 6 invalid, 7 timeout."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
import zipfile

import pytest

from tests.client.conftest import ROOT, free_port, subprocess_env

pytestmark = pytest.mark.slow


@pytest.fixture
def run(spafit, trained):
    """The CLI as the trained tenant (train + predict scopes)."""

    def invoke(*args, key=None, **kw):
        return spafit(*args, url=trained.url, key=key or trained.key.key, **kw)

    return invoke


def test_jobs_list_show_wait_and_events_as_json(run, trained):
    job_id = trained.job.id
    r = run("jobs", "list", "--json")
    assert r.exit_code == 0, r
    assert job_id in [j["id"] for j in r.json()]
    r = run("jobs", "list", "--status", "succeeded", "--task", "sentiment", "--limit", "0", "--json")
    # the filters hold; the session's trained tenant is shared, so other files may have run evaluations of its task
    assert all(j["status"] == "succeeded" and j["task"] == "sentiment" for j in r.json()), r.json()
    assert [j["id"] for j in r.json() if j["kind"] == "train"] == [job_id]
    r = run("jobs", "show", job_id, "--json")
    assert r.exit_code == 0 and r.json()["status"] == "succeeded" and r.json()["adapter_version"] == 1
    r = run("jobs", "wait", job_id, "--json")
    assert r.exit_code == 0 and r.json()["id"] == job_id
    r = run("jobs", "events", job_id, "--json")
    events = r.json()
    assert r.exit_code == 0 and [e["seq"] for e in events] == list(range(1, len(events) + 1))
    r = run("jobs", "events", job_id, "--follow", "--after", "2", "--json")
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.exit_code == 0 and [e["seq"] for e in lines] == [e["seq"] for e in events[2:]]
    assert lines[-1]["data"]["status"] == "succeeded"


def test_jobs_text_output_is_for_people(run, trained):
    r = run("jobs", "list")
    assert r.exit_code == 0 and r.stdout.split()[:5] == ["id", "task", "status", "progress", "created"]
    assert trained.job.id in r.stdout
    r = run("jobs", "show", trained.job.id)
    assert "status succeeded" in r.stdout and "adapter: sentiment v1" in r.stdout


def test_tasks_list_show_versions_export_import_activate(run, tmp_path):
    r = run("tasks", "list", "--json")
    assert r.exit_code == 0 and "sentiment" in [t["name"] for t in r.json()]
    r = run("tasks", "show", "sentiment", "--json")
    assert r.exit_code == 0 and r.json()["active_version"]["version"] == 1
    r = run("tasks", "versions", "sentiment", "--json")
    assert r.exit_code == 0 and [v["version"] for v in r.json()] == [1]
    r = run("tasks", "export", "sentiment", "--out", str(tmp_path), "--json")
    assert r.exit_code == 0, r
    path = r.json()["path"]
    assert path.endswith("sentiment-v1.zip") and zipfile.is_zipfile(path)
    for expected in (1, 2):
        r = run("tasks", "import", "cli-copy", path, "--json")
        assert r.exit_code == 0 and r.json()["version"] == expected and r.json()["active"], r
    r = run("tasks", "activate", "cli-copy", "1", "--json")
    assert r.exit_code == 0 and r.json()["active_version"]["version"] == 1
    r = run("tasks", "versions", "cli-copy")
    assert r.exit_code == 0 and r.stdout.split()[:2] == ["active", "version"]


def test_predict_texts_files_and_fan_out(run, tmp_path):
    r = run("predict", "sentiment", "good fun", "bad plot", "--json")
    assert r.exit_code == 0, r
    out = r.json()
    assert out["task"] == "sentiment" and out["version"] == 1 and len(out["predictions"]) == 2
    lines = tmp_path / "inputs.txt"
    lines.write_text("good fun\n\nbad plot\n")
    jsonl = tmp_path / "inputs.jsonl"
    jsonl.write_text('"good fun"\n{"text": "bad plot"}\n')
    by_lines = run("predict", "sentiment", "--file", str(lines), "--json").json()["predictions"]
    by_jsonl = run("predict", "sentiment", "--file", str(jsonl), "--json").json()["predictions"]
    by_stdin = run("predict", "sentiment", "--file", "-", "--json", input="good fun\nbad plot\n").json()["predictions"]
    assert [p["label"] for p in by_lines] == [p["label"] for p in by_jsonl] == [p["label"] for p in by_stdin] \
        == [p["label"] for p in out["predictions"]]
    many = [f"text number {i} good" for i in range(40)]  # more than one request's worth
    r = run("predict", "sentiment", *many, "--top-k", "1", "--json")
    assert r.exit_code == 0 and len(r.json()["predictions"]) == 40
    assert all(len(p["scores"]) == 1 for p in r.json()["predictions"])
    run("tasks", "import", "fan-b", run("tasks", "export", "sentiment", "--out", str(tmp_path / "b.zip"),
                                        "--json").json()["path"])
    r = run("predict", "--tasks", "sentiment,fan-b", "good fun", "bad plot", "--json")
    assert r.exit_code == 0, r
    results = r.json()["results"]
    assert [x["task"] for x in results] == ["sentiment", "fan-b"] and all(len(x["predictions"]) == 2 for x in results)
    r = run("predict", "--tasks", "sentiment,fan-b", "good fun")
    assert r.exit_code == 0 and r.stdout.split()[:3] == ["input", "sentiment", "fan-b"]


def test_not_found_exits_3(run):
    for args in (("jobs", "show", str(uuid.uuid4())), ("tasks", "show", "no-such-task"),
                 ("predict", "no-such-task", "x"), ("tasks", "export", "no-such-task")):
        r = run(*args, "--json")
        assert r.exit_code == 3, (args, r)
        assert r.error()["status"] == 404 and r.error()["type"].endswith("/not-found") and r.stdout == ""


def test_auth_errors_exit_4(run, make_key, trained):
    r = run("jobs", "list", "--json", key="spafit_not_a_key")
    assert r.exit_code == 4 and r.error()["status"] == 401, r
    reader = make_key("predict", tenant=trained.key.tenant_id)
    r = run("jobs", "cancel", trained.job.id, key=reader.key)
    assert r.exit_code == 4 and r.stderr.startswith("error: 403"), r


def test_invalid_requests_exit_6(run):
    r = run("predict", "sentiment", "   ", "--json")
    assert r.exit_code == 6 and r.error()["status"] == 422 and r.error()["errors"][0]["field"] == "body.inputs.0"
    r = run("tasks", "import", "bad-zip", str(ROOT / "pyproject.toml"))
    assert r.exit_code == 6, r
    r = run("predict", "--tasks", "sentiment,sentiment", "x")
    assert r.exit_code == 6, r


def test_unreachable_exits_5(spafit):
    r = spafit("jobs", "list", "--json", "--url", f"http://127.0.0.1:{free_port()}")
    assert r.exit_code == 5 and r.error()["kind"] == "APIConnectionError", r


def test_wait_timeout_exits_7_and_a_cancelled_job_exits_1(run, trained, worker):
    from tests.tiny import toy_csv

    with trained.client() as client:
        big = client.datasets.upload(toy_csv(400, 3), name="big")
        job = client.jobs.create(task="long", train_dataset=big, method={"name": "spafit", "n1": 1, "n2": 2},
                                 hyperparameters={"epochs": 20, "batch_size": 4})
    r = run("jobs", "wait", job.id, "--timeout", "1", "--no-progress", "--json")
    assert r.exit_code == 7 and r.error()["kind"] == "WaitTimeout", r
    r = run("jobs", "cancel", job.id, "--json")
    assert r.exit_code == 0 and r.json()["cancel_requested"], r
    r = run("jobs", "wait", job.id, "--timeout", "120", "--json")
    assert r.exit_code == 1, (r, worker.tail())
    assert r.json()["status"] == "cancelled" and r.error()["kind"] == "JobCancelled"
    r = run("jobs", "cancel", job.id)
    assert r.exit_code == 6 and "409" in r.stderr  # already cancelled: a conflict
    r = run("jobs", "delete", job.id, "--json")  # finished: it can go, and then its dataset
    assert r.exit_code == 0 and r.json() == {"deleted": job.id}, r
    assert run("jobs", "show", job.id).exit_code == 3
    with trained.client() as client:
        client.datasets.delete(big)


def test_the_installed_entry_point_exits_with_the_same_codes(trained):
    def spafit(*args):
        return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, cwd=ROOT,
                              env=subprocess_env(SPAFIT_URL=trained.url, SPAFIT_API_KEY=trained.key.key), timeout=120)

    ok = spafit("tasks", "show", "sentiment", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["name"] == "sentiment", ok.stderr
    missing = spafit("tasks", "show", "no-such-task", "--json")
    assert missing.returncode == 3 and json.loads(missing.stderr)["error"]["status"] == 404
    down = spafit("jobs", "list", "--url", f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 5 and down.stderr.startswith("error: could not reach")
