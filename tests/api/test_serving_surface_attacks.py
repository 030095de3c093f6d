"""Bugs found by attacking the HTTP surface of serving and of the task registry as a hostile or careless client
would. Each test fails on the code as it was found and passes once fixed."""

from __future__ import annotations

import io
import json
import zipfile

import pytest

from .adapters import LORA, SPAFIT, TEXTS, random_adapter, register, serve, settings_factory, tiny_backbone
from .helpers import assert_problem


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def zoo(base):
    return {"sentiment": random_adapter(base, SPAFIT, seed=1),
            "topic": random_adapter(base, LORA, labels=("sport", "art", "food"), seed=2)}


@pytest.fixture(scope="module")
def api(pg_url, redis_client, redis_url, redis_prefix, tmp_path_factory, base):
    with settings_factory(pg_url, redis_url, redis_prefix, tmp_path_factory.mktemp("data")) as make, \
            serve(make(default_base_model=base, engine_device="cpu", preload_base_model=True)) as client:
        yield client


def _zip(cfg: dict, weights: bytes) -> bytes:
    """An adapter archive as `pack` makes it, with the config written as given (json.dumps keeps a lone
    surrogate as the escape `\\ud800`, as any client's JSON encoder does)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("spafit_adapter.json", json.dumps(cfg))
        z.writestr("adapter.safetensors", weights)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- bug 1


def test_fan_out_racing_a_task_delete_is_404_not_a_500(api, tenant_key, db, zoo, monkeypatch):
    """`POST /v1/predict` resolves each task's active version, then the engine loads the versions it does not
    hold. A `DELETE /v1/tasks/{task}` that commits in between (any client of the tenant, any replica) leaves the
    fan-out with a version id the registry no longer has: the engine's `_base_model_of` raises `NotFound`, an
    `AppError`, and `Serving._fan_out_sync` turns every non-`SpafitError` into a 500 `prediction-failed` ("the
    engine failed on these inputs"). The single-task route answers the same race with a 404; so must this one.
    (Seen live: 18 of ~1700 fan-outs were 500 while another client deleted and re-imported a task.)"""
    from app.services import registry

    key = tenant_key("predict", "train")
    register(db, key.tenant_id, "doomed", *zoo["sentiment"])
    register(db, key.tenant_id, "stays", *zoo["topic"])
    serving = api.serving
    resolve = serving._resolve

    async def resolve_then_delete(tenant_id, tasks):
        served = await resolve(tenant_id, tasks)
        # what DELETE /v1/tasks/doomed does, committed right after this request resolved its versions
        with db.session() as session:
            serving.evict(registry.delete_task(session, key.tenant_id, "doomed"))
        return served

    monkeypatch.setattr(serving, "_resolve", resolve_then_delete)
    r = api.post("/v1/predict", json={"tasks": ["stays", "doomed"], "inputs": TEXTS[:2]}, headers=key.headers)
    assert r.status_code != 500, r.text
    assert_problem(r, 404, "not-found")


def test_fan_out_over_a_corrupted_adapter_says_blob_corrupted_as_predict_does(api, tenant_key, db, zoo):
    """The same catch-all, another way in: a version whose stored blob no longer matches its sha256 is
    `blob-corrupted` (an `AppError`, 500) on `POST /v1/tasks/{task}/predict` (tests/api/test_predict.py), but the
    fan-out wraps it into a generic `prediction-failed` ("the engine failed on these inputs"), losing the type a
    client or an operator branches on."""
    from sqlalchemy import update

    from app.models import Blob

    key = tenant_key("predict")
    cfg, weights = random_adapter(api.serving.settings.default_base_model, SPAFIT, seed=21)
    version = register(db, key.tenant_id, "fragile", cfg, weights)
    register(db, key.tenant_id, "sound", *zoo["topic"])
    with db.session() as session:
        session.execute(update(Blob).where(Blob.sha256 == version.blob_sha256).values(data=b"garbage"))
        session.commit()
    assert_problem(api.post("/v1/tasks/fragile/predict", json={"inputs": ["good"]}, headers=key.headers),
                   500, "blob-corrupted")
    r = api.post("/v1/predict", json={"tasks": ["sound", "fragile"], "inputs": ["good"]}, headers=key.headers)
    assert_problem(r, 500, "blob-corrupted")


# ------------------------------------------------------------------------------------------------- bug 2


def test_import_with_a_lone_surrogate_in_the_fingerprint_is_422_not_a_500(api, tenant_key, zoo):
    """`PUT /v1/tasks/{task}/adapter` with `base_model.fingerprint` = "\\ud800" (valid JSON: a lone surrogate
    escape). The schema checks it is a string of 1-128 characters, and `_clean_json` refuses NUL but not lone
    surrogates; `check_fingerprint` then raises `AdapterMismatchError` whose message and `expected` member carry
    the surrogate, and rendering that problem+json (utf-8) raises UnicodeEncodeError: a 500 `internal-error`
    for a malformed upload. It must be a 422 naming the field."""
    key = tenant_key("train")
    cfg, weights = zoo["topic"]
    bad = json.loads(json.dumps(cfg))
    bad["base_model"]["fingerprint"] = "\ud800"
    r = api.put("/v1/tasks/surrogate/adapter", content=_zip(bad, weights),
                headers={**key.headers, "Content-Type": "application/zip"})
    assert r.status_code != 500, r.text
    problem = assert_problem(r, 422)
    assert (problem.get("field") or "").startswith("base_model"), problem


@pytest.mark.parametrize("where, field", [(("task", "labels", 0), "task.labels[0]"),
                                          (("base_model", "architecture"), "base_model.architecture"),
                                          (("library_version",), "library_version")])
def test_import_with_a_lone_surrogate_in_a_config_string_names_the_field(api, tenant_key, zoo, where, field):
    """The same hole elsewhere in the config: a label (or any other free string) holding "\\ud800" passes the
    schema and reaches the database, whose refusal comes back as the generic 422 `invalid-input` "a value in
    the request cannot be stored: text with NUL (\\x00) characters, or a number out of range": no `field`, and
    a reason that is not the one. A NUL in the same place is refused by the schema naming the field
    (`task.labels[0] holds a NUL character`); a lone surrogate must be too."""
    key = tenant_key("train")
    cfg, weights = zoo["topic"]
    bad = json.loads(json.dumps(cfg))
    target = bad
    for part in where[:-1]:
        target = target[part]
    target[where[-1]] = "\ud800"
    r = api.put("/v1/tasks/surrogate-label/adapter", content=_zip(bad, weights),
                headers={**key.headers, "Content-Type": "application/zip"})
    problem = assert_problem(r, 422)
    assert problem.get("field") == field, problem


# ------------------------------------------------------------------------------------------------- bug 3


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_head_on_the_probes_answers_like_get(api, path):
    """`HostOriginMiddleware` lets `GET` and `HEAD` on /healthz and /readyz through whatever the Host (probes
    come by IP), yet the routes are GET-only: a HEAD probe (load balancers, uptime checkers, `curl -I`) gets
    405 and marks a healthy replica down. RFC 9110 9.3.2: HEAD is GET without the body."""
    get = api.get(path)
    assert get.status_code == 200, get.text
    head = api.head(path)
    assert head.status_code == 200, (head.status_code, head.headers)
    assert head.content == b""
