"""POST /v1/tasks/{task}/predict and POST /v1/predict over HTTP, on a tiny random BERT served by the real
engine, with versions registered in the real Postgres registry."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from .adapters import (
    BITFIT,
    LORA,
    SPAFIT,
    TEXTS,
    assert_same_predictions,
    direct,
    random_adapter,
    register,
    serve,
    settings_factory,
    tiny_backbone,
)
from .helpers import assert_problem


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def zoo(base):
    """Adapters of different methods, heads and label maps on the one backbone."""
    return {"sentiment": random_adapter(base, SPAFIT, seed=1),
            "topic": random_adapter(base, LORA, labels=("sport", "art", "food"), seed=2),
            "spam": random_adapter(base, BITFIT, labels=("ham", "spam"), seed=3),
            "sentiment-v2": random_adapter(base, SPAFIT, seed=4)}


@pytest.fixture(scope="module")
def make(pg_url, redis_client, redis_url, redis_prefix, tmp_path_factory):
    with settings_factory(pg_url, redis_url, redis_prefix, tmp_path_factory.mktemp("data")) as make:
        yield make


@pytest.fixture(scope="module")
def api(make, base):
    """One app for the module: the backbone preloads once; a 20 ms batching window lets concurrent
    requests share forward passes."""
    with serve(make(default_base_model=base, engine_device="cpu", preload_base_model=True,
                    batch_max_wait_ms=20)) as client:
        yield client


@pytest.fixture
def tenant(tenant_key, db, zoo):
    """A tenant with the tasks sentiment, topic and spam registered (one version each), and a predict key."""
    key = tenant_key("predict")
    key.versions = {name: register(db, key.tenant_id, name, *zoo[name]).id for name in ("sentiment", "topic", "spam")}
    return key


def predict(client, task, inputs, headers, **extra):
    return client.post(f"/v1/tasks/{task}/predict", json={"inputs": inputs, **extra}, headers=headers)


def test_predict_over_http_equals_the_engines_own_output(api, tenant):
    r = predict(api, "sentiment", TEXTS, tenant.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["task"], body["version"]) == ("sentiment", 1)
    assert_same_predictions(body["predictions"], direct(api, tenant.versions["sentiment"], TEXTS))
    assert {s["label"] for s in body["predictions"][0]["scores"]} == {"neg", "pos"}


def test_top_k_keeps_the_best_scores(api, tenant):
    r = predict(api, "topic", TEXTS[:2], tenant.headers, top_k=2)
    assert r.status_code == 200, r.text
    want = direct(api, tenant.versions["topic"], TEXTS[:2], top_k=2)
    assert [len(p["scores"]) for p in r.json()["predictions"]] == [2, 2]
    assert_same_predictions(r.json()["predictions"], want)


def test_text_pairs_are_predicted_as_pairs(api, tenant):
    inputs = [{"text": "good movie", "text_pair": "the plot was fun"}, {"text": "bad", "text_pair": "awful"}]
    r = predict(api, "sentiment", inputs, tenant.headers)
    assert r.status_code == 200, r.text
    assert_same_predictions(r.json()["predictions"], direct(api, tenant.versions["sentiment"], inputs))


def test_two_tasks_mixed_in_batches_under_concurrent_requests(api, tenant, monkeypatch):
    engine = api.serving.engine
    batches: list[set[str]] = []
    forward = engine.forward

    def recording_forward(rows):
        batches.append({r.adapter.name for r in rows})
        return forward(rows)

    monkeypatch.setattr(engine, "forward", recording_forward)
    want = {name: direct(api, tenant.versions[name], TEXTS) for name in ("sentiment", "topic")}
    jobs = [("sentiment" if i % 2 else "topic", TEXTS[i % len(TEXTS):] or TEXTS) for i in range(16)]
    barrier = threading.Barrier(len(jobs))

    def call(job):
        task, texts = job
        barrier.wait()
        return task, texts, predict(api, task, texts, tenant.headers)

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(call, jobs))
    for task, texts, r in results:
        assert r.status_code == 200, r.text
        assert r.json()["task"] == task
        assert_same_predictions(r.json()["predictions"], want[task][len(TEXTS) - len(texts):])
    mixed = {str(tenant.versions["sentiment"]), str(tenant.versions["topic"])}
    assert any(mixed <= names for names in batches), batches  # one forward pass served both tasks


def test_fan_out_equals_separate_predicts(api, tenant):
    tasks = ["spam", "sentiment", "topic"]
    inputs = TEXTS[:3] + [{"text": "good", "text_pair": "fun plot"}]
    r = api.post("/v1/predict", json={"tasks": tasks, "inputs": inputs}, headers=tenant.headers)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [(x["task"], x["version"]) for x in results] == [(t, 1) for t in tasks]
    for task, result in zip(tasks, results, strict=True):
        separate = [predict(api, task, [x], tenant.headers).json()["predictions"][0] for x in inputs]
        assert_same_predictions(result["predictions"], separate)


def test_fan_out_runs_the_inputs_of_a_request_in_one_forward(api, tenant, monkeypatch):
    engine = api.serving.engine
    calls = []
    fan_out_many = engine.fan_out_many
    monkeypatch.setattr(engine, "fan_out_many", lambda names, inputs, top_k=None:
                        calls.append((len(names), len(inputs))) or fan_out_many(names, inputs, top_k))
    r = api.post("/v1/predict", json={"tasks": ["spam", "sentiment", "topic"], "inputs": TEXTS[:2]},
                 headers=tenant.headers)
    assert r.status_code == 200, r.text
    assert calls == [(3, 2)]  # one pass: the prefix once per input, then 6 rows


@pytest.mark.parametrize("body, field", [
    ({"inputs": []}, "body.inputs"),
    ({"inputs": ["x"] * 65}, "body.inputs"),
    ({"inputs": ["good", "fine", ""]}, "body.inputs.2"),
    ({"inputs": ["good", "   "]}, "body.inputs.1"),
    ({"inputs": ["good", "x" * 20001]}, "body.inputs.1"),
    ({"inputs": [{"text": "good", "text_pair": ""}]}, "body.inputs.0.text_pair"),
    ({"inputs": ["good", {"text": "a", "text_pair": "b"}]}, "body.inputs"),
    ({"inputs": ["good"], "top_k": 0}, "body.top_k"),
    ({"inputs": "good"}, "body.inputs"),
    ({"inputs": ["good"], "extra": 1}, "body.extra"),
    ({"inputs": ["good", "bad \ud800 half"]}, "body.inputs.1"),  # a lone surrogate: JSON lets it through
    ({"inputs": [{"text": "a", "text_pair": "\udfff"}]}, "body.inputs.0.text_pair"),
])
def test_bad_predict_input_is_422_naming_its_location(api, tenant, body, field):
    r = api.post("/v1/tasks/sentiment/predict", content=json.dumps(body),  # ASCII escapes, as a client sends \ud800
                 headers={**tenant.headers, "Content-Type": "application/json"})
    problem = assert_problem(r, 422, "validation-error")
    assert field in [e["field"] for e in problem["errors"]], problem


@pytest.mark.parametrize("body, field", [
    ({"tasks": [], "inputs": ["good"]}, "body.tasks"),
    ({"tasks": ["sentiment", "sentiment"], "inputs": ["good"]}, "body.tasks.1"),
    ({"tasks": ["Bad Name"], "inputs": ["good"]}, "body.tasks.0"),
    ({"tasks": [f"t{i}" for i in range(33)], "inputs": ["good"]}, "body.tasks"),
    ({"tasks": ["sentiment"], "inputs": []}, "body.inputs"),
    ({"tasks": ["sentiment"], "inputs": ["ok", ""]}, "body.inputs.1"),
    ({"tasks": ["sentiment"], "inputs": ["ok", "\ud800"]}, "body.inputs.1"),
])
def test_bad_fan_out_input_is_422_naming_its_location(api, tenant, body, field):
    problem = assert_problem(api.post("/v1/predict", content=json.dumps(body),
                                      headers={**tenant.headers, "Content-Type": "application/json"}),
                             422, "validation-error")
    assert field in [e["field"] for e in problem["errors"]], problem


def test_predict_unknown_task_is_404(api, tenant):
    assert "'nope'" in assert_problem(predict(api, "nope", ["good"], tenant.headers), 404, "not-found")["detail"]
    r = api.post("/v1/predict", json={"tasks": ["sentiment", "nope"], "inputs": ["good"]}, headers=tenant.headers)
    assert_problem(r, 404, "not-found")


@pytest.mark.parametrize("name", ["Sentiment", "a.b", "-x", "x" * 65, "%2e%2e", "sp ace"])
def test_predict_bad_task_name_is_422(api, tenant, name):
    problem = assert_problem(predict(api, name, ["good"], tenant.headers), 422, "validation-error")
    assert [e["field"] for e in problem["errors"]] == ["path.task"]


def test_predict_task_without_an_active_version_is_409(api, tenant, db, zoo):
    register(db, tenant.tenant_id, "draft", *zoo["sentiment-v2"], activate=False)
    assert_problem(predict(api, "draft", ["good"], tenant.headers), 409, "conflict")
    r = api.post("/v1/predict", json={"tasks": ["sentiment", "draft"], "inputs": ["good"]}, headers=tenant.headers)
    assert_problem(r, 409, "conflict")


def test_another_tenants_task_is_404(api, tenant, tenant_key):
    other = tenant_key("predict")
    assert_problem(predict(api, "sentiment", ["good"], other.headers), 404, "not-found")
    r = api.post("/v1/predict", json={"tasks": ["sentiment"], "inputs": ["good"]}, headers=other.headers)
    assert_problem(r, 404, "not-found")


def test_predict_needs_the_predict_scope(api, tenant, tenant_key):
    trainer = tenant_key("train", tenant=tenant.tenant_id)
    assert_problem(predict(api, "sentiment", ["good"], trainer.headers), 403, "forbidden")
    r = api.post("/v1/predict", json={"tasks": ["sentiment"], "inputs": ["good"]}, headers=trainer.headers)
    assert_problem(r, 403, "forbidden")
    assert_problem(predict(api, "sentiment", ["good"], {}), 401, "unauthorized")


def test_a_request_larger_than_the_whole_queue_runs_alone_instead_of_a_503_no_retry_cures(make, base, tenant):
    """A full queue's 503 + Retry-After under real load: tests/reliability/test_load.py."""
    with serve(make(default_base_model=base, engine_device="cpu", batch_max_queue=1)) as client:
        r = predict(client, "sentiment", ["good", "bad"], tenant.headers)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 2, r.text
        # A fan-out (it runs beside the batcher's queue) larger than the tenant's share is charged one share, never
        # more than the whole queue: with nothing in flight it runs alone rather than get a 503 no retry cures.
        r = client.post("/v1/predict", json={"tasks": ["sentiment", "topic"], "inputs": ["good"]},
                        headers=tenant.headers)
        assert r.status_code == 200 and [t["task"] for t in r.json()["results"]] == ["sentiment", "topic"]
        assert predict(client, "sentiment", ["good"], tenant.headers).status_code == 200  # one row fits
        assert 'outcome="overloaded"} 1' not in _metrics_text(client)


