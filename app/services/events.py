"""Job events: an append-only, ordered log per job (`seq` counts from 1). Written by the worker (progress,
evaluations, checkpoints, status) and by the API (creation, cancellation); read by `/events` and its stream."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, insert, literal, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..db import Database
from ..models import Job, JobEvent, utcnow
from . import webhooks


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def append_in(session: Session, job_id: uuid.UUID, type: str, data: dict[str, Any]) -> None:
    """Add an event inside the caller's transaction; seq = last + 1. Writers of one job (the worker's
    progress, the API's cancel) take the job's row lock first, so they number their events one after the
    other instead of racing for the same seq; the lock is held to the end of the caller's transaction.
    Every writer locks the job row before the events table, so the order cannot deadlock."""
    session.execute(select(Job.id).where(Job.id == job_id).with_for_update())
    next_seq = select(func.coalesce(func.max(JobEvent.seq), 0) + 1).where(JobEvent.job_id == job_id) \
        .scalar_subquery()
    session.execute(insert(JobEvent).from_select(
        ["job_id", "seq", "type", "data", "created_at"],
        select(literal(job_id, JobEvent.job_id.type), next_seq, literal(type), literal(_json_safe(data), JobEvent.data.type),
               literal(utcnow(), JobEvent.created_at.type)),
    ))
    webhooks.on_event(session, job_id, type, data)  # a job's end (or eval) adds its webhook delivery here


def append(db: Database, job_id: uuid.UUID, type: str, data: dict[str, Any], *, attempts: int = 5) -> None:
    """Add an event in its own transaction, retried on an integrity error (which the row lock of `append_in`
    rules out on Postgres; SQLite serializes writers by itself)."""
    for i in range(attempts):
        try:
            with db.transaction() as s:
                append_in(s, job_id, type, data)
            return
        except IntegrityError:
            if i == attempts - 1:
                raise


def after(session: Session, job_id: uuid.UUID, seq: int = 0, limit: int = 1000) -> list[JobEvent]:
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > seq)
                                .order_by(JobEvent.seq).limit(limit)))
