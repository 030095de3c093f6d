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
