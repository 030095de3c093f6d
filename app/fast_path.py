"""`POST /v1/tasks/{task}/predict` without FastAPI's routing, dependency solving and body parsing, for the requests
the route would serve.

Why: the serving forward runs in a thread of this process and needs the GIL between any two tensor ops, so every
moment the event loop spends in Python holds the forward up. On the packaged MiniLM at 64 clients, FastAPI's routing
and dependency solving for this route cost the service a tenth to a fifth of its requests/s, far more than their
own share of the CPU (benchmarks/README.md, "Serving").

How: `FastPredict` is the innermost middleware, so every request has passed the same gates as before when it gets
here (request id, metrics, `PredictGate`, the Host and Origin checks, CORS, the body cap, the error boundary). A
request to the route goes on here only when the route would serve it: `Content-Type: application/json`, a task name
the route's pattern takes, a body orjson parses into a valid `PredictRequest` whose inputs pass `checked_inputs`, and,
read after the body as the route's dependencies are, a principal with the `predict` scope from the key cache alone
(or auth off). Anything else goes on to the router unchanged, with the body read so far replayed, so every refusal
and every 422 is the route's own answer. A request taken here gets what the route gives it: `Serving.predict`, the
same JSON, and for its errors (404, 409, 429, 503, 504, 500) the app's own exception handlers.
`predict_fast_path=false` sends every request through the router.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson
from starlette._exception_handler import _lookup_exception_handler
from starlette._utils import get_route_path, is_async_callable
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import _unexpected
from .routes import predict as predict_routes
from .routes.predict import _json, checked_inputs, unless_disconnected
from .schemas import PredictRequest
from .security import Principal
from .services import keys, registry
from .services.serving import Serving
from .settings import Settings

_PATH = re.compile(r"/v1/tasks/([^/]+)/predict")
ROUTE = "/v1/tasks/{task}/predict"
# The route this stands in for, put in the scope where the router would have (the metrics label it by its path).
_ROUTE = next(r for r in predict_routes.router.routes if getattr(r, "path", None) == ROUTE)


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
    def __init__(self, app: ASGIApp, *, settings: Settings, serving: Serving,
                 exception_handlers: dict[Any, Callable[..., Any]]):
        self.app, self.settings, self.serving = app, settings, serving
        self.exception_handlers = exception_handlers  # the app's (filled in after this is added)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        match = _PATH.fullmatch(get_route_path(scope))
        if match is None or not registry.TASK_NAME.fullmatch(match.group(1)):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if headers.get("content-type", "").partition(";")[0].strip().lower() != "application/json":
            return await self.app(scope, receive, send)
        scope["route"], scope["path_params"] = _ROUTE, {"task": match.group(1)}  # as the router sets them
        try:
            body, messages = await self._body(receive)
        except Exception as exc:  # answered as the route's body parsing does (FastAPI's get_request_handler)
            if not isinstance(exc, HTTPException):  # the body cap's 413 is one; anything else is FastAPI's 400
                exc = HTTPException(400, "There was an error parsing the body")
            return await (await self._handled(Request(scope), exc))(scope, receive, send)
        taken = None if body is None else self._taken(headers, body)
        if taken is None:
            return await self.app(scope, _replay(messages, receive), send)
        principal, inputs, top_k = taken
        request = Request(scope, receive)
        try:
            self.serving.remember_key(headers, str(principal.tenant_id))
            result = await unless_disconnected(
                request, self.serving.predict(principal.tenant_id, match.group(1), inputs, top_k))
            response = _json([result], result)
        except Exception as exc:  # as the app's handlers answer it (ExceptionMiddleware; ErrorBoundary outside)
            response = await self._handled(request, exc)
        await response(scope, receive, send)

    @staticmethod
    async def _body(receive: Receive) -> tuple[bytes | None, list[Message]]:
        """The whole body and the messages it came in; None for the body when the client went away first."""
        messages = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return None, messages
            if not message.get("more_body", False):
                return b"".join(m.get("body", b"") for m in messages), messages

    def _taken(self, headers: Headers, body: bytes) -> tuple[Principal, list, int | None] | None:
        """(principal, inputs, top_k) when the route would predict; None for anything it answers otherwise. The
        body first, then the key, in the route's order (a key revoked while the body uploaded is refused)."""
        try:
            request = PredictRequest.model_validate(orjson.loads(body))
            inputs = checked_inputs(request.inputs, self.settings, one_kind=True)
        except Exception:  # not JSON orjson takes, not a PredictRequest, over a limit: the route's 422, in its words
            return None
        if not self.settings.auth_enabled:
            return keys.local_principal(), inputs, request.top_k
        key = presented_key(headers)
        principal = keys.authenticate_cached(self.serving.cache, key) if key else None
        if principal is None or not principal.has("predict"):
            return None
        return principal, inputs, request.top_k

    async def _handled(self, request: Request, exc: Exception) -> Any:
        handler = _lookup_exception_handler(self.exception_handlers, exc) or _unexpected
        if is_async_callable(handler):
            return await handler(request, exc)
        return await run_in_threadpool(handler, request, exc)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """`receive` that gives `messages` again first (the body read here), then the client's own."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
