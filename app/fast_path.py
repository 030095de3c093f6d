"""`POST /v1/tasks/{task}/predict` in front of the whole ASGI stack, for the requests every check lets through.

Why: the serving forward runs in a thread of this process and needs the GIL between any two tensor ops, so every
moment the event loop spends in Python holds the forward up. On the packaged MiniLM at 64 clients the middleware
layers, FastAPI's routing and its dependency solving cost the service about a fifth of its requests/s, far more
than their own share of the CPU (benchmarks/README.md, "Serving").

How: `FastPredict` wraps the built middleware stack. From the headers alone, before the body is read (as the
stack's own gates do), a request to that route goes on here only when the stack would not answer it otherwise: a
listener, Host and origin that `HostOriginMiddleware.refusal` passes, no `Origin` header (CORS answers those),
`Content-Type: application/json`, a Content-Length within the cap, a task name the route's pattern takes, a tenant
`PredictGate` does not refuse, and a principal with the `predict` scope from the key cache alone (or auth off).
Then the body: within the cap, parsed by orjson, a valid `PredictRequest` whose inputs pass `checked_inputs`.
Anything else goes to the stack unchanged, with whatever body was read replayed, so every refusal and every 422 is
the stack's own answer. A request taken here gets what the route and its middleware give it: the request id, the
metrics, `Serving.predict` and, for its errors (404, 409, 429, 503, 504, 500), the app's own exception handlers.
`predict_fast_path=false` sends every request through the stack.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import orjson
from starlette._exception_handler import _lookup_exception_handler
from starlette._utils import get_route_path, is_async_callable
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import _unexpected
from .metrics import Metrics
from .middleware import _REQUEST_ID, HostOriginMiddleware, new_request_id
from .routes.predict import _json, checked_inputs, unless_disconnected
from .schemas import PredictRequest
from .security import Principal
from .services import keys, registry
from .services.serving import Serving
from .settings import Settings

ROUTE = "/v1/tasks/{task}/predict"  # the route's template: the metrics label both paths use
_PATH = re.compile(r"/v1/tasks/([^/]+)/predict")


def presented_key(headers: Headers) -> str | None:
    """The API key a request presents, as `deps.get_principal` reads it through FastAPI's security classes:
    `Authorization: Bearer <key>` (scheme in any case, the key stripped), else a non-empty `X-API-Key`."""
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        credentials = credentials.strip()
        if scheme and credentials and scheme.lower() == "bearer":
            return credentials
    return headers.get("x-api-key") or None


class FastPredict:
    def __init__(self, app: ASGIApp, *, settings: Settings, serving: Serving, metrics: Metrics,
                 host_origin: HostOriginMiddleware, exception_handlers: dict[Any, Callable[..., Any]]):
        self.app, self.settings, self.serving, self.metrics = app, settings, serving, metrics
        self.host_origin = host_origin
        self.exception_handlers = exception_handlers  # the app's: looked up when the prediction fails

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        match = _PATH.fullmatch(get_route_path(scope))
        if match is None:
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        principal = self._admitted(scope, headers, match.group(1))
        if principal is None:  # refused or answered otherwise by the stack, from the headers alone
            return await self.app(scope, receive, send)
        body, messages = await self._body(headers, receive)
        taken = None if body is None else self._parsed(body)
        if taken is None:
            return await self.app(scope, _replay(messages, receive), send)
        await self._predict(scope, receive, send, headers, principal, match.group(1), *taken)

    def _admitted(self, scope: Scope, headers: Headers, task: str) -> Principal | None:
        """The principal when nothing in the headers makes the stack answer other than by predicting; None
        otherwise. Checked before the body is read, like the stack's own gates (a flood stays cheap)."""
        if "origin" in headers or self.host_origin.refusal(scope) is not None:
            return None
        content_type = headers.get("content-type", "")
        if content_type.partition(";")[0].strip().lower() != "application/json":
            return None
        length = headers.get("content-length")
        if length is not None and not (length.isascii() and length.isdigit()
                                       and int(length) <= self.settings.max_request_bytes):
            return None
        if not registry.TASK_NAME.fullmatch(task) or self.serving.refuse_early(headers) is not None:
            return None
        if not self.settings.auth_enabled:
            return keys.local_principal()
        key = presented_key(headers)
        principal = keys.authenticate_cached(self.serving.cache, key) if key else None
        return principal if principal is not None and principal.has("predict") else None

    async def _body(self, headers: Headers, receive: Receive) -> tuple[bytes | None, list[Message]]:
        """The whole body and the messages it came in; None for the body when it is not ours to answer (over the
        cap: the stack's body cap answers 413 from the same messages, replayed; the client went away)."""
        cap = self.settings.max_request_bytes
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return None, messages
            size += len(message.get("body", b""))
            if size > cap:
                return None, messages
            if not message.get("more_body", False):
                break
        return b"".join(m.get("body", b"") for m in messages), messages

    def _parsed(self, body: bytes) -> tuple[list, int | None] | None:
        """(inputs, top_k) when the stack would take the body as it is; None for anything it answers with a 422."""
        try:
            request = PredictRequest.model_validate(orjson.loads(body))
            return checked_inputs(request.inputs, self.settings, one_kind=True), request.top_k
        except Exception:  # not JSON orjson takes, not a PredictRequest, over a limit: the stack's 422, in its words
            return None

    async def _predict(self, scope: Scope, receive: Receive, send: Send, headers: Headers, principal: Principal,
                       task: str, inputs: list, top_k: int | None) -> None:
        """What the route and the middleware around it do once the request is known to be served."""
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id  # what the error handlers quote as `reference`
        status, started = 500, False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        metrics, start = self.metrics, time.perf_counter()
        metrics.http_requests_in_flight.inc()
        try:
            request = Request(scope, receive)
            try:
                self.serving.remember_key(headers, str(principal.tenant_id))
                result = await unless_disconnected(
                    request, self.serving.predict(principal.tenant_id, task, inputs, top_k))
                response = _json([result], result)
            except Exception as exc:  # as the stack's handlers answer it (ExceptionMiddleware, ErrorBoundary)
                response = await self._handled(request, exc)
            await response(scope, receive, send_with_id)
        except Exception as exc:
            if started:  # nothing else can be sent; logged and re-raised, as ErrorBoundary does
                raise
            await (await _unexpected(Request(scope), exc))(scope, receive, send_with_id)
        finally:
            metrics.http_requests_in_flight.dec()
            metrics.http_request_duration.labels("POST", ROUTE, str(status)).observe(time.perf_counter() - start)

    async def _handled(self, request: Request, exc: Exception) -> Any:
        handler = _lookup_exception_handler(self.exception_handlers, exc) or _unexpected
        if is_async_callable(handler):
            return await handler(request, exc)
        return await run_in_threadpool(handler, request, exc)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """`receive` that gives `messages` again first (the body the fast path read), then the client's own."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
