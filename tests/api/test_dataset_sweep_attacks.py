"""Hostile and careless dataset uploads and sweeps: every bad input is a 4xx problem naming what and where,
and one tenant's failure stays with it."""

from __future__ import annotations

import gzip
import json
import math
import time
import uuid

import pytest

from .helpers import SENTIMENT, assert_problem, csv_bytes, unique_csv, upload


@pytest.fixture
def trainer(tenant_key):
    return tenant_key("train")


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# ------------------------------------------------------------------------------------------ NUL escapes


@pytest.mark.parametrize("row, where", [
    ({"text": "fine", "label": "p\u0000s"}, "line 13"),      # a label: kept in label_counts (jsonb)
    ({"text": "fi\u0000ne", "label": "pos"}, "line 13"),     # a text
    ({"text": "fine", "la\u0000bel": "pos", "label": "pos"}, "column name 'la\\x00bel'"),  # kept in columns
])
def test_jsonl_nul_escape_is_422_naming_where_not_a_db_error(client, trainer, row, where):
    rows = [{"text": t, "label": lab} for t, lab in SENTIMENT] + [row]
    body = assert_problem(upload(client, _jsonl(rows), "x.jsonl", trainer.headers), 422, "invalid-dataset")
    assert where in body["detail"] and "NUL" in body["detail"], body


def test_utf16_without_bom_says_utf16_or_nul(client, trainer):
    body = assert_problem(upload(client, csv_bytes().decode().encode("utf-16-le"), "x.csv", trainer.headers),
                          422, "invalid-dataset")
    assert "NUL" in body["detail"] and "\x00" not in body["detail"]


# ------------------------------------------------------------------------------------------ shapes that hold


@pytest.mark.parametrize("filename, content, needle", [
    ("x.csv", b"text,label\n", "no data rows"),
    ("x.csv", b"", "empty"),
    ("x.csv", b"\xef\xbb\xbf", "empty"),
    ("x.csv", "text,label\nfine,pos\n".encode("utf-16"), "UTF-16"),
    ("x.csv", b"text,text\na,b\n", "duplicate column"),
    ("x.csv", b"text,label\r\na,pos\rb,neg\n", "carriage return"),
    ("x.csv", b"text,label\n\xed\xa0\x80,pos\n", "line 2"),
    ("x.jsonl", b'{"text": "\\ud800", "label": "pos"}\n', "surrogate"),
    ("x.jsonl", b'{"text": "a", "label": NaN}\n', "NaN"),
    ("x.jsonl", b'{"text": "a", "label": ' + b"[" * 50000 + b"]" * 50000 + b"}\n", "line 1"),
    ("x.jsonl", b'{"text": "a", "label": ' + b"9" * 5000 + b"}\n", "line 1"),
    ("x.csv", b"text,label\n" + b"a" * (9 << 20) + b",pos\n", "line 2"),
    ("x.bin", gzip.compress(csv_bytes()), "line 1"),
])
def test_unreadable_uploads_are_422_naming_the_problem(client, trainer, filename, content, needle):
    body = assert_problem(upload(client, content, filename, trainer.headers), 422, "invalid-dataset")
    assert needle in body["detail"], body


def test_regression_nan_and_inf_targets_are_422_naming_lines(client, trainer):
    rows = "".join(f"t{i},{i / 10}\n" for i in range(12))
    content = f"text,score\n{rows}bad,nan\nworse,inf\nworst,-1e400\n".encode()
    body = assert_problem(upload(client, content, "x.csv", trainer.headers, task_type="regression"), 422,
                          "invalid-dataset")
    lines = [e["line"] for e in body["errors"]] if "errors" in body else None
    assert "line 14" in body["detail"] and "line 15" in body["detail"], body
    assert lines is None or lines[:3] == [14, 15, 16]


