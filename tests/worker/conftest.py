"""An API app configured like the session's real Celery worker (tests/live.py), for the jobs tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.live import ROOT, WORKER_SETTINGS, WorkerProcess  # noqa: F401  (imported by other test folders)


@pytest.fixture
def job_app(make_settings: Callable[..., Any], tiny_base: str, worker: WorkerProcess) -> Any:
    from app.main import create_app

    return create_app(make_settings(allowed_base_models=[tiny_base], default_base_model=tiny_base,
                                    **WORKER_SETTINGS))


@pytest.fixture
def job_client(job_app: Any) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    with TestClient(job_app) as c:
        yield c
