"""Liveness, readiness and metrics: unauthenticated, for orchestrators and Prometheus."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request, Response

from ..deps import MetricsDep
from ..errors import problem
from ..schemas import Health, Problem, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, summary="Database, broker (and later checks) are usable",
            responses={503: {"model": Problem, "description": "a check failed; `checks` says which"}})
async def readyz(*, request: Request, metrics: MetricsDep) -> Response | Readiness:
    results = await request.app.state.readiness.run()
    for name, r in results.items():
        metrics.ready.labels(name).set(1 if r.ok else 0)
    checks = {name: asdict(r) for name, r in results.items()}
    failed = [name for name, r in results.items() if not r.ok]
    if failed:
        return problem(503, "not-ready", f"not ready: {', '.join(failed)} failed", request=request,
                       title="Not ready", headers={"Retry-After": "5"}, checks=checks)
    return Readiness(status="ready", checks=checks)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
def metrics_endpoint(*, metrics: MetricsDep) -> Response:
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
