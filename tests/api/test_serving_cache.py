"""The predict path's caches (app/services/cache.py) against the real thing: two API processes on one Postgres
database, where an activation, a deletion or a key revocation made through one (or from a third process) is
served by the other within a second; an in-process app whose warm predict path sends no query at all; a key
cache that never lets a wrong key in; an SQLite database whose caches follow another process's commits."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import event, text

from tests.live import ApiProcess, subprocess_env

from .adapters import LORA, SPAFIT, random_adapter, register, serve, tiny_backbone
from .helpers import assert_problem

WITHIN_S = 1.0  # the bound: a change anywhere is served everywhere within a second


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("tiny-cache"))


@pytest.fixture(scope="module")
def versions(base):
    return [random_adapter(base, SPAFIT, seed=11), random_adapter(base, LORA, seed=12)]


@pytest.fixture(scope="module")
def replicas(worker_env, base, tmp_path_factory) -> Iterator[tuple[ApiProcess, ApiProcess]]:
    """Two API processes (server mode, auth on) on the session's database: replicas behind a balancer."""
    env = subprocess_env(worker_env, SPAFIT_DEFAULT_BASE_MODEL=base, SPAFIT_ALLOWED_BASE_MODELS=base,
                         SPAFIT_PRELOAD_BASE_MODEL="true", SPAFIT_LOG_LEVEL="WARNING")
    root = tmp_path_factory.mktemp("replicas")
    a = ApiProcess(env, root / "a.log").launch()
    b = ApiProcess(env, root / "b.log").launch()
    try:
        yield a.wait_ready(120), b.wait_ready(120)
    finally:
        a.stop()
        b.stop()


def _predict(url: str, key: Any, task: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/tasks/{task}/predict", json={"inputs": ["a fine film"]}, headers=key.headers,
                      timeout=30)


def _until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> float:
    """Seconds until `check()` holds (polling every 20 ms); fails after `timeout`."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"{what} did not happen within {timeout}s"
        time.sleep(0.02)
    return time.monotonic() - start


def test_a_version_activated_through_one_replica_is_served_by_the_other_within_a_second(replicas, tenant_key, db,
                                                                                     versions):
    a, b = replicas
    key = tenant_key("train", "predict")
    register(db, key.tenant_id, "swap", *versions[0])
    register(db, key.tenant_id, "swap", *versions[1], activate=False)
    for url in (a.url, b.url):  # both caches hold version 1 now
        for _ in range(3):
            r = _predict(url, key, "swap")
            assert r.status_code == 200 and r.json()["version"] == 1, r.text
    r = httpx.post(f"{a.url}/v1/tasks/swap/versions/2/activate", headers=key.headers, timeout=30)
    assert r.status_code == 200, r.text
    took = _until(lambda: _predict(b.url, key, "swap").json()["version"] == 2, "replica B serving version 2")
    assert took < WITHIN_S, took
    assert _predict(a.url, key, "swap").json()["version"] == 2  # the replica that activated: at once
    for _ in range(5):  # and it stays there (no stale entry written back by a racing read)
        assert _predict(b.url, key, "swap").json()["version"] == 2


def test_a_version_a_worker_process_registers_is_served_by_every_replica_within_a_second(replicas, tenant_key, db,
                                                                                       versions, worker_env):
    """The worker's path: another process that imports only the registry (not the API) registers and activates
    the task's next version, as a finished job does."""
    import subprocess
    import sys

    a, b = replicas
    key = tenant_key("predict")
    register(db, key.tenant_id, "retrained", *versions[0])
    for url in (a.url, b.url):
        assert _predict(url, key, "retrained").json()["version"] == 1
    cfg, weights = versions[1]
    code = ("import json, sys, uuid; from app.db import Database; from app.services import registry;"
            "db = Database.from_url(sys.argv[1]); s = db.session();"
            "registry.register_version(s, uuid.UUID(sys.argv[2]), 'retrained', json.loads(sys.argv[3]),"
            " sys.stdin.buffer.read(), activate=True); s.commit(); s.close(); db.dispose()")
    subprocess.run([sys.executable, "-c", code, worker_env["SPAFIT_DATABASE_URL"], str(key.tenant_id),
                    json.dumps(cfg)], input=weights, check=True, env=subprocess_env(), timeout=60)
    took = max(_until(lambda u=url: _predict(u, key, "retrained").json()["version"] == 2, f"{url} serving v2")
               for url in (a.url, b.url))
    assert took < WITHIN_S, took


