"""Fixtures shared by the API tests (the suite-wide ones are in tests/conftest.py and tests/live.py)."""

from __future__ import annotations

import pytest


@pytest.fixture
def held(make_settings, tiny_base):
    """An API app on the tiny base model whose job messages are recorded, not sent: no trial ever runs."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.worker.conftest import WORKER_SETTINGS

    app = create_app(make_settings(allowed_base_models=[tiny_base], default_base_model=tiny_base,
                                   **{**WORKER_SETTINGS, "job_requeue_interval_s": 3600.0,
                                      "max_active_jobs_per_tenant": 4}))
    app.state.sent = []
    with TestClient(app) as c:
        app.state.send_job = app.state.sent.append
        yield c


QUOTA = 4000  # the storage quota of `quota_client`'s tenants, in bytes


@pytest.fixture
def quota_client(make_settings, tiny_base):
    """A server-mode app with a QUOTA-byte storage quota per tenant; job and import messages are recorded, not sent."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    app = create_app(make_settings(tenant_max_stored_bytes=QUOTA, allowed_base_models=[tiny_base],
                                   default_base_model=tiny_base, job_requeue_interval_s=3600.0))
    app.state.sent = []
    with TestClient(app) as c:
        app.state.send_job = app.state.sent.append
        app.state.send_import = app.state.sent.append
        yield c


# The predict fast path's parity tests (test_fast_path*.py): two apps on one database and one tiny backbone, the
# fast path on in the first only, and one adapter to register.
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from .adapters import tiny_backbone

    return tiny_backbone(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def apps(pg_url, redis_client, redis_url, redis_prefix, tmp_path_factory, base):
    """(fast, stack): `adapters.fast_and_stack`, once per module."""
    from .adapters import fast_and_stack

    with fast_and_stack(pg_url, redis_url, redis_prefix, tmp_path_factory, base) as both:
        yield both


@pytest.fixture(scope="module")
def adapter(base):
    from .adapters import SPAFIT, random_adapter

    return random_adapter(base, SPAFIT, seed=11)