def test_timeout_is_504(make, base, tenant):
    with serve(make(default_base_model=base, engine_device="cpu", predict_timeout_s=1e-6)) as client:
        assert_problem(predict(client, "sentiment", ["good"], tenant.headers), 504, "request-timeout")
        r = client.post("/v1/predict", json={"tasks": ["sentiment"], "inputs": ["good"]}, headers=tenant.headers)
        assert_problem(r, 504, "request-timeout")
        for _ in range(100):  # the abandoned fan-out gives its rows back once it stops
            if client.serving.queue_depth() == 0:
                break
            threading.Event().wait(0.02)
        assert client.serving.queue_depth() == 0


def test_a_second_instance_serves_a_newly_activated_version_without_restart(api, make, base, tenant, tenant_key,
                                                                          db, zoo):
    trainer = tenant_key("train", tenant=tenant.tenant_id)
    v2 = register(db, tenant.tenant_id, "sentiment", *zoo["sentiment-v2"], activate=False)
    with serve(make(default_base_model=base, engine_device="cpu")) as other:
        first = predict(other, "sentiment", TEXTS, tenant.headers).json()
        assert first["version"] == 1
        r = api.post("/v1/tasks/sentiment/versions/2/activate", headers=trainer.headers)  # through the first app
        assert r.status_code == 200, r.text
        second = predict(other, "sentiment", TEXTS, tenant.headers).json()
        assert second["version"] == 2
        assert_same_predictions(second["predictions"], direct(other, v2.id, TEXTS))
        assert second["predictions"] != first["predictions"]


