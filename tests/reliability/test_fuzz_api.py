"""Schemathesis against the service's own OpenAPI document, in-process (ASGI), with a real key, a real
Postgres registry and a tiny served backbone. Per operation, a bounded number of generated requests, both
valid for the schema (positive), deliberately invalid (negative), valid on the tenant's real resources
(real), with no key (anonymous: whatever auth headers the generator makes up, never a real key) and with a
predict-only key: no answer is a 5xx, every answer's status code is documented and its body and content type
conform to the document; an anonymous request never gets past auth (401 on every keyed route), and a predict
key never past the scope check of a route it may not use (403; 401 where the generator sent its own auth header).

The examples are derandomized (the same every run, so CI is stable); SPAFIT_FUZZ_EXAMPLES raises the count
and SPAFIT_FUZZ_RANDOM=1 explores new ones:

    SPAFIT_FUZZ_EXAMPLES=500 SPAFIT_FUZZ_RANDOM=1 python -m pytest tests/reliability/test_fuzz_api.py
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python.asgi import HOST, ASGIClient

from tests.api.adapters import SPAFIT, random_adapter, register, serve, settings_factory, tiny_backbone
from tests.api.helpers import unique_csv

from .test_route_walk import OPENAPI, OPERATIONS, ROUTES, _key, _tenant

schemathesis.serializer.alias("application/zip", "application/octet-stream")  # adapter archives: raw bytes
EXAMPLES = int(os.environ.get("SPAFIT_FUZZ_EXAMPLES", "25"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
LEAKS = ("Traceback", 'File "', "sqlalchemy", "psycopg", "site-packages")


@pytest.fixture(scope="module")
def fuzz(pg_url, db, redis_client, redis_url, redis_prefix, tmp_path_factory) -> Iterator[dict[str, Any]]:
    base = tiny_backbone(tmp_path_factory.mktemp("fuzz-model"))
    with settings_factory(pg_url, redis_url, f"{redis_prefix}fuzz:", tmp_path_factory.mktemp("fuzz")) as make:
        settings = make(default_base_model=base, engine_device="cpu", job_requeue_interval_s=3600)
        with serve(settings) as client:
            client.app.state.send_job = lambda job_id: None  # jobs stay queued: no broker traffic from the fuzz
            tenant = _tenant(db)
            headers = _key(db, tenant, ["admin"])
            predict_headers = _key(db, tenant, ["predict"])
            dataset = client.post("/v1/datasets", files={"file": ("fuzz.csv", unique_csv())}, headers=headers)
            assert dataset.status_code == 201, dataset.text
            job = client.post("/v1/jobs", json={"task": "fuzz", "train_dataset": dataset.json()["id"]},
                              headers=headers)
            assert job.status_code == 202, job.text
            register(db, tenant, "fuzz", *random_adapter(base, SPAFIT, seed=3))
            # The document as served, and an in-process session that does NOT run the app's lifespan: the
            # TestClient above holds the one lifespan (schemathesis would start a second one and stop it, and
            # with it the engine, after each test).
            schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
            session = ASGIClient(client.app)
            real = {"dataset_id": dataset.json()["id"], "job_id": job.json()["id"], "task": "fuzz", "version": 1}
            yield {"schema": schema, "headers": headers, "predict_headers": predict_headers, "session": session,
                   "real": real}


# "real": valid requests whose path names the tenant's real dataset, job, task and version, so the generated
# bodies and queries reach the handlers instead of stopping at a 404. DELETE is left out: it would remove them.


PUBLIC = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")}  # no key needed (metrics: 404 here)


def _applies(method: str, path: str, mode: str) -> bool:
    operation = OPENAPI["paths"][path][method.lower()]
    if mode == "negative":  # an operation with no parameters and no body has no invalid form
        return bool(operation.get("parameters") or operation.get("requestBody"))
    if mode == "real":
        return "{" in path and method != "DELETE"
    return True


CASES = [(m, p, mode) for m, p in OPERATIONS for mode in ("positive", "negative", "real", "anonymous", "predict-key")
         if _applies(m, p, mode)]
# What a predict-only key may reach (the rest is 403 before any body is read): see test_route_walk.ROUTES.
PREDICT_SCOPE = {(m, p) for (m, p), rule in ROUTES.items() if rule.scopes is not None and "predict" in rule.scopes}


@pytest.mark.parametrize("method, path, mode", CASES)
def test_generated_requests_get_documented_non_5xx_answers(fuzz, method, path, mode, measure):
    operation = fuzz["schema"][path][method]
    headers = {"anonymous": {}, "predict-key": fuzz["predict_headers"]}.get(mode, fuzz["headers"])
    if mode in ("anonymous", "predict-key"):
        strategy = operation.as_strategy(generation_mode=GenerationMode.POSITIVE)
    elif mode == "real":
        names = {p.name for p in operation.path_parameters}
        strategy = operation.as_strategy(path_parameters={n: fuzz["real"][n] for n in names})
    else:
        strategy = operation.as_strategy(generation_mode=GenerationMode(mode))

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              derandomize=not os.environ.get("SPAFIT_FUZZ_RANDOM"))
    @given(case=strategy)
    def check(case: Any) -> None:
        calls.append(1)
        response = case.call_and_validate(base_url=f"http://{HOST}", session=fuzz["session"], headers=headers,
                                          checks=CHECKS)
        for leak in LEAKS:
            assert leak.encode() not in response.content, f"{method} {path}: {leak!r} in {response.content[:500]!r}"
        if mode == "anonymous" and (method, path) not in PUBLIC:
            assert response.status_code == 401, f"{method} {path} without a key: {response.status_code}"
        if mode == "predict-key" and (method, path) not in PUBLIC and (method, path) not in PREDICT_SCOPE:
            assert response.status_code in (401, 403), f"{method} {path}, predict key: {response.status_code}"

    calls: list[int] = []
    check()
    measure(requests=len(calls))