def test_a_task_deleted_through_one_replica_is_gone_from_the_other_within_a_second(replicas, tenant_key, db,
                                                                                versions):
    a, b = replicas
    key = tenant_key("train", "predict")
    register(db, key.tenant_id, "doomed", *versions[0])
    assert _predict(b.url, key, "doomed").status_code == 200
    assert httpx.delete(f"{a.url}/v1/tasks/doomed", headers=key.headers, timeout=30).status_code == 204
    took = _until(lambda: _predict(b.url, key, "doomed").status_code == 404, "replica B answering 404")
    assert took < WITHIN_S, took
    assert_problem(_predict(b.url, key, "doomed"), 404)


def test_a_key_revoked_elsewhere_is_refused_by_every_replica_within_a_second(replicas, tenant_key, db, versions):
    from app.services import keys

    a, b = replicas
    key = tenant_key("predict")
    register(db, key.tenant_id, "guarded", *versions[0])
    for url in (a.url, b.url):
        assert _predict(url, key, "guarded").status_code == 200  # both caches hold the key now
    with db.session() as session:  # a third process (the CLI's `keys revoke` does this)
        keys.revoke_key(session, key.tenant_id, key.key_id)
    took = max(_until(lambda u=url: _predict(u, key, "guarded").status_code == 401, f"{url} refusing the key")
               for url in (a.url, b.url))
    assert took < WITHIN_S, took


# ------------------------------------------------------------------------------------------ in process
@pytest.fixture(scope="module")
def served(pg_url, redis_client, redis_url, redis_prefix, tmp_path_factory, base):
    from .adapters import settings_factory

    with settings_factory(pg_url, redis_url, redis_prefix, tmp_path_factory.mktemp("cache-data")) as make:
        with serve(make(default_base_model=base, engine_device="cpu", preload_base_model=True)) as client:
            yield client


def _queries(client: Any) -> list[str]:
    seen: list[str] = []
    event.listen(client.app.state.db.engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    return seen


def test_a_warm_predict_sends_no_query_to_the_database(served, tenant_key, db, versions):
    key = tenant_key("predict")
    register(db, key.tenant_id, "warm", *versions[0])
    assert served.post("/v1/tasks/warm/predict", json={"inputs": ["x"]}, headers=key.headers).status_code == 200
    _until(lambda: served.serving.cache.ready, "the cache listener connecting")
    served.post("/v1/tasks/warm/predict", json={"inputs": ["x"]}, headers=key.headers)  # cached from here
    seen = _queries(served)
    for _ in range(5):
        r = served.post("/v1/tasks/warm/predict", json={"inputs": ["good", "bad"]}, headers=key.headers)
        assert r.status_code == 200 and r.json()["version"] == 1
    assert seen == []  # neither the key nor the active version was read again


def test_the_answer_has_every_field_of_the_response_model(served, tenant_key, db, versions):
    from app.schemas import TaskPredictions

    key = tenant_key("predict")
    register(db, key.tenant_id, "shape", *versions[0])
    r = served.post("/v1/tasks/shape/predict", json={"inputs": ["x", "y"], "top_k": 1}, headers=key.headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert TaskPredictions.model_validate(body).model_dump(mode="json") == body  # nothing missing or extra
    assert all(p["labels"] is None and p["value"] is None and len(p["scores"]) == 1 for p in body["predictions"])


def test_a_cached_key_lets_no_other_secret_in(served, tenant_key, db, versions):
    key = tenant_key("predict")
    register(db, key.tenant_id, "locked", *versions[0])
    assert served.post("/v1/tasks/locked/predict", json={"inputs": ["x"]}, headers=key.headers).status_code == 200
    prefix = "_".join(key.key.split("_", 2)[:2])  # spafit_<prefix>: the row the wrong secrets point at
    for wrong in (prefix + "_" + "A" * 43, key.key + "x", key.key[:-1], key.key.upper()):
        for _ in range(2):  # a failure is not remembered either way
            r = served.post("/v1/tasks/locked/predict", json={"inputs": ["x"]},
                            headers={"Authorization": f"Bearer {wrong}"})
            assert_problem(r, 401)
    assert served.post("/v1/tasks/locked/predict", json={"inputs": ["x"]}, headers=key.headers).status_code == 200


def test_a_lost_listener_turns_the_cache_off_rather_than_serving_stale_versions(served, tenant_key, db, versions):
    from app.services import cache, registry

    key = tenant_key("predict")
    register(db, key.tenant_id, "flaky", *versions[0])
    register(db, key.tenant_id, "flaky", *versions[1], activate=False)
    ask = lambda: served.post("/v1/tasks/flaky/predict", json={"inputs": ["x"]}, headers=key.headers)  # noqa: E731
    _until(lambda: served.serving.cache.ready, "the cache listener connecting")
    assert ask().json()["version"] == 1
    with db.session() as session:
        killed = session.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                                      "application_name = :n AND datname = current_database()"),
                                 {"n": cache.APPLICATION_NAME}).all()
        assert killed, "no listener connection found"
        registry.activate(session, key.tenant_id, "flaky", 2)  # possibly while nobody listens
    took = _until(lambda: ask().json()["version"] == 2, "version 2 served after the listener was lost")
    assert took < WITHIN_S + 1.0, took  # the lost connection is noticed within a second of silence
    _until(lambda: served.serving.cache.ready, "the listener reconnecting")
    assert ask().json()["version"] == 2


