"""Every error is problem+json (RFC 9457), mapped in one place (app/errors.py)."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from app.errors import NotFound
from app.main import create_app
from spafit_core.errors import ConfigError, DataError

from .helpers import assert_problem


@pytest.fixture
def app_with_failures(settings):
    app = create_app(settings)

    @app.get("/test/boom")
    def boom() -> None:
        raise RuntimeError("secret internals: password=hunter2")

    @app.get("/test/config")
    def config() -> None:
        raise ConfigError("rank must be an integer >= 1; got 0", field="method.rank")

    @app.get("/test/data")
    def data() -> None:
        raise DataError("line 7: bad row", detail={"errors": [{"line": 7, "message": "bad row"}], "rows": 9})

    @app.get("/test/app")
    def app_error() -> None:
        raise NotFound("task 'x' not found")

    @app.get("/test/backbone")
    def backbone() -> None:  # as the engine raises it when the deployment's model folder broke
        from spafit_core.model import loading

        with loading("/srv/secret-models/minilm"):
            raise OSError("It looks like the config file at '/srv/secret-models/minilm/config.json' is not valid")

    return app


def test_spafit_error_maps_to_its_status_and_stable_type(app_with_failures):
    with TestClient(app_with_failures) as client:
        body = assert_problem(client.get("/test/config"), 422, "invalid-config")
        assert body == {"type": "https://spafit.dev/problems/invalid-config", "title": "Invalid config",
                        "status": 422, "detail": "rank must be an integer >= 1; got 0", "instance": "/test/config",
                        "field": "method.rank"}
        body = assert_problem(client.get("/test/data"), 422, "invalid-dataset")
        assert body["errors"] == [{"line": 7, "message": "bad row"}] and body["rows"] == 9
        assert_problem(client.get("/test/app"), 404, "not-found")


def test_unexpected_exception_is_500_without_internals_and_is_logged(app_with_failures, caplog):
    with TestClient(app_with_failures, raise_server_exceptions=False) as client, caplog.at_level(logging.ERROR):
        r = client.get("/test/boom", headers={"X-Request-ID": "req-123"})
    body = assert_problem(r, 500, "internal-error")
    assert "hunter2" not in r.text and "Traceback" not in r.text and "RuntimeError" not in r.text
    assert body["reference"] == "req-123"
    assert any("req-123" in rec.getMessage() and rec.exc_info for rec in caplog.records)


def test_a_backbone_the_service_cannot_load_is_a_500_that_names_no_path(app_with_failures, caplog):
    """BaseModelUnavailable is invalid input to the CLI (the user's own machine), but in the service it is the
    deployment's model store: a 500 with a reference, the paths only in the log."""
    with TestClient(app_with_failures, raise_server_exceptions=False) as client, caplog.at_level(logging.ERROR):
        r = client.get("/test/backbone", headers={"X-Request-ID": "req-456"})
    assert assert_problem(r, 500, "internal-error")["reference"] == "req-456"
    assert "secret-models" not in r.text and "base-model-unavailable" not in r.text
    assert any("req-456" in rec.getMessage() and "secret-models" in str(rec.exc_info[1]) for rec in caplog.records)


def test_validation_error_lists_each_location_and_message(client, tenant_key):
    r = client.get("/v1/datasets", params={"limit": 0}, headers=tenant_key("train").headers)
    body = assert_problem(r, 422, "validation-error")
    assert body["errors"] == [{"field": "query.limit", "message": "Input should be greater than or equal to 1",
                               "type": "greater_than_equal"}]
    assert "query.limit" in body["detail"]


def test_nested_body_error_location_is_dotted(client, tenant_key):
    r = client.post("/v1/datasets", json={"hf": {"name": "imdb", "split": 5}}, headers=tenant_key("train").headers)
    body = assert_problem(r, 422, "validation-error")
    assert [e["field"] for e in body["errors"]] == ["body.hf.split"]


def test_unknown_route_and_wrong_method_are_problems(client):
    assert_problem(client.get("/v1/nope"), 404, "not-found")
    assert_problem(client.put("/healthz"), 405)


def test_database_unreachable_is_503_with_retry_after(make_settings):
    settings = make_settings(database_url="postgresql+psycopg://postgres@127.0.0.1:1/nope",
                             database_connect_timeout=2)
    with TestClient(create_app(settings)) as client:
        r = client.get("/v1/datasets", headers={"Authorization": "Bearer spafit_abcdefabcdef_secret"})
    body = assert_problem(r, 503, "database-unavailable")
    assert r.headers["retry-after"].isdigit()
    assert "127.0.0.1" not in r.text and "psycopg" not in body["detail"]