def test_upload_just_over_the_limit_is_413_and_at_it_is_read(make_settings, tenant_key):
    from fastapi.testclient import TestClient

    from app.main import create_app

    content = unique_csv()
    with TestClient(create_app(make_settings(max_upload_bytes=len(content)))) as c:
        key = tenant_key("train")
        assert upload(c, content, "x.csv", key.headers).status_code == 201
        assert_problem(upload(c, content + b"x\n", "x.csv", key.headers), 413)


@pytest.mark.parametrize("content_type", ["text/csv", "application/octet-stream", "application/x-www-form-urlencoded",
                                          "multipart/mixed; boundary=x", ""])
def test_wrong_content_type_is_415(client, trainer, content_type):
    r = client.post("/v1/datasets", content=csv_bytes(), headers={**trainer.headers, "Content-Type": content_type})
    assert_problem(r, 415)


def test_truncated_multipart_is_400_and_stores_nothing(client, trainer):
    boundary = "XyZ"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.csv\"\r\n"
            "Content-Type: text/csv\r\n\r\n").encode() + csv_bytes()[:40]  # no closing boundary: cut mid-upload
    before = client.get("/v1/datasets", headers=trainer.headers).json()["items"]
    r = client.post("/v1/datasets", content=body,
                    headers={**trainer.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert 400 <= r.status_code < 500 and r.headers["content-type"].startswith("application/problem+json"), r.text
    assert client.get("/v1/datasets", headers=trainer.headers).json()["items"] == before


def test_another_tenants_dataset_is_404_everywhere(client, tenant_key):
    owner, thief = tenant_key("train"), tenant_key("train")
    ds = upload(client, unique_csv(), "x.csv", owner.headers).json()["id"]
    assert_problem(client.get(f"/v1/datasets/{ds}", headers=thief.headers), 404)
    assert_problem(client.delete(f"/v1/datasets/{ds}", headers=thief.headers), 404)
    mine = upload(client, unique_csv(), "y.csv", thief.headers).json()["id"]
    for body in ({"task": "t", "train_dataset": ds},
                 {"task": "t", "train_dataset": mine, "validation_dataset": ds},
                 {"task": "t", "train_dataset": mine, "validation_dataset": ds,
                  "method": {"name": "spafit", "sweep": {"n1": [0, 1], "n2": [2]}}}):
        assert_problem(client.post("/v1/jobs", json=body, headers=thief.headers), 404)
    assert client.get(f"/v1/datasets/{ds}", headers=owner.headers).status_code == 200


# ------------------------------------------------------------------------------------------ sweeps


def _sweep(client, key, sweep: dict) -> dict:
    from tests.worker.test_jobs import datasets, job_body

    train, val = datasets(client, key.headers, n=16)
    body = {**job_body(train, val, task="swept"), "method": {"name": "spafit", "rank": 2, "sweep": sweep}}
    r = client.post("/v1/jobs", json=body, headers=key.headers)
    assert r.status_code == 202, r.text
    return r.json()


def _finish_trials(db, sweep_id, results):
    """Mark the sweep's trials succeeded with the given (config, weights) as their adapters, as a worker does."""
    from sqlalchemy import select

    from app.models import Job
    from app.services import blobs
    from spafit_core.adapter import pack

    with db.session() as s:
        trials = list(s.scalars(select(Job).where(Job.parent_job_id == sweep_id).order_by(Job.created_at)))
        assert len(trials) == len(results)
        for trial, (cfg, weights) in zip(trials, results, strict=True):
            trial.status = "succeeded"  # the row's metrics are finite (the worker's job); the archive's may not be
            trial.metrics = {k: v for k, v in cfg["metrics"].items() if math.isfinite(v)}
            trial.result_sha256 = blobs.put(s, pack(cfg, weights))
        s.commit()
        return [t.id for t in trials]


def test_a_sweep_whose_best_adapter_the_registry_refuses_ends_instead_of_running_forever(held, tenant_key, db,
                                                                                        tiny_base):
    from app.services import sweeps
    from tests.api.adapters import random_adapter

    key = tenant_key("train")
    job = _sweep(held, key, {"n1": [1], "n2": [2, 3]})
    bad = random_adapter(tiny_base, labels=("neg", "p" * 300), seed=9)  # a label map no adapter may carry: best
    good = random_adapter(tiny_base, seed=1)
    trials = _finish_trials(db, uuid.UUID(job["id"]), [bad, good])
    sweeps.settle(db, uuid.UUID(job["id"]))  # once raised, leaving the sweep running, re-settled for ever
    done = held.get(f"/v1/jobs/{job['id']}", headers=key.headers).json()
    assert done["status"] == "succeeded", done  # the next best trial is registered
    events = held.get(f"/v1/jobs/{job['id']}/events", headers=key.headers).json()
    assert events[-1]["data"]["best_trial"] == str(trials[1])
    task = held.get("/v1/tasks/swept", headers=key.headers).json()
    assert task["active_version"]["version"] == 1


def test_a_best_trial_whose_weights_fail_registration_gives_way_to_the_next_best(held, tenant_key, db, tiny_base):
    from app.services import sweeps
    from tests.api.adapters import random_adapter

    key = tenant_key("train")
    job = _sweep(held, key, {"n1": [1], "n2": [2, 3]})
    cfg, weights = random_adapter(tiny_base, seed=9)  # the best metric, but bytes that no longer match their sha256
    tampered = (cfg, weights[:-1] + bytes([weights[-1] ^ 1]))
    trials = _finish_trials(db, uuid.UUID(job["id"]), [tampered, random_adapter(tiny_base, seed=1)])
    sweeps.settle(db, uuid.UUID(job["id"]))
    done = held.get(f"/v1/jobs/{job['id']}", headers=key.headers).json()
    assert done["status"] == "succeeded", done
    result = held.get(f"/v1/jobs/{job['id']}/events", headers=key.headers).json()[-1]["data"]
    assert result["best_trial"] == str(trials[1])
    refused = [b for b in result["leaderboard"] if b["trial_job"] == str(trials[0])]
    assert refused[0]["eligible"] is False and "sha256" in refused[0]["error"]


def test_a_sweep_none_of_whose_adapters_registers_fails_with_the_reason(held, tenant_key, db, tiny_base):
    from app.services import sweeps
    from tests.api.adapters import random_adapter

    key = tenant_key("train")
    job = _sweep(held, key, {"n1": [1], "n2": [2, 3]})
    bad = random_adapter(tiny_base, labels=("neg", "p" * 300), seed=9)
    _finish_trials(db, uuid.UUID(job["id"]), [bad, bad])
    sweeps.settle(db, uuid.UUID(job["id"]))
    assert sweeps.unsettled(db) == [] or uuid.UUID(job["id"]) not in sweeps.unsettled(db)
    done = held.get(f"/v1/jobs/{job['id']}", headers=key.headers).json()
    assert done["status"] == "failed" and done["error"]["type"] == "sweep-failed", done
    assert "could be" in done["error"]["message"] and "labels" in done["error"]["message"], done
    assert_problem(held.get("/v1/tasks/swept", headers=key.headers), 404)


def test_a_trial_with_a_nan_metric_never_wins_nor_stalls_the_sweep(held, tenant_key, db, tiny_base):
    from app.services import sweeps
    from tests.api.adapters import random_adapter

    key = tenant_key("train")
    job = _sweep(held, key, {"n1": [1], "n2": [2, 3, 4]})
    nan, inf = random_adapter(tiny_base, seed=5), random_adapter(tiny_base, seed=6)
    nan[0]["metrics"], inf[0]["metrics"] = {"accuracy": float("nan")}, {"accuracy": float("inf")}
    finite = random_adapter(tiny_base, seed=1)
    trials = _finish_trials(db, uuid.UUID(job["id"]), [nan, inf, finite])
    sweeps.settle(db, uuid.UUID(job["id"]))
    done = held.get(f"/v1/jobs/{job['id']}", headers=key.headers).json()
    assert done["status"] == "succeeded", done
    events = held.get(f"/v1/jobs/{job['id']}/events", headers=key.headers).json()
    assert events[-1]["data"]["best_trial"] == str(trials[2])
    assert len([e for e in events if e["type"] == "trial"]) == 3


@pytest.mark.parametrize("sweep, field", [
    ({"n1": ["a"], "n2": [2]}, "method.sweep.n1.0"),
    ({"n1": [1], "n2": [None]}, "method.sweep.n2.0"),
    ({"n1": [1], "n2": [float("nan")]}, None),  # not JSON: refused as a body that cannot be read
    ({"n1": [1], "n2": [2], "rank": [2.5]}, "method.sweep.rank.0"),
    ({"n1": [1], "n2": [2], "max_trials": 65}, "method.sweep.max_trials"),
    ({"n1": list(range(13)), "n2": [2]}, "method.sweep.n1"),
    ({"n1": [2**63], "n2": [2**64]}, "method.sweep"),  # no layer of any model: no valid trial
    ({"n1": [0, 1, 2], "n2": [2, 3], "max_trials": 2}, "method.sweep.max_trials"),
    ({"n1": [0, 1], "n2": [2, 3], "rank": [1, 2]}, "method.sweep"),  # 8 trials > this tenant's 4 jobs, ever
])
def test_bad_sweep_grids_are_422_naming_the_field(held, tenant_key, sweep, field):
    from tests.worker.test_jobs import datasets, job_body

    key = tenant_key("train")
    train, val = datasets(held, key.headers, n=16)
    body = {**job_body(train, val, task="swept"), "method": {"name": "spafit", "rank": 2, "sweep": sweep}}
    if field is None:
        r = held.post("/v1/jobs", content=json.dumps(body).encode(),
                      headers={**key.headers, "Content-Type": "application/json"})
        assert 400 <= r.status_code < 500 and r.headers["content-type"].startswith("application/problem+json")
        return
    problem = assert_problem(held.post("/v1/jobs", json=body, headers=key.headers), 422)
    names = [problem.get("field"), *(e.get("field") for e in problem.get("errors") or [])]
    assert any(n is not None and (n == field or n.startswith(field + ".")) for n in names), problem
    assert held.app.state.sent == []  # no trial was queued


def test_duplicate_grid_values_make_one_trial_each_and_count_once(held, tenant_key):
    key = tenant_key("train")
    job = _sweep(held, key, {"n1": [1, 1, 1.0], "n2": [2, 2, 3, 3], "rank": [2, 2]})
    assert job["progress"]["total_steps"] == 2 and len(held.app.state.sent) == 2
    # 2 of the tenant's 4 active jobs: a second such sweep fits, a third does not
    _sweep(held, key, {"n1": [1], "n2": [2, 3]})
    from tests.worker.test_jobs import datasets, job_body

    train, val = datasets(held, key.headers, n=16)
    assert_problem(held.post("/v1/jobs", json=job_body(train, val, task="one-more"), headers=key.headers), 429)


def test_cancelling_a_sweep_whose_trials_are_queued_ends_it_and_frees_the_tenants_slots(held, tenant_key):
    key = tenant_key("train")
    job = _sweep(held, key, {"n1": [1], "n2": [2, 3, 4]})
    r = held.post(f"/v1/jobs/{job['id']}/cancel", headers=key.headers)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    again = _sweep(held, key, {"n1": [1], "n2": [2, 3, 4]})  # the 3 cancelled trials hold no slot
    assert again["status"] == "running"
    assert_problem(held.post(f"/v1/jobs/{job['id']}/cancel", headers=key.headers), 409)
    r = held.delete(f"/v1/jobs/{job['id']}", headers=key.headers)
    assert r.status_code == 204, r.text


def test_a_dataset_a_queued_sweep_needs_cannot_be_deleted(held, tenant_key):
    key = tenant_key("train")
    job = _sweep(held, key, {"n1": [1], "n2": [2, 3]})
    for ds in (job["train_dataset"], job["validation_dataset"]):
        assert_problem(held.delete(f"/v1/datasets/{ds}", headers=key.headers), 409)


# ------------------------------------------------------------------------------------------ form fields


def test_a_nul_in_an_upload_field_is_422_naming_the_field(client, trainer):
    problem = assert_problem(upload(client, unique_csv(), "x.csv", trainer.headers, name="n\x00m"), 422)
    assert problem["field"] == "body.name" or any(e["field"] == "body.name" for e in problem["errors"]), problem


@pytest.mark.parametrize("body, field", [
    ({"hf": {"name": "imdb"}, "name": "n\u0000m"}, "body.name"),
    ({"hf": {"name": "imdb"}, "label_field": "la\u0000bel"}, "body.label_field"),
    ({"hf": {"name": "imdb"}, "text_fields": ["text", "t\u0000"]}, "body.text_fields.1"),
])
def test_a_nul_in_an_import_body_is_422_naming_the_field_and_records_nothing(client, trainer, body, field):
    r = client.post("/v1/datasets", json=body, headers=trainer.headers)
    problem = assert_problem(r, 422)
    assert any(e["field"] == field for e in problem["errors"]), problem
    assert client.get("/v1/datasets", headers=trainer.headers).json()["items"] == []


@pytest.mark.parametrize("fields", [
    {"text_fields": "label", "label_field": "label"},  # the answer in the input
    {"text_fields": "text,label"},
    {"text_fields": '["text", "text"]'},  # a text pair of one column
])
def test_text_fields_that_are_the_label_or_repeat_are_422(client, trainer, fields):
    body = assert_problem(upload(client, unique_csv(), "x.csv", trainer.headers, **fields), 422, "invalid-dataset")
    assert "text" in body["detail"], body


def test_grid_values_past_any_models_depth_make_no_trial_even_when_the_depth_is_unknown():
    from app.services import sweeps
    from spafit_core.errors import ConfigError

    method = {"name": "spafit", "rank": 2}
    for depth in (None, 12):
        with pytest.raises(ConfigError) as e:
            sweeps.grid(method, {"n1": [2**63, -(2**40)], "n2": [2**64, 1025], "max_trials": 64}, depth)
        assert e.value.field == "method.sweep"
        trials = sweeps.grid(method, {"n1": [1, 2**63], "n2": [2, 1025], "max_trials": 64}, depth)
        assert [(t["n1"], t["n2"]) for t in trials] == [(1, 2)]


def test_concurrent_uploads_and_deletes_of_the_same_bytes_never_500_nor_lose_a_blob(client, trainer, db):
    from concurrent.futures import ThreadPoolExecutor

    from app.services import blobs

    content = unique_csv()
    first = upload(client, content, "x.csv", trainer.headers).json()

    def up(i):  # a tenant's uploads are read one at a time: a 429 is tried again (the race is with the delete)
        while (r := upload(client, content, f"x{i}.csv", trainer.headers)).status_code == 429:
            time.sleep(0.01)
        return r

    with ThreadPoolExecutor(6) as pool:
        gone = pool.submit(client.delete, f"/v1/datasets/{first['id']}", headers=trainer.headers)
        results = list(pool.map(up, range(10)))
    assert gone.result().status_code == 204
    assert [r.status_code for r in results] == [201] * 10, [r.text for r in results if r.status_code != 201]
    with db.session() as s:
        assert blobs.get(s, first["sha256"]) == content  # every surviving dataset still has its bytes
    for r in results:
        assert client.get(f"/v1/datasets/{r.json()['id']}", headers=trainer.headers).json()["state"] == "ready"


# ------------------------------------------------------------------------------------------ the CLI


@pytest.mark.parametrize("args, hint", [
    (["trian.csv", "--validation", "{val}"], "TRAIN"),  # a typo: once sent as a dataset id
    (["{train}", "--validation", "vall.csv"], "--validation"),
    (["{dir}", "--validation", "{val}"], "TRAIN"),
])
def test_sweep_cli_names_a_missing_file_before_uploading_anything(tmp_path, args, hint):
    from click.testing import CliRunner

    from app.cli import main

    (tmp_path / "train.csv").write_bytes(csv_bytes())
    (tmp_path / "val.csv").write_bytes(csv_bytes())
    args = [a.format(train=tmp_path / "train.csv", val=tmp_path / "val.csv", dir=tmp_path) for a in args]
    # nothing listens on this port: the command must stop before it talks to a service
    r = CliRunner().invoke(main, ["sweep", *args, "--task", "t", "--n1", "0,1", "--url", "http://127.0.0.1:9"])
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert "neither a file nor a dataset id" in r.output and hint in r.output, r.output


# ------------------------------------------------------------------------------------------ imports


def test_an_imported_parquet_with_nan_and_inf_is_readable_by_the_jobs_that_use_it(db, trainer, make_settings,
                                                                                  tmp_path):
    """A parquet float column holds NaN for a missing value; stored as JSON Lines that was `NaN`, which the job's
    reader refuses: a `ready` dataset every job on it failed to read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from app.schemas import HfDatasetCreate
    from app.services import datasets as service
    from spafit_core import data as core_data

    settings = make_settings(mode="embedded", auth_enabled=False)
    path = tmp_path / "with-gaps.parquet"
    stars = [i / 2 for i in range(len(SENTIMENT))]
    stars[3], stars[5] = float("nan"), float("inf")
    pq.write_table(pa.table({"text": [t for t, _ in SENTIMENT], "label": [lab for _, lab in SENTIMENT],
                             "stars": stars, "tags": [[1.0, float("nan")]] * len(SENTIMENT)}), path)
    with db.session() as s:
        dataset_id = service.start_import(s, trainer.tenant_id, HfDatasetCreate.model_validate(
            {"hf": {"name": str(path)}, "text_fields": ["text"], "label_field": "label"}), settings).id
    assert service.run_import(db, dataset_id, settings) == "ready"
    with db.session() as s:
        ds, content = service.content(s, trainer.tenant_id, dataset_id)
    table = core_data.read_table(content, ds.format)  # what a worker does with it
    assert len(table) == len(SENTIMENT)
    assert [table.records[i]["stars"] for i in (2, 3, 4, 5)] == [1.0, None, 2.0, None]
    assert table.records[0]["tags"] == [1.0, None]


def test_an_imported_regression_target_that_is_nan_fails_the_import_naming_the_row(db, trainer, make_settings,
                                                                                   tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from app.models import Dataset
    from app.schemas import HfDatasetCreate
    from app.services import datasets as service

    settings = make_settings(mode="embedded", auth_enabled=False)
    path = tmp_path / "nan-target.parquet"
    scores = [i / 3 for i in range(12)]
    scores[6] = float("nan")
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(12)], "score": scores}), path)
    with db.session() as s:
        dataset_id = service.start_import(s, trainer.tenant_id, HfDatasetCreate.model_validate(
            {"hf": {"name": str(path)}, "task_type": "regression"}), settings).id
    assert service.run_import(db, dataset_id, settings) == "failed"
    with db.session() as s:
        ds = s.get(Dataset, dataset_id)
        assert ds.error_type == "invalid-dataset" and "row 7" in ds.error_message, ds.error_message


# ------------------------------------------------------------------------------------------ sweeps, with a worker


@pytest.mark.parametrize("sweep", [None, {"n1": [1], "n2": [2, 3]}])
def test_validation_labels_the_training_data_lacks_are_422_not_a_failed_job(client, tenant_key, sweep):
    """A validation set with a label the training set lacks failed every trial in the worker (a sweep ended failed
    after its trials had queued and loaded; a job after loading): jobs.create now refuses it, naming
    validation_dataset and the label."""
    from tests.tiny import toy_csv

    key = tenant_key("train")
    train = upload(client, toy_csv(16, 1), "train.csv", key.headers).json()["id"]
    val = upload(client, toy_csv(16, 2, labels=("negative", "surprise")), "val.csv", key.headers).json()["id"]
    method = {"name": "spafit", "rank": 2, **({"sweep": sweep} if sweep else {})}
    r = client.post("/v1/jobs", json={"task": "unseen", "train_dataset": train, "validation_dataset": val,
                                      "method": method}, headers=key.headers)
    body = assert_problem(r, 422)
    assert body["field"] == "validation_dataset" and "surprise" in body["detail"], body
    assert client.get("/v1/jobs", headers=key.headers).json()["items"] == []
    ok = upload(client, toy_csv(16, 3), "val2.csv", key.headers).json()["id"]  # the same labels: accepted
    r = client.post("/v1/jobs", json={"task": "unseen", "train_dataset": train, "validation_dataset": ok,
                                      "method": method}, headers=key.headers)
    assert r.status_code == 202, r.text
    _cancel(client, r.json()["id"], key.headers)


def _cancel(client, job_id: str, headers: dict) -> None:
    """Cancel a job these tests only needed accepted: the session's worker (which other files' jobs wait for) has
    no need to train it (a clean-clone CI run's dashboard test timed out behind such a job)."""
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).status_code == 200


def test_a_classifier_of_more_classes_than_an_adapter_holds_is_422_and_as_regression_accepted(client, tenant_key):
    """Numbers past MAX_LABELS distinct values upload with a warning (perhaps scores); a classification job on
    them would fail once trained (the registry refuses the adapter): 422 naming train_dataset. As regression it
    is accepted."""
    from spafit_core.adapter_schema import MAX_LABELS

    key = tenant_key("train")
    content = b"text,score\n" + b"".join(b"row %d,%d\n" % (i, i) for i in range(MAX_LABELS + 1))
    ds = upload(client, content, "scores.csv", key.headers)
    assert ds.status_code == 201, ds.text
    assert ("too_many_labels", "warning") in [(p["code"], p["severity"]) for p in ds.json()["report"]["problems"]]
    r = client.post("/v1/jobs", json={"task": "many", "train_dataset": ds.json()["id"]}, headers=key.headers)
    body = assert_problem(r, 422)
    assert body["field"] == "train_dataset" and str(MAX_LABELS) in body["detail"], body
    r = client.post("/v1/jobs", json={"task": "many", "train_dataset": ds.json()["id"], "task_type": "regression",
                                      "hyperparameters": {"epochs": 1, "batch_size": 64}}, headers=key.headers)
    assert r.status_code == 202, r.text
    _cancel(client, r.json()["id"], key.headers)


@pytest.mark.slow
def test_a_client_that_disconnects_mid_upload_leaves_nothing_and_no_server_error(live_server, make_key):
    import socket
    import time

    import httpx

    key = make_key("train")
    seen = len(live_server.log_path.read_bytes())  # the server is the session's: only this test's lines count
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.csv\"\r\n"
            "Content-Type: text/csv\r\n\r\n").encode() + b"text,label\n" + b"some text,pos\n" * 2000
    host, port = live_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall((f"POST /v1/datasets HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key.key}\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                      f"Content-Length: {len(head) + 500_000}\r\n\r\n").encode() + head)
        time.sleep(0.5)  # the server is reading the body; then the client goes away
    time.sleep(1.0)
    headers = {"Authorization": f"Bearer {key.key}"}
    assert httpx.get(live_server.url + "/v1/datasets", headers=headers).json()["items"] == []
    r = httpx.post(live_server.url + "/v1/datasets", files={"file": ("x.csv", unique_csv())}, headers=headers)
    assert r.status_code == 201, r.text
    log = live_server.log_path.read_bytes()[seen:].decode(errors="replace")
    assert "Traceback" not in log and 'HTTP/1.1" 500' not in log, log[-3000:]  # a 4xx of its own, not a 500
