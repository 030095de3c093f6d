"""Liveness, readiness and metrics, for orchestrators and Prometheus: no API key. `/metrics` is open in embedded
mode; in server mode it needs the scrape token (`metrics_token`) or is served on its own address (`metrics_bind`)."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request, Response

from ..deps import MetricsAccess, MetricsDep
from ..errors import problem
from ..schemas import Health, Problem, Readiness, problem_responses

router = APIRouter(tags=["health"])


@router.head("/healthz", include_in_schema=False, response_model=None)  # HEAD probes: GET without the body
@router.get("/healthz", response_model=Health, summary="The process is alive")
def healthz() -> Health:
    return Health(status="ok")


@router.head("/readyz", include_in_schema=False, response_model=None)
@router.get("/readyz", response_model=Readiness, summary="Database, broker and engine are usable",
            responses={503: {"model": Problem, "description": "a check failed; `checks` says which"}})
async def readyz(*, request: Request, metrics: MetricsDep) -> Response | Readiness:
    """`engine`: the batcher's thread is alive once started (a dead one fails this once and is restarted), and
    with `preload_base_model` the default backbone is loaded."""
    results = await request.app.state.readiness.run()
    for name, r in results.items():
        metrics.ready.labels(name).set(1 if r.ok else 0)
    checks = {name: asdict(r) for name, r in results.items()}
    failed = [name for name, r in results.items() if not r.ok]
    if failed:
        return problem(503, "not-ready", f"not ready: {', '.join(failed)} failed", request=request,
                       title="Not ready", headers={"Retry-After": "5"}, checks=checks)
    return Readiness(status="ready", checks=checks)


@router.get("/metrics", summary="Prometheus metrics (server mode: with the scrape token, or closed)",
            response_class=Response, dependencies=[MetricsAccess],
            responses={200: {"content": {"text/plain": {}}}, **problem_responses(401, 404)})
def metrics_endpoint(*, metrics: MetricsDep) -> Response:
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