def test_sqlite_caches_follow_another_process_commits(tmp_path, base, versions, monkeypatch):
    """Embedded mode: the worker (another process) activates a version in the SQLite file; the API's cache
    notices through `PRAGMA data_version` within a second."""
    import subprocess
    import sys

    from app.services import keys, migrate
    from app.settings import Settings

    for name in [n for n in os.environ if n.startswith("SPAFIT_") and not n.startswith("SPAFIT_TEST_")]:
        monkeypatch.delenv(name)
    url = f"sqlite:///{tmp_path / 'spafit.db'}"
    migrate.upgrade(url)
    from app.db import Database

    sdb = Database.from_url(url)
    with sdb.session() as s:
        tenant = keys.ensure_local_tenant(s).id
    register(sdb, tenant, "local", *versions[0])
    register(sdb, tenant, "local", *versions[1], activate=False)
    sdb.dispose()
    settings = Settings(_env_file=None, mode="embedded", database_url=url, data_dir=tmp_path, default_base_model=base,
                        engine_device="cpu", preload_base_model=True,
                        insecure_bind=True, allowed_hosts=["testserver"])  # the TestClient is no loopback
    with serve(settings) as client:
        ask = lambda: client.post("/v1/tasks/local/predict", json={"inputs": ["x"]}).json().get("version", 0)  # noqa: E731
        r = client.post("/v1/tasks/local/predict", json={"inputs": ["x"]})
        assert r.status_code == 200, r.text
        _until(lambda: client.serving.cache.ready, "the SQLite poller starting")
        assert ask() == 1 and ask() == 1
        code = ("import uuid,sys; from app.db import Database; from app.services import registry;"
                "db=Database.from_url(sys.argv[1]); s=db.session();"
                "registry.activate(s, uuid.UUID(sys.argv[2]), 'local', 2); s.close(); db.dispose()")
        subprocess.run([sys.executable, "-c", code, url, str(tenant)], check=True, env=subprocess_env(),
                       timeout=60)
        took = _until(lambda: ask() == 2, "version 2 served after another process activated it")
        assert took < WITHIN_S, took


def test_the_cache_is_bounded_and_drops_a_read_that_raced_an_invalidation():
    from app.services.cache import Invalidation

    cache = Invalidation("sqlite://", max_entries=3)
    cache.ready = True  # as once its listener runs
    for i in range(5):
        cache.put(i, f"v{i}", cache.generation)
    assert len(cache) == 3 and cache.get(0) is None and cache.get(4) == "v4"  # the oldest went first
    generation = cache.generation  # a request starts reading the database...
    cache.bump()  # ...an activation lands meanwhile...
    cache.put("task", "stale", generation)  # ...and what it read is not kept
    assert cache.get("task") is None and len(cache) == 0
    cache.ready = False  # no listener: nothing is kept at all
    cache.put("task", "fresh", cache.generation)
    assert cache.get("task") is None
