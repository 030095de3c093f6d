"""/v1/tasks: list, inspect, roll back, delete, download and import adapters, against the real Postgres
registry and the real engine on a tiny random BERT."""

from __future__ import annotations

import copy
import hashlib
import pickle

import pytest

from .adapters import (
    LORA,
    SPAFIT,
    TEXTS,
    assert_same_predictions,
    config_bytes,
    direct,
    pack,
    random_adapter,
    register,
    serve,
    served_on,
    tiny_backbone,
    zip_of,
)
from .helpers import assert_problem

ZIP = {"Content-Type": "application/zip"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"base": tiny_backbone(root, seed=0), "foreign": tiny_backbone(root, seed=1)}


@pytest.fixture(scope="module")
def base(models):
    return models["base"]


@pytest.fixture(scope="module")
def zoo(base):
    return {"v1": random_adapter(base, SPAFIT, seed=11), "v2": random_adapter(base, LORA, seed=12),
            "topic": random_adapter(base, SPAFIT, labels=("sport", "art", "food"), seed=13)}


@pytest.fixture(scope="module")
def api(pg_url, redis_client, redis_url, redis_prefix, tmp_path_factory, base):
    with served_on(base, pg_url, redis_url, redis_prefix, tmp_path_factory, preload_base_model=True) as client:
        yield client


@pytest.fixture
def owner(tenant_key, db, zoo):
    """A tenant with task `sentiment` (v1, then v2 active) and `topic` (v1), and a train+predict key."""
    key = tenant_key("train", "predict")
    key.v1 = register(db, key.tenant_id, "sentiment", *zoo["v1"])
    key.v2 = register(db, key.tenant_id, "sentiment", *zoo["v2"])
    key.topic = register(db, key.tenant_id, "topic", *zoo["topic"])
    return key


def put_adapter(client, task, archive, headers, content_type="application/zip"):
    return client.put(f"/v1/tasks/{task}/adapter", content=archive,
                      headers={**headers, "Content-Type": content_type})