def test_regression_answers_a_value(api, tenant, db, base):
    version = register(db, tenant.tenant_id, "rating", *random_adapter(base, SPAFIT, labels=(), seed=6,
                                                                      task_type="regression"))
    r = predict(api, "rating", TEXTS[:2], tenant.headers)
    assert r.status_code == 200, r.text
    got, want = r.json()["predictions"], direct(api, version.id, TEXTS[:2])
    assert [p["label"] for p in got] == [None, None] and [p["scores"] for p in got] == [[], []]
    assert all(abs(g["value"] - w["value"]) <= 1e-5 for g, w in zip(got, want, strict=True))


def test_a_corrupted_adapter_blob_is_never_served(api, tenant, db, zoo):
    from sqlalchemy import update

    from app.models import Blob

    version = register(db, tenant.tenant_id, "fragile", *random_adapter(api.serving.settings.default_base_model,
                                                                          SPAFIT, seed=7))
    with db.session() as session:
        session.execute(update(Blob).where(Blob.sha256 == version.blob_sha256).values(data=b"garbage"))
        session.commit()
    assert_problem(predict(api, "fragile", ["good"], tenant.headers), 500, "blob-corrupted")
    assert 'spafit_adapter_loads_total{outcome="blob-corrupted"}' in _metrics_text(api)


