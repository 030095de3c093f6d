"""/healthz, /readyz (real database query, real broker ping, pluggable checks) and /metrics."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.main import create_app

from .helpers import assert_problem, unique_csv, upload


def test_healthz_is_200_without_auth(client):
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_is_green_with_real_database_and_redis(client):
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ready"
    assert set(body["checks"]) == {"database", "broker", "engine"} and all(c["ok"] for c in body["checks"].values())


def test_readyz_is_503_naming_the_database_when_its_port_is_dead(make_settings):
    settings = make_settings(database_url="postgresql+psycopg://postgres@127.0.0.1:1/nope", database_connect_timeout=2)
    with TestClient(create_app(settings)) as client:
        r = client.get("/readyz")
    body = assert_problem(r, 503, "not-ready")
    assert body["checks"]["database"]["ok"] is False and body["checks"]["database"]["error"]
    assert body["checks"]["broker"]["ok"] is True
    assert "database" in body["detail"] and "broker" not in body["detail"]


def test_readyz_is_503_naming_the_broker_when_redis_is_dead(make_settings):
    with TestClient(create_app(make_settings(broker_url="redis://127.0.0.1:1/0", readiness_timeout=1.0))) as client:
        body = assert_problem(client.get("/readyz"), 503, "not-ready")
    assert body["checks"]["broker"]["ok"] is False and body["checks"]["database"]["ok"] is True


def test_readyz_fails_when_the_schema_is_not_migrated(make_settings, empty_pg_url):
    with TestClient(create_app(make_settings(database_url=empty_pg_url))) as client:
        body = assert_problem(client.get("/readyz"), 503, "not-ready")
    assert "spafit db upgrade" in body["checks"]["database"]["error"]


def test_readiness_checks_are_pluggable(app):
    def engine_check() -> None:
        raise RuntimeError("backbone not loaded")

    app.state.readiness.add("engine", engine_check)
    with TestClient(app) as client:
        body = assert_problem(client.get("/readyz"), 503, "not-ready")
    assert body["checks"]["engine"] == {"ok": False, "duration_ms": body["checks"]["engine"]["duration_ms"],
                                        "error": "RuntimeError: backbone not loaded"}
    assert body["detail"] == "not ready: engine failed"


def test_metrics_expose_latency_by_route_template_and_status(make_settings, tenant_key):
    token = "scrape-" + "x" * 20  # server mode serves /metrics on the API port only with the scrape token
    key = tenant_key("train")
    with TestClient(create_app(make_settings(metrics_token=token))) as client:
        created = upload(client, unique_csv(), headers=key.headers).json()
        client.get(f"/v1/datasets/{created['id']}", headers=key.headers)
        client.get("/no/such/path")
        r = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert "# TYPE spafit_http_request_duration_seconds histogram" in text
    assert 'spafit_http_request_duration_seconds_count{method="GET",route="/v1/datasets/{dataset_id}",status="200"} 1.0' in text
    assert 'route="/v1/datasets",status="201"' in text
    assert 'route="<unmatched>",status="404"' in text
    assert created["id"] not in text  # templates, never raw paths


def test_each_app_has_its_own_metrics_registry(settings):
    first, second = create_app(settings), create_app(settings)
    assert first.state.metrics.registry is not second.state.metrics.registry
