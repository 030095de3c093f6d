"""/v1/webhooks: the tenant's signing secret (read, rotate: admin only) and the deliveries of its jobs' webhooks.
A job names its `webhook_url` when it is created (POST /v1/jobs); see app/services/webhooks.py."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy import select

from ..deps import AdminPrincipal, SessionDep, SettingsDep, TrainPrincipal
from ..models import WebhookDelivery
from ..schemas import Page, problem_responses
from ..services import jobs, webhooks
from ..services.pagination import DEFAULT_LIMIT, MAX_LIMIT, paginate

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


class WebhookSecretOut(BaseModel):
    secret: str = Field(description="`whsec_` + base64 of the HMAC key; verify `webhook-signature` with it")
    previous_secret_valid_until: datetime | None = Field(
        description="after a rotation, deliveries carry a second signature by the previous secret until then")


class WebhookDeliveryOut(BaseModel):
    id: uuid.UUID = Field(description="the delivery; its `webhook-id` header is `msg_` + this id's hex")
    webhook_id: str
    job: uuid.UUID
    event: str = Field(description="job.succeeded | job.failed | job.cancelled | job.eval")
    url: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: datetime | None = Field(description="when a pending delivery is tried next")
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    finished_at: datetime | None


def _secret_out(tenant: Any, settings: Any) -> WebhookSecretOut:
    return WebhookSecretOut(secret=tenant.webhook_secret,
                            previous_secret_valid_until=webhooks.previous_valid_until(tenant, settings))


@router.get("/secret", response_model=WebhookSecretOut, responses=problem_responses(401, 403),
            summary="The tenant's webhook signing secret (made on first use; admin)")
def get_secret(*, session: SessionDep, settings: SettingsDep, principal: AdminPrincipal) -> WebhookSecretOut:
    tenant = webhooks.ensure_secret(session, principal.tenant_id)
    session.commit()
    return _secret_out(tenant, settings)


@router.post("/secret", response_model=WebhookSecretOut, responses=problem_responses(401, 403),
             summary="Rotate the webhook signing secret (admin); the old one co-signs for a while")
def rotate_secret(*, session: SessionDep, settings: SettingsDep, principal: AdminPrincipal) -> WebhookSecretOut:
    tenant = webhooks.rotate_secret(session, principal.tenant_id)
    session.commit()
    return _secret_out(tenant, settings)


@router.get("/deliveries", response_model=Page[WebhookDeliveryOut], responses=problem_responses(401, 403, 404, 422),
            summary="Webhook deliveries, newest first (optionally of one job)")
def list_deliveries(*, session: SessionDep, principal: TrainPrincipal, job: uuid.UUID | None = None,
                    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
                    cursor: Annotated[str | None, Query(max_length=500)] = None) -> Any:
    stmt = select(WebhookDelivery).where(WebhookDelivery.tenant_id == principal.tenant_id)
    if job is not None:
        jobs.get(session, principal.tenant_id, job)  # 404 for an unknown or another tenant's job
        stmt = stmt.where(WebhookDelivery.job_id == job)
    rows, next_cursor = paginate(session, stmt, WebhookDelivery, limit=limit, cursor=cursor)
    items = [WebhookDeliveryOut(
        id=d.id, webhook_id=webhooks.message_id(d.id), job=d.job_id, event=d.event, url=d.url, status=d.status,
        attempts=d.attempts, next_attempt_at=d.next_attempt_at if d.status == "pending" else None,
        last_status_code=d.last_status_code, last_error=d.last_error, created_at=d.created_at,
        finished_at=d.finished_at) for d in rows]
    return {"items": items, "next_cursor": next_cursor}
