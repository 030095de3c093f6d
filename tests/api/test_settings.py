"""Settings: embedded works with no environment at all; server mode refuses anything unsafe."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.main import create_app
from app.services.keys import LOCAL_TENANT_ID
from app.settings import Settings, get_settings

from .helpers import csv_bytes, upload


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    import os

    for name in list(os.environ):
        if name.startswith("SPAFIT_") and not name.startswith("SPAFIT_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_embedded_defaults_need_no_environment(no_env):
    s = Settings()
    assert s.mode == "embedded" and s.auth_enabled is False and s.auto_migrate is True
    assert s.data_dir == Path(".spafit")
    assert s.database_url == "sqlite:///.spafit/spafit.db"
    assert s.broker_url == "sqla+sqlite:///.spafit/broker.db"
    assert s.max_upload_bytes == 20 * 1024 * 1024 and s.max_request_bytes == 21 * 1024 * 1024
    assert (s.max_predict_inputs, s.job_max_attempts) == (64, 3)
    assert s.default_base_model == "sentence-transformers/all-MiniLM-L6-v2"


def test_settings_read_the_spafit_env_prefix(no_env, monkeypatch):
    monkeypatch.setenv("SPAFIT_DATA_DIR", "/srv/spafit")
    monkeypatch.setenv("SPAFIT_MAX_PREDICT_INPUTS", "8")
    monkeypatch.setenv("SPAFIT_CORS_ORIGINS", "https://a.example, https://b.example")
    s = Settings()
    assert s.database_url == "sqlite:////srv/spafit/spafit.db" and s.max_predict_inputs == 8
    assert s.cors_origins == ["https://a.example", "https://b.example"]


def test_server_mode_turns_auth_on_and_normalizes_postgres_urls(no_env):
    s = Settings(mode="server", database_url="postgresql://u@db/spafit", broker_url="redis://r:6379/0")
    assert s.auth_enabled is True and s.auto_migrate is False
    assert s.database_url == "postgresql+psycopg://u@db/spafit"


def test_server_mode_with_auth_off_refuses_to_start(no_env, monkeypatch):
    monkeypatch.setenv("SPAFIT_MODE", "server")
    monkeypatch.setenv("SPAFIT_AUTH_ENABLED", "false")
    monkeypatch.setenv("SPAFIT_DATABASE_URL", "postgresql://u@db/spafit")
    monkeypatch.setenv("SPAFIT_BROKER_URL", "redis://r:6379/0")
    get_settings.cache_clear()
    try:
        with pytest.raises(ValidationError, match="SPAFIT_AUTH_ENABLED=false is only allowed with SPAFIT_MODE=embedded"):
            create_app()  # no settings given: read from the environment
    finally:
        get_settings.cache_clear()

@pytest.mark.parametrize("overrides, message", [
    ({}, "server mode needs SPAFIT_DATABASE_URL"),
    ({"database_url": "sqlite:///x.db", "broker_url": "redis://r"}, "shared database"),
    ({"database_url": "postgresql://u@db/s"}, "server mode needs SPAFIT_BROKER_URL"),
    ({"database_url": "postgresql://u@db/s", "broker_url": "sqla+sqlite:///b.db"}, "shared broker"),
])
def test_server_mode_refuses_embedded_only_backends(no_env, overrides, message):
    with pytest.raises(ValidationError, match=message):
        Settings(mode="server", **overrides)


def test_every_setting_is_documented():
    missing = [name for name, f in Settings.model_fields.items() if not f.description]
    assert missing == []


def test_embedded_app_warns_that_auth_is_off_and_acts_as_the_local_tenant(no_env, caplog):
    settings = Settings(_env_file=None, preload_base_model=False)
    with caplog.at_level(logging.WARNING, logger="spafit"), TestClient(create_app(settings), base_url="http://localhost") as client:
        r = upload(client, csv_bytes(), "train.csv")  # no key at all
        assert r.status_code == 201, r.text
        assert client.get("/v1/datasets").json()["items"][0]["id"] == r.json()["id"]
        assert client.get("/readyz").status_code == 200
        assert client.app.state.db.engine.url.get_backend_name() == "sqlite"
        with client.app.state.db.session() as session:
            from app.models import Dataset

            assert session.get(Dataset, __import__("uuid").UUID(r.json()["id"])).tenant_id == LOCAL_TENANT_ID
    assert any("AUTH IS OFF" in rec.getMessage() for rec in caplog.records)
    assert (no_env / ".spafit" / "spafit.db").exists()


@pytest.mark.parametrize("name", ["tenant_rows_lease_s", "sse_slot_ttl_s", "sse_max_duration_s",
                                  "sse_ping_interval_s", "sse_poll_interval_s"])
def test_lease_and_interval_settings_have_an_upper_bound(no_env, name):
    with pytest.raises(ValidationError, match=name):  # 1e300 s would break Redis expiry calls
        Settings(_env_file=None, **{name: 1e300})


def test_a_tenant_share_over_the_whole_queue_is_clamped_to_it_with_a_warning(no_env, caplog):
    with caplog.at_level(logging.WARNING, logger="spafit.settings"):
        s = Settings(_env_file=None, batch_max_queue=100, batch_max_queue_per_tenant=512)
    assert s.batch_max_queue_per_tenant == 100
    assert any("clamped" in rec.getMessage() for rec in caplog.records)
