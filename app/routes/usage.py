"""/v1/usage: what the tenant stores in the shared database against its quota (SPAFIT_TENANT_MAX_STORED_BYTES;
app/services/quota.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from ..deps import SessionDep, SettingsDep, TaskReaderPrincipal
from ..schemas import problem_responses
from ..services import quota

router = APIRouter(prefix="/v1/usage", tags=["usage"])


class StoredBytes(BaseModel):
    datasets: int = Field(description="the tenant's datasets, each at its size")
    adapters: int = Field(description="its tasks' adapter versions, trained and imported")
    batch_results: int = Field(description="its batch predictions' stored results")


class UsageOut(BaseModel):
    stored_bytes: int = Field(description="all of the below; checkpoints of running jobs are not counted")
    by_kind: StoredBytes
    limit_bytes: int | None = Field(description="the most this tenant may store; null: no limit")
    available_bytes: int | None = Field(description="what it may still store; null: no limit")


@router.get("", response_model=UsageOut, summary="Bytes the tenant stores, by kind, and its quota",
            responses=problem_responses(401, 403))
def get_usage(*, principal: TaskReaderPrincipal, session: SessionDep, settings: SettingsDep) -> Any:
    by_kind = quota.usage(session, principal.tenant_id)
    used, limit = sum(by_kind.values()), settings.tenant_max_stored_bytes or None
    return {"stored_bytes": used, "by_kind": by_kind, "limit_bytes": limit,
            "available_bytes": None if limit is None else max(0, limit - used)}
