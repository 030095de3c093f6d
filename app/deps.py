"""Typed dependency aliases, all in one place. Handlers declare what they need:

    def create(*, session: SessionDep, principal: Annotated[Principal, require_scope("train")]) -> ...

With auth on, a key comes as `Authorization: Bearer spafit_...` (or `X-API-Key: spafit_...`). With auth off
(embedded mode only) every request acts as the built-in `local` tenant with every scope.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from .db import Database
from .errors import Forbidden, NotFound, Unauthorized
from .metrics import Metrics
from .security import Principal
from .services import keys
from .services.conversions import Conversions
from .services.serving import Serving
from .settings import Settings

_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer spafit_<prefix>_<secret>`")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key, as an alternative header")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_database(request: Request) -> Database:
    return request.app.state.db


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_serving(request: Request) -> Serving:
    return request.app.state.serving


async def get_conversions(request: Request) -> Conversions:
    return request.app.state.conversions


def get_session(request: Request) -> Iterator[Session]:
    """A session per request, closed (and rolled back if uncommitted) at the end. Services commit."""
    with request.app.state.db.session() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
DatabaseDep = Annotated[Database, Depends(get_database)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
SessionDep = Annotated[Session, Depends(get_session)]
ServingDep = Annotated[Serving, Depends(get_serving)]
ConversionsDep = Annotated[Conversions, Depends(get_conversions)]


async def get_principal(
    request: Request,
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key_header)],
) -> Principal:
    """The caller. A key verified before (and not revoked anywhere since) comes from the in-process cache, on
    the event loop; any other is checked against the database in a thread, in a session of its own that is
    closed before the handler runs (a pooled connection held while waiting for another thread deadlocked the
    pool under load)."""
    if not settings.auth_enabled:
        return keys.local_principal()
    presented = bearer.credentials if bearer is not None else api_key
    if not presented:
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`")
    state = request.app.state
    principal = keys.authenticate_cached(state.serving.cache, presented)
    if principal is None:
        principal = await run_in_threadpool(keys.authenticate_fresh, state.db, state.serving.cache, presented)
    return principal


TenantDep = Annotated[Principal, Depends(get_principal)]  # any valid key; tenant_id scopes every query


def require_scope(scope: str, *alternatives: str) -> Any:
    """A dependency (use inside Annotated) giving the Principal if its key has `scope` or one of the
    `alternatives` (admin has all). The 403 names `scope` as `required_scope` and lists every accepted one."""
    accepted = (scope, *alternatives)

    async def _check(principal: TenantDep) -> Principal:  # async: no thread to read a set
        if not any(principal.has(s) for s in accepted):
            which = " or ".join(repr(s) for s in accepted)
            raise Forbidden(f"this API key lacks the {which} scope", required_scope=scope,
                            accepted_scopes=list(accepted))
        return principal

    _check.__name__ = "require_" + "_or_".join(accepted)
    return Depends(_check)


# What each scope may do (README "Scopes"): `predict` reads tasks and predicts; `train` manages datasets, jobs and
# the adapters they produce (it also reads tasks); `admin` everything, and keys and tenants (CLI).
TrainPrincipal = Annotated[Principal, require_scope("train")]
PredictPrincipal = Annotated[Principal, require_scope("predict")]
TaskReaderPrincipal = Annotated[Principal, require_scope("predict", "train")]
AdminPrincipal = Annotated[Principal, require_scope("admin")]


async def metrics_access(
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Who may read `/metrics` on the API port: anyone in embedded mode without a token; with
    `metrics_token`, whoever presents it; in server mode without one (or with a separate `metrics_bind`
    listener), nobody: 404, as if the route did not exist."""
    token = settings.metrics_token
    if not settings.metrics_on_api_port:
        raise NotFound("metrics are not served on this port; see SPAFIT_METRICS_TOKEN and SPAFIT_METRICS_BIND")
    if token is not None:
        presented = bearer.credentials if bearer is not None else ""
        if not hmac.compare_digest(presented.encode(), token.get_secret_value().encode()):
            raise Unauthorized("metrics need the scrape token: `Authorization: Bearer <SPAFIT_METRICS_TOKEN>`")


MetricsAccess = Depends(metrics_access)
