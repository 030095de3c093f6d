"""/v1/keys: a tenant's API keys, managed by its `admin` keys: list (prefixes and scopes, never a secret or
its hash), create (the plaintext is in the 201 and nowhere else, ever), revoke. Tenant-scoped; another
tenant's key is a 404. Tenants themselves are made by an operator (`spafit keys create --tenant`, on a
machine with database access): no API key can create or reach another tenant."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from ..deps import AdminPrincipal, SessionDep
from ..models import ApiKey
from ..schemas import Page, problem_responses
from ..services import keys
from ..services.pagination import DEFAULT_LIMIT, MAX_LIMIT, paginate

router = APIRouter(prefix="/v1/keys", tags=["keys"])


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f-\x9f]+$",
                      description="a label for people: where the key is used")
    scopes: list[Literal["admin", "train", "predict"]] = Field(
        min_length=1, max_length=3, description="`predict`: read tasks, predict; `train`: datasets, jobs, "
        "adapters; `admin`: everything, and keys")


class KeyOut(BaseModel):
    id: uuid.UUID
    name: str
    prefix: str = Field(description="the public part of the key (`spafit_<prefix>_...`)")
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="the key itself, shown this once: only its hash is stored")


def _out(row: ApiKey) -> KeyOut:
    return KeyOut(id=row.id, name=row.name, prefix=row.prefix, scopes=list(row.scopes), created_at=row.created_at,
                  revoked_at=row.revoked_at, last_used_at=row.last_used_at)


@router.get("", response_model=Page[KeyOut], summary="The tenant's keys, newest first (admin)",
            responses=problem_responses(401, 403, 422))
def list_keys(*, principal: AdminPrincipal, session: SessionDep,
              limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
              cursor: Annotated[str | None, Query(max_length=500)] = None) -> Any:
    stmt = select(ApiKey).where(ApiKey.tenant_id == principal.tenant_id)
    rows, next_cursor = paginate(session, stmt, ApiKey, limit=limit, cursor=cursor)
    return {"items": [_out(r) for r in rows], "next_cursor": next_cursor}


@router.post("", status_code=201, response_model=KeyCreated, summary="Create a key (admin); shown once",
             responses=problem_responses(400, 401, 403, 422))
def create_key(*, body: KeyCreate, principal: AdminPrincipal, session: SessionDep) -> Any:
    row, plaintext = keys.create_key(session, principal.tenant_id, body.name, list(body.scopes))
    return KeyCreated(**_out(row).model_dump(), key=plaintext)


@router.delete("/{key_id}", response_model=KeyOut, summary="Revoke a key (admin); idempotent",
               responses=problem_responses(401, 403, 404, 422))
def revoke_key(*, key_id: uuid.UUID, principal: AdminPrincipal, session: SessionDep) -> Any:
    return _out(keys.revoke_key(session, principal.tenant_id, key_id))
