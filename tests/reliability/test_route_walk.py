"""Every route, walked with the wrong key. The operations come from the service's own OpenAPI document, so a
route added later fails `test_every_route_is_classified` until it is given a rule here.

For each operation, with the path filled with ANOTHER tenant's real resources (a dataset, a job, a task with an
active version): no key is 401; a key of another tenant (with every scope) is 404 on the owner's resource,
or a listing without the owner's items, or an action in the caller's own tenant; a key of the owner's tenant
that lacks the operation's scope is 403. No answer carries a stack trace, and the owner's resources are
unchanged after every call.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.api.adapters import SPAFIT, pack, random_adapter, register, serve, settings_factory, tiny_backbone
from tests.api.helpers import assert_problem, unique_csv

SCOPES = ("train", "predict")


@dataclass(frozen=True)
class Rule:
    """How an operation treats another tenant's resources.
    other: "hidden" (404, the resource does not exist for the caller), "listed" (200, none of the owner's
    items), "own" (it acts in the caller's own tenant and leaves the owner's resource alone), "public" (no key).
    scope: the scope the operation needs (None: any valid key)."""

    other: str
    scope: str | None = None
    body: str | None = None  # a key of BODIES


ROUTES: dict[tuple[str, str], Rule] = {
    ("GET", "/healthz"): Rule("public"),
    ("GET", "/readyz"): Rule("public"),
    ("GET", "/metrics"): Rule("public"),
    ("POST", "/v1/datasets"): Rule("own", "train", "upload"),
    ("GET", "/v1/datasets"): Rule("listed", "train"),
    ("GET", "/v1/datasets/{dataset_id}"): Rule("hidden", "train"),
    ("DELETE", "/v1/datasets/{dataset_id}"): Rule("hidden", "train"),
    ("POST", "/v1/jobs"): Rule("hidden", "train", "job"),  # on the owner's dataset
    ("GET", "/v1/jobs"): Rule("listed"),
    ("GET", "/v1/jobs/{job_id}"): Rule("hidden"),
    ("POST", "/v1/jobs/{job_id}/cancel"): Rule("hidden", "train"),
    ("GET", "/v1/jobs/{job_id}/events"): Rule("hidden"),
    ("GET", "/v1/tasks"): Rule("listed"),
    ("GET", "/v1/tasks/{task}"): Rule("hidden"),
    ("DELETE", "/v1/tasks/{task}"): Rule("hidden", "train"),
    ("GET", "/v1/tasks/{task}/versions"): Rule("hidden"),
    ("POST", "/v1/tasks/{task}/versions/{version}/activate"): Rule("hidden", "train"),
    ("GET", "/v1/tasks/{task}/adapter"): Rule("hidden", "train"),
    ("PUT", "/v1/tasks/{task}/adapter"): Rule("own", "train", "archive"),  # imports into the caller's task
    ("POST", "/v1/tasks/{task}/predict"): Rule("hidden", "predict", "predict"),
    ("POST", "/v1/predict"): Rule("hidden", "predict", "fan_out"),
}
# Routes outside the OpenAPI document: documentation and the dashboard's static files, which hold no data.
STATIC_PUBLIC = ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/", "/dashboard")
LEAKS = ("Traceback", 'File "', "sqlalchemy", "psycopg", "site-packages")


def _openapi() -> dict[str, Any]:
    from app.main import create_app
    from app.settings import Settings

    app = create_app(Settings(_env_file=None, mode="server", database_url="postgresql://x@127.0.0.1:1/x",
                              broker_url="redis://127.0.0.1:1/0"))
    return app.openapi()


OPENAPI = _openapi()
OPERATIONS = sorted((m.upper(), p) for p, ops in OPENAPI["paths"].items() for m in ops)


def _route_paths(routes: Any) -> Iterator[tuple[str, bool]]:
    """(path, in the schema) of every route, inside included routers too."""
    for r in routes:
        inner = getattr(r, "original_router", None)
        if inner is not None:
            yield from _route_paths(inner.routes)
        elif hasattr(r, "path"):
            yield r.path, getattr(r, "include_in_schema", False)


@dataclass
class World:
    client: Any
    owner: dict[str, str]  # headers of a key with every scope
    partial: dict[str, dict[str, str]]  # headers of the owner's keys with one scope each
    dataset: str
    job: str
    task: str
    archive: bytes
    private: list[str]  # what only the owner may see: its tenant id, the dataset's name and hash, the blob's hash
    sent: list = field(default_factory=list)


def _key(db: Any, tenant_id: uuid.UUID, scopes: list[str]) -> dict[str, str]:
    from app.services import keys

    with db.session() as s:
        _, plaintext = keys.create_key(s, tenant_id, "walk", scopes)
    return {"Authorization": f"Bearer {plaintext}"}


def _tenant(db: Any) -> uuid.UUID:
    from app.services import keys

    with db.session() as s:
        return keys.create_tenant(s, f"walk-{secrets.token_hex(6)}").id


@pytest.fixture(scope="module")
def world(pg_url, db, redis_client, redis_url, redis_prefix, tmp_path_factory) -> Iterator[World]:
    base = tiny_backbone(tmp_path_factory.mktemp("walk-model"))
    with settings_factory(pg_url, redis_url, f"{redis_prefix}walk:", tmp_path_factory.mktemp("walk")) as make:
        settings = make(default_base_model=base, engine_device="cpu", job_requeue_interval_s=3600)
        with serve(settings) as client:
            sent: list = []
            client.app.state.send_job = sent.append  # the owner's job stays queued: no worker here
            tenant = _tenant(db)
            owner = _key(db, tenant, ["train", "predict"])
            dataset = client.post("/v1/datasets", files={"file": ("walk.csv", unique_csv())}, headers=owner)
            assert dataset.status_code == 201, dataset.text
            job = client.post("/v1/jobs", json={"task": "walk", "train_dataset": dataset.json()["id"],
                                                "method": {"name": "spafit", "n1": 1, "n2": 2, "rank": 2}},
                              headers=owner)
            assert job.status_code == 202, job.text
            cfg, weights = random_adapter(base, SPAFIT, seed=11)
            version = register(db, tenant, "walk", cfg, weights)
            private = [str(tenant), dataset.json()["sha256"], "walk.csv", version.blob_sha256, str(version.id)]
            yield World(client=client, owner=owner, partial={s: _key(db, tenant, [s]) for s in SCOPES},
                        dataset=dataset.json()["id"], job=job.json()["id"], task="walk", archive=pack(cfg, weights),
                        private=private, sent=sent)
            client.post(f"/v1/jobs/{job.json()['id']}/cancel", headers=owner)


def _call(world: World, method: str, template: str, headers: dict[str, str]) -> Any:
    path = template.format(dataset_id=world.dataset, job_id=world.job, task=world.task, version=1)
    body = ROUTES[(method, template)].body
    kw: dict[str, Any] = {}
    if body == "upload":
        kw["files"] = {"file": ("other.csv", unique_csv())}
    elif body == "job":
        kw["json"] = {"task": "stolen", "train_dataset": world.dataset,
                      "method": {"name": "spafit", "n1": 1, "n2": 2, "rank": 2}}
    elif body == "archive":
        kw.update(content=world.archive, headers={"Content-Type": "application/zip"})
    elif body == "predict":
        kw["json"] = {"inputs": ["good"]}
    elif body == "fan_out":
        kw["json"] = {"tasks": [world.task], "inputs": ["good"]}
    kw["headers"] = {**kw.get("headers", {}), **headers}
    r = world.client.request(method, path, **kw)
    for leak in LEAKS:
        assert leak not in r.text, f"{method} {path} answered {r.status_code} with {leak!r}: {r.text[:500]}"
    assert r.status_code < 500, f"{method} {path}: {r.status_code} {r.text[:500]}"
    return r


def _assert_owner_untouched(world: World) -> None:
    c, h = world.client, world.owner
    assert c.get(f"/v1/datasets/{world.dataset}", headers=h).status_code == 200
    job = c.get(f"/v1/jobs/{world.job}", headers=h).json()
    assert job["status"] == "queued" and job["cancel_requested"] is False, job
    task = c.get(f"/v1/tasks/{world.task}", headers=h).json()
    assert task["version_count"] == 1 and task["active_version"]["version"] == 1, task


def test_every_route_is_classified():
    from app.main import create_app
    from app.settings import Settings

    assert sorted(ROUTES) == OPERATIONS, "give each new operation a Rule in ROUTES"
    app = create_app(Settings(_env_file=None, mode="server", database_url="postgresql://x@127.0.0.1:1/x",
                              broker_url="redis://127.0.0.1:1/0"))
    hidden = sorted(p for p, in_schema in _route_paths(app.routes) if not in_schema)
    unknown = [p for p in hidden if p not in STATIC_PUBLIC and not p.startswith("/dashboard/")]
    assert unknown == [], f"routes outside the OpenAPI document that the walk does not know: {unknown}"


@pytest.mark.parametrize("method, template", [op for op in OPERATIONS if ROUTES.get(op, Rule("x")).other != "public"])
def test_without_a_key_every_route_is_401(world, method, template):
    for headers in ({}, {"Authorization": "Bearer spafit_000000000000_nope"}, {"X-API-Key": "not-a-key"}):
        assert_problem(_call(world, method, template, headers), 401, "unauthorized")
    _assert_owner_untouched(world)


@pytest.mark.parametrize("method, template", OPERATIONS)
def test_another_tenants_key_never_reaches_the_owners_resources(world, db, method, template):
    rule = ROUTES[(method, template)]
    other = _key(db, _tenant(db), ["admin"])  # every scope: only the tenant differs
    r = _call(world, method, template, other)
    if rule.other == "hidden":
        assert_problem(r, 404, "not-found")
    elif rule.other == "listed":
        assert r.status_code == 200, r.text
        assert r.json()["items"] == []
    elif rule.other == "own":
        assert 200 <= r.status_code < 300, r.text
    else:
        assert r.status_code in (200, 503), r.text
    if rule.other != "public":  # (an id the caller sent may be echoed in a 404; nothing else of the owner's)
        secrets_ = world.private + ([world.dataset, world.job] if rule.other == "listed" else [])
        if rule.body == "archive":  # the caller sent the very bytes: their content address is no secret
            secrets_ = [x for x in secrets_ if x != world.private[3]]
        leaked = [x for x in secrets_ if x in r.text]
        assert not leaked, f"{method} {template} answered with the owner's {leaked}: {r.text[:500]}"
    _assert_owner_untouched(world)


@pytest.mark.parametrize("method, template", [op for op in OPERATIONS if ROUTES.get(op, Rule("x")).other != "public"])
def test_a_key_without_the_routes_scope_is_403(world, method, template):
    rule = ROUTES[(method, template)]
    for scope, headers in world.partial.items():
        if rule.scope == scope:
            continue  # allowed: that is what the owner's other tests do (and it may change the owner's data)
        r = _call(world, method, template, headers)
        if rule.scope is not None:
            problem = assert_problem(r, 403, "forbidden")
            assert problem["required_scope"] == rule.scope
        else:  # any key of the tenant reads it
            assert r.status_code == 200, f"{method} {template} with a {scope!r} key: {r.text}"
    _assert_owner_untouched(world)
