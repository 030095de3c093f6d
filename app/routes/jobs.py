"""/v1/jobs: create a fine-tuning job, watch it (state, events, a live event stream), cancel it."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..deps import SessionDep, SettingsDep, TenantDep, TrainPrincipal
from ..models import JOB_FINAL_STATUSES
from ..schemas import DB_INT_MAX, Page, problem_responses
from ..schemas_jobs import JobCreate, JobEventOut, JobOut, JobStatus
from ..services import events, jobs
from ..services.pagination import DEFAULT_LIMIT, MAX_LIMIT

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
STREAM_POLL_SECONDS = 0.5


@router.post("", status_code=202, response_model=JobOut,
             responses=problem_responses(400, 401, 403, 404, 409, 413, 422),
             summary="Start a fine-tuning job (202: queued)")
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
def list_jobs(*, session: SessionDep, principal: TenantDep,
              status: JobStatus | None = None, task: str | None = Query(default=None, max_length=64),
              limit: int = Query(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
              cursor: str | None = Query(default=None, max_length=500)) -> Page[JobOut]:
    rows, next_cursor = jobs.list_page(session, principal.tenant_id, status=status, task=task, limit=limit,
                                       cursor=cursor)
    return Page[JobOut](items=[jobs.to_out(session, j) for j in rows], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses=problem_responses(401, 403, 404, 422),
            summary="A job: status, progress, metrics, error, adapter version")
def get_job(*, job_id: uuid.UUID, session: SessionDep, principal: TenantDep) -> JobOut:
    return jobs.to_out(session, jobs.get(session, principal.tenant_id, job_id))


@router.post("/{job_id}/cancel", response_model=JobOut, responses=problem_responses(401, 403, 404, 409, 422),
             summary="Cancel a queued job now, or a running one at its next step")
def cancel_job(*, job_id: uuid.UUID, session: SessionDep, principal: TrainPrincipal) -> JobOut:
    return jobs.to_out(session, jobs.cancel(session, principal.tenant_id, job_id))


@router.get("/{job_id}/events", response_model=list[JobEventOut],
            responses={**problem_responses(401, 403, 404, 422),
                       200: {"description": "the events as JSON, or a live stream with "
                                            "`Accept: text/event-stream` (each event's `id` is its seq)",
                             "content": {"text/event-stream": {}}}},
            summary="A job's ordered events; live with Accept: text/event-stream")
def job_events(*, job_id: uuid.UUID, request: Request, session: SessionDep, principal: TenantDep,
               after: int = Query(default=0, ge=0, le=DB_INT_MAX, description="only events with a larger seq"),
               limit: int = Query(default=1000, ge=1, le=10000),
               last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None):
    job = jobs.get(session, principal.tenant_id, job_id)
    if "text/event-stream" in request.headers.get("accept", ""):
        start = min(int(last_event_id), DB_INT_MAX) if last_event_id and last_event_id.isdigit() else after
        return StreamingResponse(_stream(request, job.id, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return [JobEventOut.model_validate(e, from_attributes=True) for e in events.after(session, job.id, after, limit)]


async def _stream(request: Request, job_id: uuid.UUID, seq: int):
    """Server-sent events until the job is final and every event has been sent (or the client leaves)."""
    db = request.app.state.db

    def poll(after: int):
        from ..models import Job

        with db.session() as s:
            rows = events.after(s, job_id, after, 500)
            status = s.get(Job, job_id).status
            return [(e.seq, e.type, e.data, e.created_at.isoformat()) for e in rows], status

    idle = 0.0
    while True:
        rows, status = await run_in_threadpool(poll, seq)
        for e_seq, e_type, data, created in rows:
            seq = e_seq
            payload = json.dumps({"seq": e_seq, "type": e_type, "data": data, "created_at": created})
            yield f"id: {e_seq}\nevent: {e_type}\ndata: {payload}\n\n"
        if not rows and status in JOB_FINAL_STATUSES:
            yield "event: end\ndata: {}\n\n"
            return
        if await request.is_disconnected():
            return
        if not rows:
            idle += STREAM_POLL_SECONDS
            if idle >= 15:  # keep proxies from closing an idle stream
                idle = 0.0
                yield ": keep-alive\n\n"
            await asyncio.sleep(STREAM_POLL_SECONDS)