def test_readyz_waits_for_the_backbone(api):
    body = api.get("/readyz").json()
    assert body["status"] == "ready" and body["checks"]["engine"]["ok"] is True


def test_readyz_names_a_backbone_that_failed_to_load(make, tmp_path):
    (tmp_path / "empty").mkdir()
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(make(default_base_model=str(tmp_path / "empty"), engine_device="cpu",
                                    preload_base_model=True))) as client:
        for _ in range(400):
            body = client.get("/readyz").json()
            if "failed" in (body.get("checks", {}).get("engine", {}).get("error") or ""):
                break
            threading.Event().wait(0.05)
    assert body["status"] == 503 and body["checks"]["engine"]["ok"] is False
    assert "failed" in body["checks"]["engine"]["error"] and body["checks"]["database"]["ok"] is True


def test_metrics_count_requests_batches_and_the_adapter_cache(api, tenant):
    predict(api, "spam", TEXTS, tenant.headers)
    predict(api, "spam", TEXTS, tenant.headers)
    text = _metrics_text(api)
    assert 'spafit_predict_requests_total{outcome="ok"}' in text
    assert 'spafit_engine_cache_total{event="miss"}' in text and 'spafit_engine_cache_total{event="hit"}' in text
    assert 'spafit_adapter_loads_total{outcome="ok"}' in text
    assert "spafit_engine_batch_size_count" in text and "spafit_adapters_loaded" in text
    assert "spafit_backbones_loaded 1.0" in text


def _metrics_text(client) -> str:
    """The app's Prometheus exposition (server mode closes /metrics on the API port: tests/api/test_health.py)."""
    return client.app.state.metrics.exposition()[0].decode()
