"""Every route, walked with every kind of key. The routes come from the app itself (`app.routes`, the static
mount and the pages outside the OpenAPI document included), so a route added later fails
`test_every_route_has_an_entry` until it is given a `Rule` here, and with it an expected status per scope.

ROUTES below is the access table; `expected(rule, scope)` turns it into route x scope -> status:

- public routes (health, docs, the dashboard's files) answer the same to everyone, key or not;
- no key (or a malformed, unknown one) is 401 on every other route;
- a key of the owner's tenant with a scope the route accepts (admin accepts everything) gets the route's
  success status, acting on fresh resources where the route changes or deletes something; any other scope is
  403 and changes nothing;
- a key of another tenant (with every scope) is 404 on the owner's resource, or a listing without the owner's
  items, or an action in the caller's own tenant.

The scopes mean (README "Scopes"): `predict` reads tasks and predicts; `train` manages datasets, jobs and the
adapters training produces (it reads tasks too); `admin` is everything, and the tenant's keys (tenants
themselves are made by an operator, with the CLI).

    python -m tests.reliability.test_route_walk    # prints the table as markdown (benchmarks/RELIABILITY.md)
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

SCOPES = ("predict", "train", "admin")  # the owner's keys, one scope each
CALLERS = (None, *SCOPES)  # None: no key at all
READ_TASKS = ("predict", "train")
TRAIN = ("train",)
PREDICT = ("predict",)
ADMIN_ONLY: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    """How an operation treats callers.
    other: "hidden" (404: the owner's resource does not exist for another tenant), "listed" (200, none of the
    owner's items), "own" (acts in the caller's own tenant), "public" (no key needed; same answer for all).
    scopes: the scopes it accepts besides admin (None: public). ok: its status when allowed.
    body: what to send (a key of `_call`'s bodies). fresh: the resources it needs made anew when it is allowed,
    because it changes or deletes them (a key of `_fresh`)."""

    other: str
    scopes: tuple[str, ...] | None
    ok: int = 200
    body: str | None = None
    fresh: str | None = None


PUBLIC = None
ROUTES: dict[tuple[str, str], Rule] = {
    ("GET", "/healthz"): Rule("public", PUBLIC),
    ("GET", "/readyz"): Rule("public", PUBLIC),
    ("GET", "/metrics"): Rule("public", PUBLIC, ok=404),  # server mode: closed without the scrape token
    ("GET", "/openapi.json"): Rule("public", PUBLIC),
    ("GET", "/docs"): Rule("public", PUBLIC),
    ("GET", "/docs/oauth2-redirect"): Rule("public", PUBLIC),
    ("GET", "/redoc"): Rule("public", PUBLIC),
    ("GET", "/"): Rule("public", PUBLIC, ok=307),
    ("GET", "/dashboard"): Rule("public", PUBLIC),
    ("GET", "/dashboard/"): Rule("public", PUBLIC, ok=307),
    ("GET", "/dashboard/assets/{path}"): Rule("public", PUBLIC),
    ("POST", "/v1/datasets"): Rule("own", TRAIN, 201, "upload"),
    ("GET", "/v1/datasets"): Rule("listed", TRAIN),
    ("GET", "/v1/datasets/{dataset_id}"): Rule("hidden", TRAIN),
    ("DELETE", "/v1/datasets/{dataset_id}"): Rule("hidden", TRAIN, 204, fresh="dataset"),
    ("POST", "/v1/jobs"): Rule("hidden", TRAIN, 202, "job"),  # on the owner's dataset
    ("GET", "/v1/jobs"): Rule("listed", TRAIN),
    ("GET", "/v1/jobs/{job_id}"): Rule("hidden", TRAIN),
    ("DELETE", "/v1/jobs/{job_id}"): Rule("hidden", TRAIN, 204, fresh="finished_job"),
    ("POST", "/v1/jobs/{job_id}/cancel"): Rule("hidden", TRAIN, fresh="job"),
    ("GET", "/v1/jobs/{job_id}/events"): Rule("hidden", TRAIN),
    ("POST", "/v1/batch-predictions"): Rule("hidden", TRAIN, 202, "batch"),  # on the owner's task and dataset
    ("GET", "/v1/batch-predictions"): Rule("listed", TRAIN),
    ("GET", "/v1/batch-predictions/{job_id}"): Rule("hidden", TRAIN, ok=404),  # world.job is a training job
    ("GET", "/v1/batch-predictions/{job_id}/results"): Rule("hidden", TRAIN, ok=404),
    ("POST", "/v1/tasks/{task}/versions/{version}/evaluate"): Rule("hidden", TRAIN, 202, "evaluate"),
    ("GET", "/v1/tasks"): Rule("listed", READ_TASKS),
    ("GET", "/v1/tasks/{task}"): Rule("hidden", READ_TASKS),
    ("DELETE", "/v1/tasks/{task}"): Rule("hidden", TRAIN, 204, fresh="task"),
    ("GET", "/v1/tasks/{task}/versions"): Rule("hidden", READ_TASKS),
    ("POST", "/v1/tasks/{task}/versions/{version}/activate"): Rule("hidden", TRAIN),  # v1 is active: a no-op
    ("GET", "/v1/tasks/{task}/adapter"): Rule("hidden", TRAIN),
    ("PUT", "/v1/tasks/{task}/adapter"): Rule("own", TRAIN, 201, "archive", fresh="task_name"),
    ("POST", "/v1/tasks/{task}/predict"): Rule("hidden", PREDICT, body="predict"),
    ("POST", "/v1/predict"): Rule("hidden", PREDICT, body="fan_out"),
    ("GET", "/v1/webhooks/secret"): Rule("own", ADMIN_ONLY),
    ("POST", "/v1/webhooks/secret"): Rule("own", ADMIN_ONLY),  # rotates the caller's own secret
    ("GET", "/v1/webhooks/deliveries"): Rule("listed", TRAIN),  # deliveries are about jobs
    ("GET", "/v1/usage"): Rule("own", READ_TASKS),  # the caller's own tenant's stored bytes
    ("GET", "/v1/keys"): Rule("own", ADMIN_ONLY),  # the caller's own tenant's keys
    ("POST", "/v1/keys"): Rule("own", ADMIN_ONLY, 201, "key"),
    ("DELETE", "/v1/keys/{key_id}"): Rule("hidden", ADMIN_ONLY, fresh="key"),  # revoke: 200 with the key
}
LEAKS = ("Traceback", 'File "', "sqlalchemy", "psycopg", "site-packages")


def expected(rule: Rule, scope: str | None) -> int:
    """The status a key with `scope` (None: no key) gets from an operation of the owner's tenant."""
    if rule.scopes is None:
        return rule.ok
    if scope is None:
        return 401
    return rule.ok if scope == "admin" or scope in rule.scopes else 403


def _server_app() -> Any:
    from app.main import create_app
    from app.settings import Settings

    return create_app(Settings(_env_file=None, mode="server", database_url="postgresql://x@127.0.0.1:1/x",
                               broker_url="redis://127.0.0.1:1/0"))


def app_routes(routes: Any) -> Iterator[tuple[str, str]]:
    """(method, path) of every route the app answers, inside included routers and mounts (a mount as
    `<path>/{path}`). HEAD, which Starlette adds to every GET, is the GET."""
    for r in routes:
        inner = getattr(r, "original_router", None)
        if inner is not None:
            yield from app_routes(inner.routes)
        elif getattr(r, "methods", None):
            for method in sorted(r.methods - {"HEAD"}):
                yield method, r.path
        elif hasattr(r, "path"):  # a Mount (static files): it answers GET below its path
            yield "GET", r.path + "/{path}"


APP = _server_app()
OPENAPI = APP.openapi()
OPERATIONS = sorted((m.upper(), p) for p, ops in OPENAPI["paths"].items() for m in ops)  # the documented ones
ALL_ROUTES = sorted(set(app_routes(APP.routes)))
KEYED = [op for op in ALL_ROUTES if ROUTES.get(op, Rule("x", ())).scopes is not None]
TABLE = [(m, p, scope, expected(ROUTES[(m, p)], scope)) for m, p in ALL_ROUTES if (m, p) in ROUTES for scope in CALLERS]


def markdown() -> str:
    """The access table as markdown: a row per route, a column per caller."""
    rows = ["| Route | no key | predict | train | admin |", "|---|---|---|---|---|"]
    for m, p in ALL_ROUTES:
        rule = ROUTES.get((m, p))
        cells = [str(expected(rule, s)) if rule else "?" for s in CALLERS]
        rows.append(f"| `{m} {p}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


@dataclass
class World:
    client: Any
    db: Any
    tenant: uuid.UUID
    owner: dict[str, str]  # headers of a key with train and predict
    owner_key: str  # its id: what the key routes are walked on (revoking it would fail every later check)
    keys: dict[str, dict[str, str]]  # headers of the owner's keys with one scope each
    dataset: str
    job: str
    task: str
    cfg: dict
    weights: bytes
    archive: bytes
    private: list[str]  # what only the owner may see: its tenant id, the dataset's name and hash, the blob's hash
    sent: list = field(default_factory=list)


def _key(db: Any, tenant_id: uuid.UUID, scopes: list[str]) -> dict[str, str]:
    return _key_row(db, tenant_id, scopes)[1]


def _key_row(db: Any, tenant_id: uuid.UUID, scopes: list[str]) -> tuple[Any, dict[str, str]]:
    from app.services import keys

    with db.session() as s:
        row, plaintext = keys.create_key(s, tenant_id, "walk", scopes)
    return row, {"Authorization": f"Bearer {plaintext}"}


def _tenant(db: Any) -> uuid.UUID:
    from app.services import keys

    with db.session() as s:
        return keys.create_tenant(s, f"walk-{secrets.token_hex(6)}").id


JOB_METHOD = {"name": "spafit", "n1": 1, "n2": 2, "rank": 2}


@pytest.fixture(scope="module")
def world(pg_url, db, redis_client, redis_url, redis_prefix, tmp_path_factory) -> Iterator[World]:
    base = tiny_backbone(tmp_path_factory.mktemp("walk-model"))
    with settings_factory(pg_url, redis_url, f"{redis_prefix}walk:", tmp_path_factory.mktemp("walk")) as make:
        settings = make(default_base_model=base, engine_device="cpu", job_requeue_interval_s=3600)
        with serve(settings) as client:
            sent: list = []
            client.app.state.send_job = sent.append  # the owner's jobs stay queued: no worker here
            tenant = _tenant(db)
            owner_row, owner = _key_row(db, tenant, ["train", "predict"])
            dataset = client.post("/v1/datasets", files={"file": ("walk.csv", unique_csv())}, headers=owner)
            assert dataset.status_code == 201, dataset.text
            job = client.post("/v1/jobs", json={"task": "walk", "train_dataset": dataset.json()["id"],
                                                "method": JOB_METHOD}, headers=owner)
            assert job.status_code == 202, job.text
            cfg, weights = random_adapter(base, SPAFIT, seed=11)
            version = register(db, tenant, "walk", cfg, weights)
            private = [str(tenant), dataset.json()["sha256"], "walk.csv", version.blob_sha256, str(version.id),
                       owner_row.prefix]
            yield World(client=client, db=db, tenant=tenant, owner=owner, owner_key=str(owner_row.id),
                        keys={s: _key(db, tenant, [s]) for s in SCOPES}, dataset=dataset.json()["id"],
                        job=job.json()["id"], task="walk", cfg=cfg, weights=weights, archive=pack(cfg, weights),
                        private=private, sent=sent)
            client.post(f"/v1/jobs/{job.json()['id']}/cancel", headers=owner)


def _fresh(world: World, kind: str) -> dict[str, Any]:
    """Path values naming new resources of the owner, for an allowed call that changes or deletes them."""
    c, h = world.client, world.owner
    if kind == "dataset":
        r = c.post("/v1/datasets", files={"file": ("fresh.csv", unique_csv())}, headers=h)
        assert r.status_code == 201, r.text
        return {"dataset_id": r.json()["id"]}
    if kind in ("job", "finished_job"):
        r = c.post("/v1/jobs", json={"task": f"fresh-{secrets.token_hex(3)}", "train_dataset": world.dataset,
                                     "method": JOB_METHOD}, headers=h)
        assert r.status_code == 202, r.text
        if kind == "finished_job":  # a queued job is cancelled at once: final, so it may be deleted
            assert c.post(f"/v1/jobs/{r.json()['id']}/cancel", headers=h).json()["status"] == "cancelled"
        return {"job_id": r.json()["id"]}
    if kind == "key":
        return {"key_id": str(_key_row(world.db, world.tenant, ["predict"])[0].id)}
    name = f"fresh-{secrets.token_hex(4)}"
    if kind == "task":
        register(world.db, world.tenant, name, world.cfg, world.weights)
    return {"task": name}


def _call(world: World, method: str, template: str, headers: dict[str, str], **path: Any) -> Any:
    values = {"dataset_id": world.dataset, "job_id": world.job, "task": world.task, "version": 1,
              "key_id": world.owner_key, "path": "app.js", **path}
    url = template.format(**values)
    body = ROUTES[(method, template)].body
    kw: dict[str, Any] = {}
    if body == "upload":
        kw["files"] = {"file": ("other.csv", unique_csv())}
    elif body == "job":
        kw["json"] = {"task": "stolen", "train_dataset": world.dataset, "method": JOB_METHOD}
    elif body == "batch":
        kw["json"] = {"task": world.task, "dataset": world.dataset}
    elif body == "evaluate":
        kw["json"] = {"dataset": world.dataset}
    elif body == "archive":
        kw.update(content=world.archive, headers={"Content-Type": "application/zip"})
    elif body == "predict":
        kw["json"] = {"inputs": ["good"]}
    elif body == "fan_out":
        kw["json"] = {"tasks": [world.task], "inputs": ["good"]}
    elif body == "key":
        kw["json"] = {"name": "walk-made", "scopes": ["admin"]}
    kw["headers"] = {**kw.get("headers", {}), **headers}
    r = world.client.request(method, url, follow_redirects=False, **kw)
    for leak in LEAKS:
        assert leak not in r.text, f"{method} {url} answered {r.status_code} with {leak!r}: {r.text[:500]}"
    assert r.status_code < 500, f"{method} {url}: {r.status_code} {r.text[:500]}"
    return r


def _assert_owner_untouched(world: World) -> None:
    c, h = world.client, world.owner
    assert c.get(f"/v1/datasets/{world.dataset}", headers=h).status_code == 200  # (the owner's key still works)
    job = c.get(f"/v1/jobs/{world.job}", headers=h).json()
    assert job["status"] == "queued" and job["cancel_requested"] is False, job
    task = c.get(f"/v1/tasks/{world.task}", headers=h).json()
    assert task["version_count"] == 1 and task["active_version"]["version"] == 1, task


def test_every_route_has_an_entry():
    missing = [op for op in ALL_ROUTES if op not in ROUTES]
    assert missing == [], f"give each new route a Rule in ROUTES (and so an expected status per scope): {missing}"
    stale = sorted(set(ROUTES) - set(ALL_ROUTES))
    assert stale == [], f"ROUTES names routes the app no longer has: {stale}"
    assert set(OPERATIONS) <= set(ALL_ROUTES)


def test_the_table_gives_each_scope_only_its_own_routes():
    """What each scope may do, read back from the table: predict only reads tasks (and its tenant's usage) and
    predicts; train never predicts; admin does everything."""
    allowed = {s: {(m, p) for m, p, scope, status in TABLE if scope == s and status != 403
                   and ROUTES[(m, p)].scopes is not None} for s in SCOPES}
    assert allowed["predict"] == {("GET", "/v1/tasks"), ("GET", "/v1/tasks/{task}"),
                                  ("GET", "/v1/tasks/{task}/versions"), ("POST", "/v1/tasks/{task}/predict"),
                                  ("POST", "/v1/predict"), ("GET", "/v1/usage")}
    assert not any(p.endswith("predict") for _, p in allowed["train"])
    assert all(p.startswith(("/v1/datasets", "/v1/jobs", "/v1/tasks", "/v1/webhooks/deliveries",
                              "/v1/batch-predictions", "/v1/usage"))
               for _, p in allowed["train"])
    assert allowed["admin"] == set(KEYED)


@pytest.mark.parametrize("method, template, scope, status", TABLE)
def test_route_answers_each_scope_as_the_table_says(world, method, template, scope, status):
    rule = ROUTES[(method, template)]
    headers = world.keys[scope] if scope else {}
    path = _fresh(world, rule.fresh) if rule.fresh and status == rule.ok and rule.scopes is not None else {}
    r = _call(world, method, template, headers, **path)
    assert r.status_code == status, f"{method} {template} with {scope or 'no'} key: {r.status_code} {r.text[:300]}"
    if status == 403:
        problem = assert_problem(r, 403, "forbidden")
        assert problem["required_scope"] == (rule.scopes or ("admin",))[0]
        assert set(problem["accepted_scopes"]) == set(rule.scopes or ("admin",))
    elif status == 401:
        assert_problem(r, 401, "unauthorized")
    _assert_owner_untouched(world)


@pytest.mark.parametrize("method, template", KEYED)
def test_a_bad_key_is_401_everywhere(world, method, template):
    for headers in ({"Authorization": "Bearer spafit_000000000000_nope"}, {"X-API-Key": "not-a-key"},
                    {"Authorization": "Basic dXNlcjpwYXNz"}):
        assert_problem(_call(world, method, template, headers), 401, "unauthorized")
    _assert_owner_untouched(world)


@pytest.mark.parametrize("method, template", ALL_ROUTES)
def test_another_tenants_key_never_reaches_the_owners_resources(world, db, method, template):
    rule = ROUTES[(method, template)]
    other = _key(db, _tenant(db), ["admin"])  # every scope: only the tenant differs
    r = _call(world, method, template, other, **({"task": f"x-{secrets.token_hex(4)}"} if rule.fresh == "task_name"
                                                  else {}))
    if rule.other == "hidden":
        assert_problem(r, 404, "not-found")
    elif rule.other == "listed":
        assert r.status_code == 200, r.text
        assert r.json()["items"] == []
    elif rule.other == "own":
        assert r.status_code == rule.ok, r.text
    else:
        assert r.status_code == rule.ok, r.text
    if rule.other != "public":  # (an id the caller sent may be echoed in a 404; nothing else of the owner's)
        secrets_ = world.private + ([world.dataset, world.job] if rule.other == "listed" else [])
        if rule.body == "archive":  # the caller sent the very bytes: their content address is no secret
            secrets_ = [x for x in secrets_ if x != world.private[3]]
        leaked = [x for x in secrets_ if x in r.text]
        assert not leaked, f"{method} {template} answered with the owner's {leaked}: {r.text[:500]}"
    _assert_owner_untouched(world)


if __name__ == "__main__":
    print(markdown())
