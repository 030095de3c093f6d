"""The admission gate of serving: rows in flight by tenant, counted when a predict is admitted and given back when
it ends, checked against the tenant's share (across API replicas through `limits.TenantRows` in server mode) and
the whole queue's bound (429 `tenant-queue-full`, 503 `overloaded`), and `PredictGate`, which refuses a tenant
already over its share from a request's headers alone. `serving.Serving` holds one `Admission`.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from starlette._utils import get_route_path

from ..errors import AppError, ServiceUnavailable, TenantQueueFull, problem
from ..metrics import Metrics
from ..settings import Settings
from .limits import TenantRows

if TYPE_CHECKING:
    from .serving import Serving

RETRY_AFTER_SECONDS = 1  # a full queue drains in well under a second at serving batch sizes
KEY_MEMORY = 10_000  # API keys remembered by the gate (LRU); a forgotten one just takes the normal path


class Overloaded(ServiceUnavailable):
    """The engine's queue is full (all tenants): retry after `Retry-After` seconds."""

    type = "overloaded"


class Admission:
    """Rows admitted and not answered yet, by tenant, and the tenants refused for their share lately."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        # Rows admitted and not answered yet (waiting for a thread, the registry, the queue or the engine), by
        # tenant: what the per-tenant share and the whole queue's bound are checked against, so that a tenant's
        # flood is refused right after its key is checked, before it can crowd the stages ahead of the batcher.
        self._in_flight: dict[str, int] = {}
        self._in_flight_lock = threading.Lock()
        self._key_tenants: OrderedDict[str, str] = OrderedDict()  # sha256 of an API key seen at predict -> tenant
        # Tenants refused for their share -> (until when, their rows in flight then): the gate refuses their
        # requests from the headers alone meanwhile (for `RETRY_AFTER_SECONDS`, or until this process's rows of the
        # tenant fall below the low-water mark), then the next request is checked again.
        self._saturated: dict[str, tuple[float, int]] = {}
        # The per-tenant share across API replicas (Redis, server mode); None: counted in this process only.
        self.tenant_rows = TenantRows.from_settings(settings)

    def queue_depth(self) -> int:
        """Rows admitted and not answered yet, every tenant."""
        with self._in_flight_lock:
            return sum(self._in_flight.values())

    def tenant_depths(self) -> dict[str, int]:
        """Rows admitted and not answered yet, by tenant id."""
        with self._in_flight_lock:
            return dict(self._in_flight)
    def remember_key(self, headers: Mapping[str, str], tenant: str) -> None:
        """Note which tenant the request's (just authenticated) API key belongs to, for `refuse_early`."""
        digest = _key_digest(headers)
        if digest is None:
            return
        with self._in_flight_lock:
            self._key_tenants[digest] = tenant
            self._key_tenants.move_to_end(digest)
            while len(self._key_tenants) > KEY_MEMORY:
                self._key_tenants.popitem(last=False)

    def refuse_early(self, headers: Mapping[str, str]) -> tuple[str, int] | None:
        """(tenant, rows in flight) if the request's API key is one seen before whose tenant was refused for its
        share within `RETRY_AFTER_SECONDS` and has not drained below the low-water mark (90% of the share) in this
        process since: `PredictGate` answers 429 at once, before the key lookup, the thread hops and the body, so
        a flood costs the service little more than reading its headers. None: let the request in (`admit`
        decides, across replicas)."""
        digest = _key_digest(headers)
        if digest is None:
            return None
        with self._in_flight_lock:
            tenant = self._key_tenants.get(digest)
            if tenant is None:
                return None
            until, depth = self._saturated.get(tenant, (0.0, 0))
            if until <= time.monotonic():
                self._saturated.pop(tenant, None)
                return None
        self.metrics.predict_tenant_rejected.labels(tenant=tenant).inc()
        self.metrics.predict_requests.labels(outcome="tenant-queue-full").inc()
        return tenant, depth

    async def admit(self, tenant: str, rows: int) -> Callable[[], None]:
        """Count `rows` of `tenant` in flight, or refuse them before any work is done: 429 for a tenant past its
        share (`batch_max_queue_per_tenant`: across replicas through `tenant_rows`, else in this process), 503 when
        every tenant's rows together fill this process's `batch_max_queue`. Returns the function that gives the
        rows back (idempotent)."""
        limit, total = self.settings.batch_max_queue_per_tenant, self.settings.batch_max_queue
        # A request larger than the share (a big fan-out) runs alone, charged one share (and never more than the
        # whole queue): the queue has room for it whenever its tenant has nothing in flight, and it leaves the
        # other tenants what it would leave them at its share.
        rows = min(rows, limit, total)
        counter = self.tenant_rows  # None (embedded), or Redis unusable (`shared` None): counted here
        shared = await counter.admit(tenant, rows, limit) if counter is not None else None
        with self._in_flight_lock:
            mine, everyone = self._in_flight.get(tenant, 0), sum(self._in_flight.values())
            if shared is None:  # counted here (alone, a request larger than the share still runs: a big fan-out)
                depth, over = mine, mine + rows > limit and mine > 0
            else:
                depth, over = shared.total, not shared.admitted
            # The whole queue full is 503 whoever asks (with one busy tenant, its share can be the whole queue);
            # a tenant past its share while there is room for others is 429.
            if everyone + rows > total and everyone > 0:
                refused: AppError = self.overloaded(f"prediction queue is full ({everyone} rows waiting); retry "
                                                     "shortly", everyone)
            elif over:
                self._saturated[tenant] = (time.monotonic() + RETRY_AFTER_SECONDS, depth)
                refused = self.tenant_overloaded(tenant, f"this tenant has {depth} rows waiting (at most "
                                                  f"{limit}); retry shortly", depth)
            else:
                self._in_flight[tenant] = mine + rows
                released = threading.Event()

                def release() -> None:
                    with self._in_flight_lock:
                        if released.is_set():
                            return
                        released.set()
                        left = self._in_flight[tenant] - rows
                        if left:
                            self._in_flight[tenant] = left
                        else:
                            del self._in_flight[tenant]
                        if left < limit - max(1, limit // 10):  # the low-water mark: the gate opens again
                            self._saturated.pop(tenant, None)
                    if counter is not None and shared is not None:
                        counter.release(tenant, rows)

                return release
        if counter is not None and shared is not None and shared.admitted:  # taken in Redis, refused here
            counter.release(tenant, rows)
        raise refused

    def overloaded(self, message: str, depth: int | None = None) -> Overloaded:
        return Overloaded(message, headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                          queue_depth=self.queue_depth() if depth is None else depth)

    def tenant_overloaded(self, tenant: str, message: str, depth: int | None = None) -> TenantQueueFull:
        self.metrics.predict_tenant_rejected.labels(tenant=tenant).inc()
        return TenantQueueFull(message, headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                               tenant_queue_depth=self.tenant_depths().get(tenant, 0) if depth is None else depth)


def _key_digest(headers: Mapping[str, str]) -> str | None:
    """sha256 of the API key a request presents (`Authorization: Bearer` or `X-API-Key`), as deps reads it."""
    auth = headers.get("authorization") or ""
    scheme, _, value = auth.partition(" ")
    key = value if scheme.lower() == "bearer" and value.strip() else headers.get("x-api-key") or ""
    key = key.strip()  # as `parse_key` reads it: one key spelled with other surrounding whitespace is one entry
    return hashlib.sha256(key.encode()).hexdigest() if key else None


class PredictGate:
    """Pure ASGI middleware in front of the predict routes: a request whose API key belongs to a tenant that
    has its whole share of the queue in flight gets 429 `tenant-queue-full` with Retry-After from the headers
    alone (see `Serving.refuse_early`). What a tenant's flood costs the others then stays small: the requests it
    sends past its share never reach the thread pool, the database or the engine. A key revoked since it was
    seen may get this 429 instead of a 401 while its tenant is busy; it never gets an answer with data."""

    PATHS = re.compile(r"/v1/(tasks/[^/]+/)?predict")  # the route's path: behind a proxy prefix, without it

    def __init__(self, app: Any, serving: Serving):
        self.app, self.serving = app, serving

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and self.PATHS.fullmatch(get_route_path(scope)):
            from starlette.datastructures import Headers
            from starlette.requests import Request

            refused = self.serving.refuse_early(Headers(scope=scope))
            if refused is not None:
                _, depth = refused
                response = problem(429, TenantQueueFull.type, f"this tenant has {depth} rows waiting (at most "
                                   f"{self.serving.settings.batch_max_queue_per_tenant}); retry shortly",
                                   request=Request(scope), headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                                   tenant_queue_depth=depth)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
