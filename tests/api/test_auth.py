"""API keys: 401 without a valid key, 403 without the scope, 404 for another tenant's resources."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app.models import ApiKey
from app.security import hash_secret, parse_key
from app.services import keys

from .helpers import assert_problem, unique_csv, upload


def test_missing_key_is_401_with_www_authenticate(client):
    r = client.get("/v1/datasets")
    body = assert_problem(r, 401, "unauthorized")
    assert "Bearer" in r.headers["www-authenticate"]
    assert "API key" in body["detail"]


@pytest.mark.parametrize("presented", [
    "spafit_000000000000_" + "x" * 43,  # well-formed, unknown prefix
    "not-a-spafit-key",
    "spafit__",
])
def test_unknown_or_malformed_key_is_401(client, presented):
    assert_problem(client.get("/v1/datasets", headers={"Authorization": f"Bearer {presented}"}), 401,
                   "unauthorized")


def test_right_prefix_wrong_secret_is_401(client, tenant_key):
    key = tenant_key("train")
    prefix, secret = parse_key(key.key)
    forged = f"spafit_{prefix}_{secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}"
    assert_problem(client.get("/v1/datasets", headers={"Authorization": f"Bearer {forged}"}), 401, "unauthorized")


def test_bearer_and_x_api_key_headers_both_work(client, tenant_key):
    key = tenant_key("train")
    assert client.get("/v1/datasets", headers={"Authorization": f"Bearer {key.key}"}).status_code == 200
    assert client.get("/v1/datasets", headers={"X-API-Key": key.key}).status_code == 200


def test_revoked_key_is_401(client, tenant_key, db):
    key = tenant_key("train")
    assert client.get("/v1/datasets", headers=key.headers).status_code == 200
    with db.session() as session:
        keys.revoke_key(session, key.tenant_id, key.key_id)
    assert_problem(client.get("/v1/datasets", headers=key.headers), 401, "unauthorized")


def test_missing_scope_is_403(client, tenant_key):
    predict_only = tenant_key("predict")
    body = assert_problem(client.get("/v1/datasets", headers=predict_only.headers), 403, "forbidden")
    assert "'train'" in body["detail"]
    assert_problem(upload(client, unique_csv(), headers=predict_only.headers), 403, "forbidden")


def test_a_predict_key_reads_tasks_but_nothing_of_training(client, tenant_key):
    """Least privilege: `predict` reads tasks and predicts; datasets, jobs and their events are `train`'s."""
    reader = tenant_key("predict")
    assert client.get("/v1/tasks", headers=reader.headers).status_code == 200
    for path in ("/v1/jobs", f"/v1/jobs/{reader.key_id}", f"/v1/jobs/{reader.key_id}/events", "/v1/datasets"):
        body = assert_problem(client.get(path, headers=reader.headers), 403, "forbidden")
        assert body["required_scope"] == "train" and body["accepted_scopes"] == ["train"]
    trainer = tenant_key("train")
    assert client.get("/v1/tasks", headers=trainer.headers).status_code == 200  # training produces tasks
    body = assert_problem(client.post("/v1/predict", json={"tasks": ["x"], "inputs": ["y"]}, headers=trainer.headers),
                          403, "forbidden")
    assert body["required_scope"] == "predict"


def test_admin_scope_implies_the_others(client, tenant_key):
    assert client.get("/v1/datasets", headers=tenant_key("admin").headers).status_code == 200


def test_another_tenants_dataset_is_404_on_get_and_delete(client, tenant_key):
    owner, stranger = tenant_key("train"), tenant_key("admin")
    created = upload(client, unique_csv(), headers=owner.headers).json()
    assert_problem(client.get(f"/v1/datasets/{created['id']}", headers=stranger.headers), 404, "not-found")
    assert_problem(client.delete(f"/v1/datasets/{created['id']}", headers=stranger.headers), 404, "not-found")
    assert client.get("/v1/datasets", headers=stranger.headers).json()["items"] == []
    assert client.get(f"/v1/datasets/{created['id']}", headers=owner.headers).status_code == 200


def test_keys_of_one_tenant_share_its_datasets(client, tenant_key):
    first = tenant_key("train")
    second = tenant_key("train", tenant=first.tenant_id)
    created = upload(client, unique_csv(), headers=first.headers).json()
    assert client.get(f"/v1/datasets/{created['id']}", headers=second.headers).status_code == 200


