"""Typed dependency aliases, all in one place. Handlers declare what they need:

    def create(*, session: SessionDep, principal: Annotated[Principal, require_scope("train")]) -> ...

With auth on, a key comes as `Authorization: Bearer spafit_...` (or `X-API-Key: spafit_...`). With auth off
(embedded mode only) every request acts as the built-in `local` tenant with every scope.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from .db import Database
from .errors import Forbidden, Unauthorized
from .metrics import Metrics
from .security import Principal
from .services import keys
from .services.serving import Serving
from .settings import Settings

_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer spafit_<prefix>_<secret>`")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key, as an alternative header")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_database(request: Request) -> Database:
    return request.app.state.db


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_serving(request: Request) -> Serving:
    return request.app.state.serving


def get_session(request: Request) -> Iterator[Session]:
    """A session per request, closed (and rolled back if uncommitted) at the end. Services commit."""
    with request.app.state.db.session() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
DatabaseDep = Annotated[Database, Depends(get_database)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
SessionDep = Annotated[Session, Depends(get_session)]
ServingDep = Annotated[Serving, Depends(get_serving)]


def get_principal(
    session: SessionDep,
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key_header)],
) -> Principal:
    if not settings.auth_enabled:
        return keys.local_principal()
    presented = bearer.credentials if bearer is not None else api_key
    if not presented:
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`")
    principal = keys.authenticate(session, presented)
    # End the key lookup's transaction: its pooled connection must not stay checked out while the request waits
    # for a thread for its other dependencies. Under load every thread was waiting for a connection and every
    # connection for a thread, until the 30 s pool timeout. The handler's queries take one again when they run.
    session.rollback()
    return principal


TenantDep = Annotated[Principal, Depends(get_principal)]  # any valid key; tenant_id scopes every query


def require_scope(scope: str) -> Any:
    """A dependency (use inside Annotated) giving the Principal if its key has `scope` (admin has all)."""

    def _check(principal: TenantDep) -> Principal:
        if not principal.has(scope):
            raise Forbidden(f"this API key lacks the {scope!r} scope", required_scope=scope)
        return principal

    _check.__name__ = f"require_{scope}"
    return Depends(_check)


TrainPrincipal = Annotated[Principal, require_scope("train")]
PredictPrincipal = Annotated[Principal, require_scope("predict")]
AdminPrincipal = Annotated[Principal, require_scope("admin")]
