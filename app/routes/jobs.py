"""/v1/jobs: create a fine-tuning job, watch it (state, events, a live event stream), cancel it, delete it. Every route
needs the `train` scope: a job shows its datasets, hyperparameters and errors, which predict-only keys never see."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from ..db import Database
from ..deps import SessionDep, SettingsDep, TrainPrincipal
from ..errors import TooManyStreams
from ..schemas import DB_INT_MAX, Page, problem_responses
from ..schemas_jobs import JobCreate, JobEventOut, JobOut, JobStatus
from ..services import events, jobs, keys, retention, streams
from ..services.pagination import DEFAULT_LIMIT, MAX_LIMIT

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=202, response_model=JobOut,
             responses=problem_responses(400, 401, 403, 404, 409, 413, 422, 429),
             summary="Start a fine-tuning job (202: queued; 429: the tenant's queued + running jobs at their limit)")
def create_job(*, request: Request, response: Response, body: JobCreate, session: SessionDep,
               settings: SettingsDep, principal: TrainPrincipal,
               idempotency_key: Annotated[str | None, Header(max_length=200, description=(
                   "retrying a create with the same key returns the same job"))] = None) -> JobOut:
    job, created = jobs.create(session, principal.tenant_id, body, settings, idempotency_key=idempotency_key)
    if created:
        request.app.state.metrics.jobs_submitted.inc()
        for job_id in jobs.to_dispatch(session, job):
            jobs.dispatch(request.app.state.send_job, job_id, request.app.state.db)
    else:
        response.headers["Idempotent-Replayed"] = "true"
    return jobs.to_out(session, job)


@router.get("", response_model=Page[JobOut], responses=problem_responses(401, 403, 422),
            summary="List jobs, newest first")
def list_jobs(*, session: SessionDep, principal: TrainPrincipal,
              status: JobStatus | None = None, task: str | None = Query(default=None, max_length=64),
              limit: int = Query(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
              cursor: str | None = Query(default=None, max_length=500)) -> Page[JobOut]:
    rows, next_cursor = jobs.list_page(session, principal.tenant_id, status=status, task=task, limit=limit,
                                       cursor=cursor)
    return Page[JobOut](items=[jobs.to_out(session, j) for j in rows], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses=problem_responses(401, 403, 404, 422),
            summary="A job: status, progress, metrics, error, adapter version")
def get_job(*, job_id: uuid.UUID, session: SessionDep, principal: TrainPrincipal) -> JobOut:
    return jobs.to_out(session, jobs.get(session, principal.tenant_id, job_id))


@router.post("/{job_id}/cancel", response_model=JobOut, responses=problem_responses(401, 403, 404, 409, 422),
             summary="Cancel a queued job now, or a running one at its next step")
def cancel_job(*, job_id: uuid.UUID, session: SessionDep, principal: TrainPrincipal) -> JobOut:
    return jobs.to_out(session, jobs.cancel(session, principal.tenant_id, job_id))


@router.delete("/{job_id}", status_code=204, response_class=Response,
               responses=problem_responses(401, 403, 404, 409, 422),
               summary="Delete a finished job, its events and checkpoints (its adapter version stays)")
def delete_job(*, job_id: uuid.UUID, session: SessionDep, principal: TrainPrincipal) -> Response:
    """A succeeded, failed or cancelled job (a sweep: with its trials) is deleted with its events; the blobs
    only it referenced (checkpoint, trial results) go with it. The adapter version it produced stays
    registered and servable (it no longer names a job). Its datasets can then be deleted. A queued or
    running job is a 409: cancel it first."""
    retention.delete_job(session, principal.tenant_id, job_id)
    return Response(status_code=204)


@router.get("/{job_id}/events", response_model=list[JobEventOut],
            responses={**problem_responses(401, 403, 404, 422, 429),
                       200: {"description": "the events as JSON, or a live stream with `Accept: text/event-stream`: "
                                            "each event's `id` is its seq; `event: end` once the job is final and "
                                            "every event was sent; `event: reconnect` when the stream reached its "
                                            "maximum duration (resume with `Last-Event-ID`); `: ping` comments "
                                            "while quiet. 429: the tenant's open streams are at their cap.",
                             "content": {"text/event-stream": {}}}},
            summary="A job's ordered events; live with Accept: text/event-stream")
async def job_events(*, job_id: uuid.UUID, request: Request, principal: TrainPrincipal,
                     after: int = Query(default=0, ge=0, le=DB_INT_MAX, description="only events with a larger seq"),
                     limit: int = Query(default=1000, ge=1, le=10000),
                     last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", description=(
                         "resume a stream after this seq (takes precedence over `after`)"))] = None):
    # No per-request session here: a stream may stay open for minutes, and must hold no pooled connection.
    # (The key lookup's session was already given back by get_principal.)
    db, tenant = request.app.state.db, principal.tenant_id
    resume = streams.parse_last_event_id(last_event_id)
    if "text/event-stream" not in request.headers.get("accept", ""):
        return await run_in_threadpool(_events_page, db, tenant, job_id, after, limit)
    await run_in_threadpool(_check_job, db, tenant, job_id)
    metrics = request.app.state.metrics
    try:
        lease = await request.app.state.stream_slots.acquire(tenant)
    except TooManyStreams:
        metrics.event_streams_refused.labels(tenant=str(tenant)).inc()
        raise
    body = streams.event_stream(db, request.app.state.event_hub, lease, job_id, after if resume is None else resume,
                                request.app.state.settings,
                                keys.still_valid(db, request.app.state.serving.cache, principal))
    return streams.EventStreamResponse(body, lease, metrics.event_streams_open)


def _check_job(db: Database, tenant_id: uuid.UUID, job_id: uuid.UUID) -> None:
    with db.session() as s:
        jobs.get(s, tenant_id, job_id)


def _events_page(db: Database, tenant_id: uuid.UUID, job_id: uuid.UUID, after: int, limit: int) -> list[JobEventOut]:
    with db.session() as s:
        job = jobs.get(s, tenant_id, job_id)
        return [JobEventOut.model_validate(e, from_attributes=True) for e in events.after(s, job.id, after, limit)]