def test_keys_are_stored_as_a_hash_of_the_secret(db, tenant_key):
    key = tenant_key("train", "predict")
    prefix, secret = parse_key(key.key)
    with db.session() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
        assert row.secret_hash == hash_secret(secret) and secret not in row.secret_hash
        assert row.scopes == ["train", "predict"]
    assert key.key.startswith("spafit_") and len(secret) >= 40


def test_key_service_create_list_revoke(db):
    with db.session() as session:
        tenant = keys.create_tenant(session, "svc-" + db.engine.url.database[-6:])
        first, plaintext = keys.create_key(session, tenant, "ci", ["predict"])
        keys.create_key(session, tenant.id, "ops", ["admin"])
        assert [k.name for k in keys.list_keys(session, tenant.id)] == ["ci", "ops"]
        keys.revoke_key(session, tenant.id, first.prefix)
        assert [k.name for k in keys.list_keys(session, tenant.id, include_revoked=False)] == ["ops"]
        assert keys.authenticate(session, keys.create_key(session, tenant, "x", ["train"])[1]).tenant_id == tenant.id
        with pytest.raises(keys.Unauthorized):
            keys.authenticate(session, plaintext)
        with pytest.raises(keys.InvalidInput):
            keys.create_key(session, tenant, "bad", ["root"])
        with pytest.raises(keys.Conflict):
            keys.create_tenant(session, tenant.name)


def test_last_used_at_is_recorded(client, tenant_key, db):
    key = tenant_key("train")
    client.get("/v1/datasets", headers=key.headers)
    with db.session() as session:
        assert session.get(ApiKey, key.key_id).last_used_at is not None


def test_an_admin_key_manages_its_tenants_keys_over_the_api(client, tenant_key, db):
    admin = tenant_key("admin")
    r = client.post("/v1/keys", json={"name": "ci", "scopes": ["predict", "train"]}, headers=admin.headers)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["scopes"] == ["train", "predict"] and created["key"].startswith(f"spafit_{created['prefix']}_")
    new = {"Authorization": f"Bearer {created['key']}"}
    assert client.get("/v1/datasets", headers=new).status_code == 200  # it works, with its scopes only
    assert_problem(client.get("/v1/keys", headers=new), 403, "forbidden")
    listed = client.get("/v1/keys", headers=admin.headers).json()["items"]
    assert {k["id"] for k in listed} == {created["id"], str(admin.key_id)}
    assert all("key" not in k and "secret_hash" not in k for k in listed)  # the plaintext was shown once
    secret = parse_key(created["key"])[1]
    assert secret not in client.get("/v1/keys", headers=admin.headers).text
    revoked = client.delete(f"/v1/keys/{created['id']}", headers=admin.headers)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert client.delete(f"/v1/keys/{created['id']}", headers=admin.headers).json() == revoked.json()  # idempotent
    assert_problem(client.get("/v1/datasets", headers=new), 401, "unauthorized")


def test_keys_of_another_tenant_are_out_of_reach(client, tenant_key):
    owner, stranger = tenant_key("admin"), tenant_key("admin")
    assert_problem(client.delete(f"/v1/keys/{owner.key_id}", headers=stranger.headers), 404, "not-found")
    assert str(owner.key_id) not in client.get("/v1/keys", headers=stranger.headers).text
    assert client.get("/v1/datasets", headers=owner.headers).status_code == 200


@pytest.mark.parametrize("body", [{"name": "x", "scopes": []}, {"name": "x", "scopes": ["root"]},
                                  {"name": "", "scopes": ["train"]}, {"name": "x" * 101, "scopes": ["train"]},
                                  {"name": "a\nb", "scopes": ["train"]}, {"name": "a\x00b", "scopes": ["train"]},
                                  {"name": "x", "scopes": ["train"], "tenant": "other"}, {"scopes": ["train"]}])
def test_a_bad_key_request_is_422_and_creates_nothing(client, tenant_key, body):
    admin = tenant_key("admin")
    assert_problem(client.post("/v1/keys", json=body, headers=admin.headers), 422)
    assert len(client.get("/v1/keys", headers=admin.headers).json()["items"]) == 1


def test_only_admin_keys_reach_the_key_routes(client, tenant_key):
    for scope in ("train", "predict"):
        key = tenant_key(scope)
        for method, path in (("GET", "/v1/keys"), ("POST", "/v1/keys"), ("DELETE", f"/v1/keys/{key.key_id}")):
            r = client.request(method, path, json={"name": "x", "scopes": ["admin"]}, headers=key.headers)
            assert assert_problem(r, 403, "forbidden")["required_scope"] == "admin"
        assert client.get("/v1/datasets" if scope == "train" else "/v1/tasks", headers=key.headers).status_code == 200
