"""Pure ASGI middleware (no BaseHTTPMiddleware, so streaming and contextvars are untouched):
request ids, request metrics and the request body cap."""

from __future__ import annotations

import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import PayloadTooLarge, problem
from .metrics import Metrics

_REQUEST_ID = re.compile(r"[\w.:-]{1,128}")


class RequestIdMiddleware:
    """Give each request an id (the client's `X-Request-ID` if sane), on `request.state.request_id` and
    echoed in the response, so a 500's `reference` can be found in the logs."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


class MetricsMiddleware:
    """Latency per (method, route template, status). Unmatched paths share one label, so scanners cannot
    blow up the series count."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # if the app raises, ServerErrorMiddleware (outside us) answers 500
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.http_requests_in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.http_requests_in_flight.dec()
            route = getattr(scope.get("route"), "path", None) or "<unmatched>"  # set by the router on match
            self.metrics.http_request_duration.labels(scope["method"], route, str(status)).observe(
                time.perf_counter() - start)


class RequestTooLarge(HTTPException):
    """Raised from `receive` once the body passes the cap. An HTTPException on purpose: FastAPI re-raises
    those unchanged while parsing a body (anything else becomes a 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes")


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`: at once from Content-Length, else as soon as the streamed bytes pass
    the cap, so an oversized body is never read whole."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            request = Request(scope)
            response = problem(413, PayloadTooLarge.type, f"request body larger than {self.max_bytes} bytes",
                               request=request, headers={"Connection": "close"}, limit_bytes=self.max_bytes)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)
