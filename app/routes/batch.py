"""/v1/batch-predictions: predict every row of a dataset with a task's version, offline, on the workers (a job of
kind `predict`: queued, claimed, fenced, cancellable, with events and progress like a training job; watch and
cancel it under /v1/jobs/{id} too), and download its result file, streamed. And
/v1/tasks/{task}/versions/{version}/evaluate: a version's metrics on a labelled dataset (a job of kind `evaluate`).
Every route needs the `train` scope: a batch job reads a whole dataset, which predict-only keys never see."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from ..deps import SessionDep, SettingsDep, TrainPrincipal
from ..models import Job
from ..schemas import DB_INT_MAX, Page, problem_responses
from ..schemas_jobs import JobOut
from ..services import batch, jobs, registry
from ..services.pagination import DEFAULT_LIMIT, MAX_LIMIT

router = APIRouter(prefix="/v1/batch-predictions", tags=["batch"])
evaluate_router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

IdempotencyKey = Annotated[str | None, Header(max_length=200, description=(
    "retrying a create with the same key returns the same job"))]


def _started(request: Request, response: Response, session, job, created: bool) -> JobOut:
    if created:
        jobs.dispatch(request.app.state.send_job, job.id, request.app.state.db)
    else:
        response.headers["Idempotent-Replayed"] = "true"
    return jobs.to_out(session, job)


@router.post("", status_code=202, response_model=JobOut,
             responses=problem_responses(400, 401, 403, 404, 409, 413, 422, 429),
             summary="Predict every row of a dataset (202: a queued job of kind `predict`)",
             description="One task (`task`, `version`) or several (`tasks`: names or {task, version}) over the same "
                         "dataset: several run through the engine's fan-out path (the frozen layers below the "
                         "adapters once per row, then one branch per task) and each result row carries every task's "
                         "prediction. An unknown task or version is 404 naming it (`tasks[i]`); tasks on different "
                         "base models are 422 (start one job per base model). The per-job row limit "
                         "(SPAFIT_BATCH_MAX_ROWS_PER_JOB) counts rows x tasks.")
def create_batch_prediction(*, request: Request, response: Response, body: batch.BatchPredictionCreate,
                            session: SessionDep, settings: SettingsDep, principal: TrainPrincipal,
                            idempotency_key: IdempotencyKey = None) -> JobOut:
    job, created = batch.create_prediction(session, principal.tenant_id, body, settings,
                                           idempotency_key=idempotency_key)
    return _started(request, response, session, job, created)


@router.get("", response_model=Page[JobOut], responses=problem_responses(401, 403, 422),
            summary="List batch predictions, newest first")
def list_batch_predictions(*, session: SessionDep, principal: TrainPrincipal,
                           limit: int = Query(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
                           cursor: str | None = Query(default=None, max_length=500)) -> Page[JobOut]:
    rows, next_cursor = batch.list_predictions(session, principal.tenant_id, limit=limit, cursor=cursor)
    return Page[JobOut](items=[jobs.to_out(session, j) for j in rows], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses=problem_responses(401, 403, 404, 422),
            summary="A batch prediction job: status, progress (rows done of total), error")
def get_batch_prediction(*, job_id: uuid.UUID, session: SessionDep, principal: TrainPrincipal) -> JobOut:
    return jobs.to_out(session, batch.get_prediction(session, principal.tenant_id, job_id))


@router.get("/{job_id}/results", responses={**problem_responses(401, 403, 404, 409, 416, 422), 200: {
                "description": "the result file, streamed, one row per input row in the dataset's order. One task: "
                               "JSON Lines `{id, label, score[, labels][, scores]}` or CSV `id,label,score,scores`. "
                               "Several tasks (`tasks`): JSON Lines `{id, results: {<task>: {label, score[, labels]"
                               "[, scores]}}}` or CSV `id` then `<task>.label,<task>.score,<task>.scores` per task",
                "content": {"application/x-ndjson": {}, "text/csv": {}}},
                206: {"description": "the bytes a `Range: bytes=...` header asked for (one range; `If-Range` "
                                     "with this file's ETag), to resume a download cut short"}},
            summary="Download a succeeded batch prediction's results (409 before it has succeeded)")
def batch_prediction_results(*, job_id: uuid.UUID, request: Request, session: SessionDep, principal: TrainPrincipal,
                             range_: Annotated[str | None, Header(alias="Range", max_length=200)] = None,
                             if_range: Annotated[str | None, Header(max_length=200)] = None) -> StreamingResponse:
    job, headers = _results(session, principal.tenant_id, job_id)
    size = int(headers["Content-Length"])
    span = None if if_range is not None and if_range.strip() != headers["ETag"] else batch.byte_range(range_, size)
    status = 200
    if span is not None:
        status = 206
        headers = {**headers, "Content-Length": str(span[1] - span[0]),
                   "Content-Range": f"bytes {span[0]}-{span[1] - 1}/{size}"}
    return StreamingResponse(batch.stream_results(request.app.state.db, job.id, job.hyperparameters.get(
        "format", "jsonl"), batch.task_names(job), span), status_code=status, media_type=batch.media_type(job),
        headers=headers)


@router.head("/{job_id}/results", include_in_schema=False)
def batch_prediction_results_head(*, job_id: uuid.UUID, session: SessionDep, principal: TrainPrincipal) -> Response:
    """The GET's status and headers (Content-Length, type, file name) without its body."""
    job, headers = _results(session, principal.tenant_id, job_id)
    return Response(media_type=batch.media_type(job), headers=headers)


def _results(session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> tuple[Job, dict[str, str]]:
    """The succeeded job (404/409 otherwise) and its download's headers; Content-Length lets a client tell a
    complete file from a cut one."""
    job = batch.check_results(session, tenant_id, job_id)
    fmt = job.hyperparameters.get("format", "jsonl")
    ext = "csv" if fmt == "csv" else "jsonl"
    # A succeeded job's results never change: its id names them (the ETag `If-Range` is checked against).
    return job, {"Content-Disposition": f'attachment; filename="{job.id}.{ext}"', "Accept-Ranges": "bytes",
                 "ETag": f'"{job.id}"',
                 "Content-Length": str(batch.results_size(session, job.id, fmt, batch.task_names(job)))}


@evaluate_router.post("/{task}/versions/{version}/evaluate", status_code=202, response_model=JobOut,
                      responses=problem_responses(400, 401, 403, 404, 409, 413, 422, 429),
                      summary="Evaluate a version on a labelled dataset (202: a queued job of kind `evaluate`)")
def evaluate_version(*, request: Request, response: Response,
                     task: Annotated[str, Path(pattern=f"^{registry.TASK_NAME.pattern}$")],
                     version: Annotated[int, Path(ge=1, le=DB_INT_MAX)], body: batch.EvaluateCreate,
                     session: SessionDep, settings: SettingsDep, principal: TrainPrincipal,
                     idempotency_key: IdempotencyKey = None) -> JobOut:
    job, created = batch.create_evaluation(session, principal.tenant_id, task, version, body, settings,
                                           idempotency_key=idempotency_key)
    return _started(request, response, session, job, created)