def predict(client, task, headers, inputs=TEXTS):
    r = client.post(f"/v1/tasks/{task}/predict", json={"inputs": inputs}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------------------- reading


def test_get_task_shows_the_active_version_in_full(api, owner, zoo):
    r = api.get("/v1/tasks/sentiment", headers=owner.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["name"], body["version_count"]) == ("sentiment", 2)
    active = body["active_version"]
    cfg, weights = zoo["v2"]
    assert (active["version"], active["id"], active["active"]) == (2, str(owner.v2.id), True)
    assert active["sha256"] == hashlib.sha256(weights).hexdigest() and active["size_bytes"] == len(weights)
    assert active["base_model"] == cfg["base_model"]["name"]
    assert active["base_fingerprint"] == cfg["base_model"]["fingerprint"]
    assert active["method"]["name"] == "lora" and active["method"]["rank"] == 2
    assert (active["task_type"], active["labels"]) == ("single_label_classification", ["neg", "pos"])
    assert active["trainable_params"] == cfg["param_counts"]["total"] > 0
    assert active["param_counts"]["per_group"] == cfg["param_counts"]["per_group"]
    assert active["metrics"] == cfg["metrics"] and active["job_id"] is None


def test_list_tasks_paginates_newest_first(api, owner):
    page1 = api.get("/v1/tasks", params={"limit": 1}, headers=owner.headers).json()
    assert [t["name"] for t in page1["items"]] == ["topic"] and page1["next_cursor"]
    assert page1["items"][0]["active_version"]["labels"] == ["sport", "art", "food"]
    page2 = api.get("/v1/tasks", params={"limit": 1, "cursor": page1["next_cursor"]}, headers=owner.headers).json()
    assert [t["name"] for t in page2["items"]] == ["sentiment"] and page2["next_cursor"] is None
    assert page2["items"][0]["active_version"]["version"] == 2


def test_list_versions_newest_first_marks_the_active_one(api, owner):
    r = api.get("/v1/tasks/sentiment/versions", headers=owner.headers)
    assert r.status_code == 200, r.text
    assert [(v["version"], v["active"]) for v in r.json()["items"]] == [(2, True), (1, False)]
    assert r.json()["next_cursor"] is None


def test_a_predict_key_can_read_tasks(api, owner, tenant_key):
    reader = tenant_key("predict", tenant=owner.tenant_id)
    assert api.get("/v1/tasks/sentiment", headers=reader.headers).status_code == 200
    assert api.get("/v1/tasks", headers=reader.headers).status_code == 200


# ------------------------------------------------------------------------------- rollback and delete


def test_activate_rolls_back_which_version_answers(api, owner):
    assert predict(api, "sentiment", owner.headers)["version"] == 2
    r = api.post("/v1/tasks/sentiment/versions/1/activate", headers=owner.headers)
    assert r.status_code == 200, r.text
    assert r.json()["active_version"]["version"] == 1
    body = predict(api, "sentiment", owner.headers)
    assert body["version"] == 1
    assert_same_predictions(body["predictions"], direct(api, owner.v1.id, TEXTS))
    assert api.post("/v1/tasks/sentiment/versions/2/activate", headers=owner.headers).status_code == 200
    assert predict(api, "sentiment", owner.headers)["version"] == 2


def test_activate_an_unknown_version_is_404(api, owner):
    assert_problem(api.post("/v1/tasks/sentiment/versions/9/activate", headers=owner.headers), 404, "not-found")
    assert_problem(api.post("/v1/tasks/sentiment/versions/0/activate", headers=owner.headers), 422,
                   "validation-error")


def test_delete_evicts_and_everything_is_404_afterwards(api, owner):
    predict(api, "sentiment", owner.headers)  # the engine now holds v2
    assert str(owner.v2.id) in api.serving.engine.bank().names()
    assert api.delete("/v1/tasks/sentiment", headers=owner.headers).status_code == 204
    assert str(owner.v2.id) not in api.serving.engine.bank().names()
    assert_problem(api.get("/v1/tasks/sentiment", headers=owner.headers), 404, "not-found")
    assert_problem(api.get("/v1/tasks/sentiment/versions", headers=owner.headers), 404, "not-found")
    r = api.post("/v1/tasks/sentiment/predict", json={"inputs": ["good"]}, headers=owner.headers)
    assert_problem(r, 404, "not-found")
    assert_problem(api.delete("/v1/tasks/sentiment", headers=owner.headers), 404, "not-found")
    assert [t["name"] for t in api.get("/v1/tasks", headers=owner.headers).json()["items"]] == ["topic"]


# ------------------------------------------------------------------------------ download and import


def test_download_then_import_round_trips_with_the_same_predictions(api, owner):
    r = api.get("/v1/tasks/sentiment/adapter", headers=owner.headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    assert r.headers["content-disposition"] == 'attachment; filename="sentiment-v2.zip"'
    assert r.headers["etag"] == f'"{hashlib.sha256(r.content).hexdigest()}"'
    assert api.get("/v1/tasks/sentiment/adapter", headers={**owner.headers, "If-None-Match": r.headers["etag"]}
                   ).status_code == 304
    imported = put_adapter(api, "sentiment-copy", r.content, owner.headers)
    assert imported.status_code == 201, imported.text
    body = imported.json()
    assert (body["version"], body["active"], body["job_id"]) == (1, True, None)
    assert body["sha256"] == api.get("/v1/tasks/sentiment", headers=owner.headers).json()["active_version"]["sha256"]
    assert_same_predictions(predict(api, "sentiment-copy", owner.headers)["predictions"],
                            predict(api, "sentiment", owner.headers)["predictions"])
    again = api.get("/v1/tasks/sentiment-copy/adapter", headers=owner.headers)
    assert again.content == r.content  # deterministic archives: the same adapter, the same bytes


def test_download_a_given_version(api, owner, zoo):
    r = api.get("/v1/tasks/sentiment/adapter", params={"version": 1}, headers=owner.headers)
    assert r.status_code == 200 and r.content == pack(*zoo["v1"])
    assert r.headers["content-disposition"].endswith('"sentiment-v1.zip"')
    assert_problem(api.get("/v1/tasks/sentiment/adapter", params={"version": 7}, headers=owner.headers), 404)


def test_import_into_an_existing_task_adds_the_next_active_version(api, owner, zoo):
    r = put_adapter(api, "sentiment", pack(*zoo["topic"]), owner.headers)
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 3 and r.headers["location"] == "/v1/tasks/sentiment"
    body = predict(api, "sentiment", owner.headers)
    assert body["version"] == 3 and body["predictions"][0]["scores"][0]["label"] in {"sport", "art", "food"}


def _tampered_weights(cfg, weights):
    data = bytearray(weights)
    data[-1] ^= 0x01
    return pack(cfg, bytes(data))


def _flipped_zip(cfg, weights):
    data = bytearray(pack(cfg, weights))
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


def _pickled_weights(cfg, weights):
    payload = pickle.dumps({"lora_A": [0.0] * 4})
    cfg = copy.deepcopy(cfg)
    cfg["weights"]["sha256"] = hashlib.sha256(payload).hexdigest()
    return pack(cfg, payload)


def _pickle_file(cfg, weights):
    return zip_of({"adapter_config.json": config_bytes(cfg), "adapter.bin": pickle.dumps({"x": 1})})


def _extra_file(cfg, weights):
    return zip_of({"adapter_config.json": config_bytes(cfg), "adapter.safetensors": weights, "run.sh": b"rm -rf /"})


def _wrong_rank(cfg, weights):
    cfg = copy.deepcopy(cfg)
    cfg["method"]["rank"] = 4
    return pack(cfg, weights)


def _wrong_labels(cfg, weights):
    cfg = copy.deepcopy(cfg)
    cfg["task"]["labels"] = ["a", "b", "c"]
    return pack(cfg, weights)


@pytest.mark.parametrize("make_archive, slug, words", [
    (_tampered_weights, "invalid-adapter", "sha256"),
    (_flipped_zip, "invalid-adapter", "damaged"),
    (lambda cfg, w: b"not a zip at all", "invalid-adapter", "not a zip"),
    (_pickled_weights, "invalid-adapter", "safetensors"),
    (_pickle_file, "invalid-adapter", "pickled weights are never loaded"),
    (_extra_file, "invalid-adapter", "run.sh"),
    (_wrong_rank, "adapter-mismatch", "shape mismatch"),
    (_wrong_labels, "adapter-mismatch", "head."),
    (lambda cfg, w: zip_of({"adapter.safetensors": w}), "invalid-adapter", "lacks spafit_adapter.json"),
])
def test_import_refuses_a_bad_archive_with_422_saying_what_is_wrong(api, owner, zoo, make_archive, slug, words):
    r = put_adapter(api, "imported", make_archive(*zoo["v1"]), owner.headers)
    problem = assert_problem(r, 422, slug)
    assert words in problem["detail"], problem["detail"]
    assert_problem(api.get("/v1/tasks/imported", headers=owner.headers), 404)  # nothing was registered


def test_import_refuses_an_adapter_of_a_foreign_base_model(api, owner, models):
    cfg, weights = random_adapter(models["foreign"], SPAFIT, seed=5)
    problem = assert_problem(put_adapter(api, "imported", pack(cfg, weights), owner.headers), 422,
                             "adapter-mismatch")
    assert "does not serve" in problem["detail"] and problem["field"] == "base_model.name"
    # the same weights claiming to be of the served model: the fingerprint gives them away
    cfg = copy.deepcopy(cfg)
    cfg["base_model"]["name"] = models["base"]
    problem = assert_problem(put_adapter(api, "imported", pack(cfg, weights), owner.headers), 422,
                             "adapter-mismatch")
    assert "base model" in problem["detail"] and problem["field"] == "base_model"


def test_import_needs_a_zip_content_type(api, owner, zoo):
    assert_problem(put_adapter(api, "imported", pack(*zoo["v1"]), owner.headers, "text/plain"), 415,
                   "unsupported-media-type")


def test_import_over_the_request_limit_is_413(make_settings, base, owner, zoo):
    settings = make_settings(default_base_model=base, engine_device="cpu", max_upload_bytes=1000,
                             max_request_bytes=2000)
    with serve(settings) as client:
        assert_problem(put_adapter(client, "imported", pack(*zoo["v1"]), owner.headers), 413, "payload-too-large")


# ------------------------------------------------------------------- every field of an imported config


def _set(path, value):
    """A config mutation: set `path` ("a.b.c"; a missing last key is added) to `value`, or delete it (DELETE)."""
    def mutate(cfg):
        *parents, last = path.split(".")
        node = cfg
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return mutate


DELETE = object()
BAD_CONFIGS = [  # (id, mutation, the field the 422 names)
    ("param_counts-type", _set("param_counts", "lots"), "param_counts"),
    ("param_counts-list", _set("param_counts", [1, 2]), "param_counts"),
    ("param_counts-total-type", _set("param_counts.total", "many"), "param_counts.total"),
    ("param_counts-total-negative", _set("param_counts.total", -1), "param_counts.total"),
    ("param_counts-total-bool", _set("param_counts.total", True), "param_counts.total"),
    ("param_counts-per_group-type", _set("param_counts.per_group", [1, 2]), "param_counts.per_group"),
    ("param_counts-per_group-value", _set("param_counts.per_group", {"1": "x"}), "param_counts.per_group.1"),
    ("param_counts-fraction", _set("param_counts.trainable_fraction", "1%"), "param_counts.trainable_fraction"),
    ("param_counts-unknown", _set("param_counts.surprise", 1), "param_counts.surprise"),
    ("param_counts-missing", _set("param_counts", DELETE), "param_counts"),
    ("stratification-type", _set("stratification", "3 groups"), "stratification"),
    ("stratification-missing", _set("stratification", DELETE), "stratification"),
    ("stratification-num_layers", _set("stratification.num_layers", 0), "stratification.num_layers"),
    ("stratification-n1-type", _set("stratification.n1", "1"), "stratification.n1"),
    ("stratification-n2-range", _set("stratification.n2", 9), "stratification.n2"),
    ("stratification-groups-value", _set("stratification.layer_groups", [1, 2, 3, 7]),
     "stratification.layer_groups"),
    ("stratification-groups-length", _set("stratification.layer_groups", [1, 2]), "stratification.layer_groups"),
    ("stratification-vs-method", _set("stratification.n1", 0), "stratification"),
    ("metrics-type", _set("metrics", [0.5]), "metrics"),
    ("metrics-value-text", _set("metrics", {"accuracy": "high"}), "metrics.accuracy"),
    ("metrics-value-object", _set("metrics", {"accuracy": {"a": 1}}), "metrics.accuracy"),
    ("metrics-value-nan", _set("metrics", {"accuracy": float("nan")}), "metrics.accuracy"),
    ("max_seq_length-negative", _set("max_seq_length", -5), "max_seq_length"),
    ("max_seq_length-zero", _set("max_seq_length", 0), "max_seq_length"),
    ("max_seq_length-huge", _set("max_seq_length", 100000), "max_seq_length"),
    ("max_seq_length-over-backbone", _set("max_seq_length", 65), "max_seq_length"),  # tiny BERT: 64 positions
    ("max_seq_length-text", _set("max_seq_length", "32"), "max_seq_length"),
    ("max_seq_length-float", _set("max_seq_length", 32.5), "max_seq_length"),
    ("max_seq_length-bool", _set("max_seq_length", True), "max_seq_length"),
    ("max_seq_length-missing", _set("max_seq_length", DELETE), "max_seq_length"),
    ("labels-text", _set("task.labels", "neg,pos"), "task.labels"),
    ("labels-numbers", _set("task.labels", [0, 1]), "task.labels[0]"),
    ("labels-duplicate", _set("task.labels", ["neg", "neg"]), "task.labels"),
    ("labels-too-long", _set("task.labels", ["x" * 500, "pos"]), "task.labels[0]"),
    ("labels-nul", _set("task.labels", ["neg\x00", "pos"]), "task.labels[0]"),
    ("task_type", _set("task.task_type", "clustering"), "task.task_type"),
    ("task-type", _set("task", ["neg", "pos"]), "task"),
    ("task-unknown", _set("task.extra", 1), "task.extra"),
    ("method-rank-text", _set("method.rank", "2"), "method.rank"),
    ("method-rank-zero", _set("method.rank", 0), "method.rank"),
    ("method-name", _set("method.name", "magic"), "method.name"),
    ("method-unknown", _set("method.extra", 1), "method.extra"),
    ("method-type", _set("method", "spafit"), "method"),
    ("base_model-name-type", _set("base_model.name", 7), "base_model.name"),
    ("base_model-fingerprint-empty", _set("base_model.fingerprint", ""), "base_model.fingerprint"),
    ("base_model-num_layers", _set("base_model.num_layers", 99), "base_model.num_layers"),
    ("base_model-hidden_size", _set("base_model.hidden_size", -1), "base_model.hidden_size"),
    ("base_model-model_type", _set("base_model.model_type", "gpt2"), "base_model.model_type"),
    ("weights-sha256", _set("weights.sha256", "abc"), "weights.sha256"),
    ("weights-size", _set("weights.size_bytes", -1), "weights.size_bytes"),
    ("weights-file", _set("weights.file", "../adapter.bin"), "weights.file"),
    ("training-type", _set("training", "yes"), "training"),
    ("training-main_metric", _set("training.main_metric", 5), "training.main_metric"),
    ("format_version", _set("format_version", 2), "format_version"),
    ("format", _set("format", "peft"), "format"),
    ("created_at", _set("created_at", 5), "created_at"),
    ("library_version", _set("library_version", ["0.1"]), "library_version"),
    ("unknown-key", _set("evil", {"x": 1}), "evil"),
]


@pytest.fixture
def registry_view(api, owner):
    """What the owner sees of the registry: every task and every version, to compare before and after."""
    def view():
        tasks = api.get("/v1/tasks", headers=owner.headers)
        versions = api.get("/v1/tasks/sentiment/versions", headers=owner.headers)
        assert tasks.status_code == versions.status_code == 200, (tasks.text, versions.text)
        return tasks.json(), versions.json()
    return view


@pytest.mark.parametrize("mutate, field", [pytest.param(m, f, id=i) for i, m, f in BAD_CONFIGS])
def test_import_with_one_config_field_wrong_is_422_naming_it_and_changes_nothing(api, owner, zoo, registry_view,
                                                                                 mutate, field):
    before = registry_view()
    cfg, weights = copy.deepcopy(zoo["v1"][0]), zoo["v1"][1]
    mutate(cfg)
    for task in ("sentiment", "imported"):  # an existing task and a new one
        problem = assert_problem(put_adapter(api, task, pack(cfg, weights), owner.headers), 422)
        assert problem["field"] == field, problem
        assert problem["type"].endswith(("/invalid-adapter", "/adapter-mismatch")), problem
    assert registry_view() == before
    assert_problem(api.get("/v1/tasks/imported", headers=owner.headers), 404)


def test_the_unchanged_config_still_imports(api, owner, zoo):
    """The control for the table above: the same archive, unmutated, is accepted."""
    assert put_adapter(api, "imported", pack(*zoo["v1"]), owner.headers).status_code == 201


@pytest.mark.parametrize("column, value", [
    ("param_counts", {"total": "many", "per_group": [1]}), ("param_counts", ["x"]), ("metrics", {"acc": "high"}),
    ("metrics", [1, 2]), ("config", {"task": {"task_type": "x", "labels": "ab"}, "max_seq_length": -5,
                                     "stratification": "x"}),
    ("config", {}), ("config", ["not", "an", "object"]), ("method", ["x"]),
])
def test_a_task_renders_whatever_its_stored_config_holds(api, owner, db, column, value):
    """Rows written before the schema existed, or by hand: GET /v1/tasks, the task and its versions answer 200."""
    from sqlalchemy import update

    from app.models import AdapterVersion

    with db.transaction() as s:
        s.execute(update(AdapterVersion).where(AdapterVersion.id == owner.v2.id).values({column: value}))
    for path in ("/v1/tasks", "/v1/tasks/sentiment", "/v1/tasks/sentiment/versions"):
        r = api.get(path, headers=owner.headers)
        assert r.status_code == 200, (path, r.text)
    active = api.get("/v1/tasks/sentiment", headers=owner.headers).json()["active_version"]
    assert active["version"] == 2 and active["task_type"] in ("single_label_classification",
                                                               "multi_label_classification", "regression")


# ----------------------------------------------------------------------------- tenants, scopes, names


TASK_ROUTES = [
    ("get", "/v1/tasks/sentiment", None),
    ("get", "/v1/tasks/sentiment/versions", None),
    ("post", "/v1/tasks/sentiment/versions/1/activate", None),
    ("delete", "/v1/tasks/sentiment", None),
    ("get", "/v1/tasks/sentiment/adapter", None),
    ("post", "/v1/tasks/sentiment/predict", {"inputs": ["good"]}),
    ("post", "/v1/predict", {"tasks": ["sentiment"], "inputs": ["good"]}),
]


@pytest.mark.parametrize("method, path, body", TASK_ROUTES)
def test_another_tenants_task_is_404_on_every_route(api, owner, tenant_key, method, path, body):
    other = tenant_key("train", "predict")
    r = api.request(method, path, json=body, headers=other.headers)
    assert_problem(r, 404, "not-found")
    assert api.get("/v1/tasks", headers=other.headers).json()["items"] == []
    assert api.get("/v1/tasks/sentiment", headers=owner.headers).json()["active_version"]["version"] == 2


@pytest.mark.parametrize("method, path", [
    ("post", "/v1/tasks/sentiment/versions/1/activate"),
    ("delete", "/v1/tasks/sentiment"),
    ("get", "/v1/tasks/sentiment/adapter"),
    ("put", "/v1/tasks/sentiment/adapter"),
])
def test_changing_or_downloading_needs_the_train_scope(api, owner, tenant_key, zoo, method, path):
    predictor = tenant_key("predict", tenant=owner.tenant_id)
    content = pack(*zoo["v1"]) if method == "put" else None
    r = api.request(method, path, content=content, headers={**predictor.headers, **ZIP})
    assert_problem(r, 403, "forbidden")
    assert api.get("/v1/tasks/sentiment", headers=owner.headers).json()["version_count"] == 2


@pytest.mark.parametrize("path", ["/v1/tasks/{}", "/v1/tasks/{}/versions", "/v1/tasks/{}/adapter",
                                  "/v1/tasks/{}/versions/1/activate"])
@pytest.mark.parametrize("name", ["%2e%2e", "UPPER", "a.b", "_x", "x" * 65])
def test_odd_task_names_are_422(api, owner, path, name):
    method = "post" if path.endswith("activate") else "get"
    r = api.request(method, path.format(name), headers=owner.headers)
    problem = assert_problem(r, 422, "validation-error")
    assert [e["field"] for e in problem["errors"]] == ["path.task"]


def test_import_with_an_odd_task_name_is_422_and_an_encoded_path_matches_no_route(api, owner, zoo):
    problem = assert_problem(put_adapter(api, "%2e%2e", pack(*zoo["v1"]), owner.headers), 422, "validation-error")
    assert problem["errors"][0]["field"] == "path.task"
    assert_problem(put_adapter(api, "..%2F..%2Fetc", pack(*zoo["v1"]), owner.headers), 404, "not-found")
    assert [t["name"] for t in api.get("/v1/tasks", headers=owner.headers).json()["items"]] == ["topic", "sentiment"]


# ------------------------------------------------------------------------------------------ OpenAPI


ROUTES = {
    ("get", "/v1/tasks"): {"401", "422"},
    ("get", "/v1/tasks/{task}"): {"401", "404", "422"},
    ("get", "/v1/tasks/{task}/versions"): {"401", "404", "422"},
    ("post", "/v1/tasks/{task}/versions/{version}/activate"): {"401", "403", "404", "422"},
    ("delete", "/v1/tasks/{task}"): {"401", "403", "404", "422"},
    ("get", "/v1/tasks/{task}/adapter"): {"401", "403", "404", "409", "422"},
    ("put", "/v1/tasks/{task}/adapter"): {"401", "403", "413", "415", "422"},
    ("post", "/v1/tasks/{task}/predict"): {"401", "403", "404", "409", "422", "503", "504"},
    ("post", "/v1/predict"): {"401", "403", "404", "409", "422", "503", "504"},
}


def test_openapi_documents_each_route_with_its_schemas_and_problem_responses(api):
    spec = api.get("/openapi.json").json()
    for (method, path), codes in ROUTES.items():
        op = spec["paths"][path][method]
        assert codes <= set(op["responses"]), (method, path, set(op["responses"]))
        for code in codes:
            content = op["responses"][code]["content"]
            assert list(content) == ["application/problem+json"], (method, path, code)
            assert content["application/problem+json"]["schema"] == {"$ref": "#/components/schemas/Problem"}
    paths = spec["paths"]

    def ok_schema(method, path, code="200"):
        return paths[path][method]["responses"][code]["content"]["application/json"]["schema"]["$ref"]

    assert ok_schema("post", "/v1/tasks/{task}/predict").endswith("/TaskPredictions")
    assert ok_schema("post", "/v1/predict").endswith("/FanOutResponse")
    assert ok_schema("get", "/v1/tasks/{task}").endswith("/TaskOut")
    assert ok_schema("put", "/v1/tasks/{task}/adapter", "201").endswith("/AdapterVersionOut")
    assert paths["/v1/tasks/{task}/adapter"]["get"]["responses"]["200"]["content"] == {
        "application/zip": {"schema": {"type": "string", "format": "binary"}}}
    assert "application/zip" in paths["/v1/tasks/{task}/adapter"]["put"]["requestBody"]["content"]
    assert paths["/v1/tasks/{task}"]["get"]["parameters"][0]["schema"]["pattern"]
    for name in ("TaskOut", "AdapterVersionOut", "PredictRequest", "FanOutRequest", "Prediction"):
        assert name in spec["components"]["schemas"]
